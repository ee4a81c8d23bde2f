"""Ahead-of-time compile of every Triton kernel and launch config for a GPU target, no GPU needed.

    TRITON_INTERPRET=0 python -m pyops._aot [--arch 90] [--jobs N]

Catches what Triton's interpreter cannot (dot shapes and dtypes, layouts, type rules):
each kernel is compiled for each dtype, each integer width the launcher can pass and
each config, e.g. to wgmma/DMMA code for sm_90 (H100).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time

FLOAT_TYPES = ("fp16", "bf16", "fp32", "fp64")
INT_TYPES = ("i32", "i64")  # Triton types a Python int by its value: both widths occur


def kernel_specs():
    """Yield (name, jit function, signature, constexprs, num_warps[, attrs]) for every kernel variant.

    num_warps may be a (num_warps, num_stages) pair; attrs (argument index -> divisibility)
    describes the aligned variants Triton's JIT makes.
    """
    from .triton_kernels import batchnorm, common, conv, dropout, pooling, sigmoid

    for dt, it, cfg in itertools.product(FLOAT_TYPES, INT_TYPES, sigmoid.CONFIGS):
        block = {"BLOCK": cfg.kwargs["BLOCK"]}
        yield ("sigmoid_forward", sigmoid.sigmoid_forward_kernel,
               {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n": it, "BLOCK": "constexpr"}, block, cfg.num_warps)
        yield ("sigmoid_backward", sigmoid.sigmoid_backward_kernel,
               {"dy_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "n": it, "BLOCK": "constexpr"},
               block, cfg.num_warps)
    for dt, it, cfg in itertools.product(FLOAT_TYPES, INT_TYPES, dropout.CONFIGS):
        yield ("dropout", dropout.dropout_kernel,
               {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "seed_offset_ptr": "*i64", "n": it, "threshold": "i32",
                "scale": "fp64", "BLOCK": "constexpr"},
               {"BLOCK": cfg.kwargs["BLOCK"]}, cfg.num_warps)
    geometry = ["total", "C", "H", "W", "OH", "OW"]
    # IDX64 is set whenever an offset may pass int32, so i64 arguments always come with it
    widths = [("i32", False), ("i32", True), ("i64", True)]
    for dt, (it, idx64), cl, cfg in itertools.product(FLOAT_TYPES, widths, (False, True), pooling.CONFIGS):
        ints = lambda names: {name: it for name in names}  # noqa: E731
        meta = {"CHANNELS_LAST": cl, "IDX64": idx64, "BLOCK": cfg.kwargs["BLOCK"]}
        flags = {"CHANNELS_LAST": "constexpr", "IDX64": "constexpr", "BLOCK": "constexpr"}
        window = ["KH", "KW", "SH", "SW", "PH", "PW"]
        # magic numbers (int32 whatever the index width) of the decoded sizes (and strides), shifts
        out_divs = {name: "i32" for name in ("C_m", "OH_m", "OW_m", "shifts")}
        in_divs = {name: "i32" for name in ("C_m", "H_m", "W_m", "SH_m", "SW_m", "shifts")}
        yield ("max_pool2d_forward", pooling.max_pool2d_forward_kernel,
               {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "idx_ptr": "*i64", **ints(geometry), **out_divs,
                **ints(["sxn", "sxc", "sxh", "sxw", "son", "soc", "soh", "sow"]), **ints(window + ["DH", "DW"]),
                **flags}, meta, cfg.num_warps)
        yield ("max_pool2d_backward", pooling.max_pool2d_backward_kernel,
               {"go_ptr": f"*{dt}", "idx_ptr": "*i64", "gi_ptr": f"*{dt}", **ints(geometry), **in_divs,
                **ints(["sgn", "sgc", "sgh", "sgw", "sjn", "sjc", "sjh", "sjw"]),
                **ints(window + ["DH", "DW", "NTH", "NTW"]), **flags}, meta, cfg.num_warps)
        for cip in (False, True):
            yield ("avg_pool2d_forward", pooling.avg_pool2d_forward_kernel,
                   {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", **ints(geometry), **out_divs,
                    **ints(["sxn", "sxc", "sxh", "sxw", "son", "soc", "soh", "sow"]),
                    **ints(window + ["divisor_override"]), "COUNT_INCLUDE_PAD": "constexpr", **flags},
                   {"COUNT_INCLUDE_PAD": cip, **meta}, cfg.num_warps)
            yield ("avg_pool2d_backward", pooling.avg_pool2d_backward_kernel,
                   {"go_ptr": f"*{dt}", "gi_ptr": f"*{dt}", **ints(geometry), **in_divs,
                    **ints(["sgn", "sgc", "sgh", "sgw"]),
                    **ints(window + ["divisor_override", "NTH", "NTW"]), "COUNT_INCLUDE_PAD": "constexpr",
                    **flags}, {"COUNT_INCLUDE_PAD": cip, **meta}, cfg.num_warps)
    yield from conv_specs(conv)
    yield from batchnorm_specs(batchnorm)
    for it in INT_TYPES:
        yield ("philox_blocks", common.philox_blocks_kernel,
               {"out_ptr": "*i64", "seed": "i64", "offset": "i64", "first": it, "n": it, "BLOCK": "constexpr"},
               {"BLOCK": 128}, 4)


def _aligned(fn, signature: dict, names) -> tuple[dict, dict, dict]:
    """Signature, extra constexprs and attrs of the variant Triton's JIT makes for aligned tensors.

    Pointers and the integer arguments in ``names`` are divisible by 16, except those given
    as 1 in ``names``, which the JIT turns into constexpr 1 (a unit stride). Arguments the
    kernel marks ``do_not_specialize`` get neither, as under the JIT.
    """
    signature, constexprs, attrs = dict(signature), {}, {}
    fixed = {p.name for p in getattr(fn, "params", ()) if p.do_not_specialize}  # (none under the interpreter)
    for arg, value in names.items():
        if arg in fixed:
            continue
        if value == 1:
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
    for arg, ty in signature.items():
        if ty.startswith("*"):
            attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


# The layouts the conv kernels are compiled for: "generic" (no divisibility known: odd channel
# counts, unaligned views) and the variants the JIT makes for aligned channels_last and NCHW
# tensors with channel counts that are multiples of 16 (the ones that run fast: vector loads,
# cp.async pipelining; test_aot_compile checks their PTX). Unit strides become constexpr 1.
_CONV_LAYOUTS = {
    "cl": {"x": (16, 1, 16, 16), "w": (16, 1, 16, 16), "y": (16, 1, 16, 16)},
    "nchw": {"x": (16, 16, 16, 1), "w": (16, 16, 16, 1), "y": (16, 16, 16, 1)},
}


def conv_specs(conv):
    """Every conv kernel x dtype x (index width, layout) x tile config.

    32-bit indices come in the aligned channels_last and NCHW variants, 64-bit in the generic one.
    The forward and dgrad kernels compile with HAS_BIAS=True: without a bias they are the same
    code less the epilogue's bias load and add (compiling both doubled the CI compile's conv
    time for nothing the compiler could reject).
    """
    variants = [("i32", False, "cl"), ("i32", False, "nchw"), ("i64", True, "generic")]
    for dt, (it, idx64, layout) in itertools.product(FLOAT_TYPES, variants):
        configs = conv.FP64_CONFIGS if dt == "fp64" else conv.CONFIGS
        ints = lambda names: {name: it for name in names.split()}  # noqa: E731
        window = ints("R S SH SW PH PW DH DW")
        flags = {"IDX64": "constexpr", "UPCAST": "constexpr"}
        tile = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
        acc = "fp64" if dt == "fp64" else "fp32"

        def variant(name, fn, signature, meta, warps, x, w, y, channels):
            """The spec of ``fn``; in an aligned layout, strides named x/w/y (n, c, h, w order) and channels."""
            if layout == "generic":
                return (name, fn, signature, meta, warps)
            strides = _CONV_LAYOUTS[layout]
            named = {arg: v for group, args in (("x", x), ("w", w), ("y", y)) if args
                     for arg, v in zip(args.split(), strides[group])}
            named.update({arg: 16 for arg in channels.split()})
            sig, consts, attrs = _aligned(fn, signature, named)
            return (f"{name}/{layout}", fn, sig, {**meta, **consts}, warps, attrs)

        for cfg in configs:
            meta = {"IDX64": idx64, "UPCAST": False, **cfg.kwargs}
            warps = (cfg.num_warps, cfg.num_stages)
            yield variant("conv2d_forward", conv.conv2d_forward_kernel,
                          {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}",
                           **ints("N H W OH OW Cg Kg sxn sxc sxh sxw swk swc swr sws syn syc syh syw"), **window,
                           "HAS_BIAS": "constexpr", **flags, **tile}, {"HAS_BIAS": True, **meta}, warps,
                          "sxn sxc sxh sxw", "swk swc swr sws", "syn syc syh syw", "Cg Kg")
            yield variant("conv2d_dgrad", conv.conv2d_dgrad_kernel,
                          {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                           **ints("N H W OH OW Cg Kg HQ WQ sdn sdk sdh sdw swk swc swr sws sxn sxc sxh sxw"),
                           **window, **ints("STEP_H STEP_W"), "HAS_BIAS": "constexpr", **flags, **tile},
                          {"HAS_BIAS": True, **meta}, warps,
                          "sxn sxc sxh sxw", "swk swc swr sws", "sdn sdk sdh sdw", "Cg Kg")
            yield variant("conv2d_wgrad", conv.conv2d_wgrad_kernel,
                          {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "ws_ptr": f"*{acc}",
                           **ints("N H W OH OW"), "OW_m": "i32", "OH_m": "i32", "shifts": "i32",
                           **ints("Cg Kg K SPLIT P_SPLIT sdn sdk sdh sdw sxn sxc sxh sxw"), **window,
                           **flags, **tile}, meta, warps, "sxn sxc sxh sxw", "", "sdn sdk sdh sdw", "Cg Kg K")
        if layout != "generic":
            continue
        yield ("sum_splits", conv.sum_splits_kernel,
               {"ws_ptr": f"*{acc}", "out_ptr": f"*{dt}", "numel": it, "SPLIT": it, "BLOCK": "constexpr"},
               {"BLOCK": 1024}, 4)
        yield ("channel_sum", conv.channel_sum_kernel,
               {"g_ptr": f"*{dt}", "out_ptr": f"*{acc}", **ints("N K HW N_PER sgn sgk sgp"),
                "BLOCK_C": "constexpr", "BLOCK_P": "constexpr"}, {"BLOCK_C": 32, "BLOCK_P": 64}, 4)


# (magic, shift) of dividers(L) (one divisor: its packed shift is the shift): int32 whatever the index width
_DIVIDER = {"L_magic": "i32", "L_shift": "i32"}


def batchnorm_specs(bn):
    """Every batch-norm kernel x dtype x index width x layout x config the launchers use on a GPU."""
    widths = [("i32", False), ("i64", True)]
    for dt, (it, idx64), cl in itertools.product(FLOAT_TYPES, widths, (False, True)):
        acc = "fp64" if dt == "fp64" else "fp32"
        ints = lambda names: {name: it for name in names.split()}  # noqa: E731
        flags = {"CHANNELS_LAST": "constexpr", "IDX64": "constexpr"}
        for cfg in bn.REDUCE_CONFIGS[1:]:  # [0] is the interpreter's
            meta = {"CHANNELS_LAST": cl, "IDX64": idx64, **cfg.kwargs}
            tile = {"BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
            yield ("bn_partial_stats", bn.partial_stats_kernel,
                   {"x_ptr": f"*{dt}", "part_ptr": f"*{acc}", **ints("R C L"), **_DIVIDER, "R_PER": it, **flags,
                    **tile}, meta,
                   cfg.num_warps)
            yield ("bn_grad_sums", bn.grad_sums_kernel,
                   {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "mean_ptr": f"*{acc}", "part_ptr": f"*{acc}",
                    **ints("R C L"), **_DIVIDER, "R_PER": it, **flags, **tile}, meta, cfg.num_warps)
        variants = [(0, True, True), (0, False, False), (1, True, False), (1, False, False), (2, True, False)]
        for block_s, (mode, has_w, has_b) in itertools.product(bn.ELEMENTWISE_WIDTHS[cl], variants):
            ptrs = {name: f"*{acc}" for name in ("mean_ptr", "var_ptr", "w_ptr", "b_ptr", "sums_ptr", "count_ptr")}
            yield ("bn_elementwise", bn.elementwise_kernel,
                   {"u_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}", **ptrs, **ints("R S C"),
                    "eps": "fp64", "MODE": "constexpr", "HAS_W": "constexpr", "HAS_B": "constexpr", **flags,
                    "BLOCK_R": "constexpr", "BLOCK_S": "constexpr"},
                   {"MODE": mode, "HAS_W": has_w, "HAS_B": has_b, "CHANNELS_LAST": cl, "IDX64": idx64,
                    "BLOCK_R": max(1, bn.GPU_TILE // block_s), "BLOCK_S": block_s}, 4)
        if cl or idx64:
            continue
        for stat in sorted({acc, dt}):  # running stats in the statistics' or the parameters' dtype
            yield ("bn_merge_stats", bn.merge_stats_kernel,
                   {"part_ptr": f"*{acc}", "out_ptr": f"*{acc}", "rm_ptr": f"*{stat}", "rv_ptr": f"*{stat}",
                    "P": "i32", "C": "i32", "momentum": "fp64", "HAS_RUNNING": "constexpr",
                    "BLOCK_C": "constexpr"}, {"HAS_RUNNING": True, "BLOCK_C": bn.MERGE_BLOCK_C}, 4)
        yield ("bn_grad_finalize", bn.grad_finalize_kernel,
               {"part_ptr": f"*{acc}", "var_ptr": f"*{acc}", "out_ptr": f"*{acc}", "P": "i32", "C": "i32",
                "eps": "fp64", "BLOCK_C": "constexpr"}, {"BLOCK_C": bn.MERGE_BLOCK_C}, 4)


def _compile(spec, target) -> tuple[str, str | None, float]:
    """(variant description, error or None, seconds) of one spec compiled for ``target``."""
    import triton
    from triton.compiler import ASTSource

    name, fn, signature, constexprs, num_warps, *rest = spec
    attrs = rest[0] if rest else None
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        warps, stages = num_warps if isinstance(num_warps, tuple) else (num_warps, None)
        options = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
        compiled = triton.compile(src, target=target, options=options)
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"no cubin produced (stages: {sorted(compiled.asm)})")
    except Exception as e:  # noqa: BLE001 - report every failing variant, not just the first
        return _describe(spec, None), f"{type(e).__name__}: {e}", time.perf_counter() - t0
    return _describe(spec, compiled.asm.get("ptx", "")), None, time.perf_counter() - t0


def _describe(spec, ptx: str | None) -> str:
    """One line naming a variant and, once compiled, what its PTX uses: tensor-core MMAs (wgmma,
    mma.sync), asynchronous copies (cp.async, the pipelined loads), vector loads."""
    name, _, signature, constexprs, num_warps, *_ = spec
    line = f"{name}[{', '.join(f'{k}={v}' for k, v in signature.items() if v != 'constexpr')}; " \
           f"{constexprs}, num_warps={num_warps}]"
    if ptx is not None:
        counts = {what: len(re.findall(pattern, ptx)) for what, pattern in _PTX_FEATURES.items()}
        line += " ptx: " + " ".join(f"{what}={n}" for what, n in counts.items())
    return line


_PTX_FEATURES = {"wgmma": r"\bwgmma\.mma_async", "mma": r"\bmma\.sync", "cp.async": r"\bcp\.async\.c[ag]",
                 "ld.v": r"\bld\.global(?:\.\w+)*\.v[248]\."}


_WORKER: dict = {}


def _worker_init(arch: int, warp_size: int) -> None:
    from triton.backends.compiler import GPUTarget

    _WORKER["specs"] = list(kernel_specs())
    _WORKER["target"] = GPUTarget("cuda", arch, warp_size)


def _worker_compile(index: int) -> tuple[str, str | None, float]:
    return _compile(_WORKER["specs"][index], _WORKER["target"])


def compile_all(arch: int = 90, warp_size: int = 32, verbose: bool = False, jobs: int = 1) -> list[tuple[str, str]]:
    """Compile every spec for ``cuda`` sm_``arch``; return [(variant, error)] for those that fail.

    ``jobs`` > 1 compiles in that many fresh (spawned) processes; results keep the specs' order.
    """
    from triton.backends.compiler import GPUTarget

    count = sum(1 for _ in kernel_specs())
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_worker_init, initargs=(arch, warp_size))
        with pool:
            results = pool.map(_worker_compile, range(count), chunksize=8)
            return _report(results, verbose)
    target = GPUTarget("cuda", arch, warp_size)
    return _report((_compile(spec, target) for spec in kernel_specs()), verbose)


def _report(results, verbose: bool) -> list[tuple[str, str]]:
    failures = []
    for variant, error, seconds in results:
        if error is not None:
            failures.append((variant, error))
        if verbose:
            print(f"{'ok' if error is None else 'FAIL':4s} {seconds:6.2f}s {variant}", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    args = parser.parse_args(argv)
    failures = compile_all(args.arch, verbose=True, jobs=args.jobs)
    for variant, err in failures:
        print(f"FAILED {variant}\n    {err}", file=sys.stderr)
    print(f"{len(failures)} failed" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
