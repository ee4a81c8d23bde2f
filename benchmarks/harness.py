"""The one benchmark harness every pyops benchmark uses.

Honest timing: warm-up first; then pyops and the torch baseline are timed in
alternating rounds in one process on the same tensors, and each provider's median
and spread (20th-80th percentile) are reported. On a GPU each round is
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); on the CPU
wall-clock timing of enough calls to make a sample last about a millisecond.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _cpu_sample(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def _gpu_sample(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def compare(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int | None = None,
            min_sample_ms: float = 1.0) -> dict[str, Timing]:
    """Time every provider in ``fns`` in ``rounds`` interleaved rounds; return a Timing each.

    ``rounds`` defaults to 7 on a GPU and 15 on the CPU, whose samples a shared machine
    disturbs more often (bursts of 20-50% on this project's 2-core CI machines): the
    median of 15 rounds shrugs off a few slow ones, and the quick CPU suite still runs in
    under a minute.
    """
    if rounds is None:
        rounds = 7 if device.type == "cuda" else 15
    names = list(fns)
    calls = {}
    for name in names:  # warm-up, and how many calls make one CPU sample
        for _ in range(2):
            fns[name]()
        if device.type == "cuda":
            torch.cuda.synchronize()
            calls[name] = 1
        else:
            one = _cpu_sample(fns[name], 1)
            calls[name] = max(1, min(1000, int(min_sample_ms / max(one, 1e-6))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if device.type == "cuda":
                samples[name].append(_gpu_sample(fns[name]))
            else:
                samples[name].append(_cpu_sample(fns[name], calls[name]))
    return {
        n: Timing(statistics.median(s), _percentile(s, 0.2), _percentile(s, 0.8), len(s))
        for n, s in samples.items()
    }


def op_rows(op: str, x: torch.Tensor, ours: Callable, theirs: Callable, traffic: dict[str, int],
            correct: bool, device: torch.device, **extra) -> list[dict]:
    """Time forward, backward and full (forward + backward) of ``ours`` and ``theirs`` on ``x``.

    ``traffic[mode]`` is the number of bytes the op must move in that mode (the same
    count for both providers); ``correct`` is the caller's check of ours against theirs.
    """
    xg = x.detach().requires_grad_()
    y_ours, y_theirs = ours(xg), theirs(xg)
    g = torch.randn_like(y_ours)
    providers = {
        "forward": {"pyops": lambda: ours(x), "torch": lambda: theirs(x)},
        "backward": {
            "pyops": lambda: torch.autograd.grad(y_ours, xg, g, retain_graph=True),
            "torch": lambda: torch.autograd.grad(y_theirs, xg, g, retain_graph=True),
        },
        "full": {
            "pyops": lambda: torch.autograd.grad(ours(xg), xg, g),
            "torch": lambda: torch.autograd.grad(theirs(xg), xg, g),
        },
    }
    rows = []
    for mode, fns in providers.items():
        t = compare(fns, device)
        nbytes = traffic[mode]
        rows.append({
            "op": op, "mode": mode, "shape": list(x.shape), "dtype": str(x.dtype),
            "format": "channels_last" if x.dim() == 4 and not x.is_contiguous() else "contiguous",
            **extra,
            "pyops_ms": t["pyops"].median_ms, "pyops_p20_ms": t["pyops"].p20_ms, "pyops_p80_ms": t["pyops"].p80_ms,
            "torch_ms": t["torch"].median_ms, "torch_p20_ms": t["torch"].p20_ms, "torch_p80_ms": t["torch"].p80_ms,
            "speedup": t["torch"].median_ms / t["pyops"].median_ms,
            "bytes": nbytes,
            "pyops_gbps": nbytes / t["pyops"].median_ms / 1e6,
            "torch_gbps": nbytes / t["torch"].median_ms / 1e6,
            "correct": bool(correct),
            "samples": t["pyops"].samples,
        })
    return rows


def run_cases(name: str, cases: list, run_case: Callable, progress=None) -> list[dict]:
    """Run ``run_case(*case)`` for every case, with a progress bar when one is given."""
    rows = []
    bar = progress(total=len(cases), desc=name) if progress else None
    for case in cases:
        rows += run_case(*case)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    name = device_name(device)
    if device.type == "cpu":
        name = f"cpu-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def git_commit() -> str:
    """The short commit of this checkout (PYOPS_COMMIT overrides it, for copies without .git)."""
    if os.environ.get("PYOPS_COMMIT"):
        return os.environ["PYOPS_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_malloc() -> str:
    """Keep freed memory in glibc's heap for reuse, as a caching allocator would; returns what was set.

    With glibc's defaults a freed buffer of a few MB goes back to the kernel (the heap's top
    is trimmed, or the buffer was its own mapping) and the next call's buffer of that size
    is page-faulted in again, 4 KiB at a time. Which calls pay that depends on the heap's
    state, so a case's CPU samples went bimodal (batch norm full 2x64x112x112 channels_last:
    pyops 0.93 / 1.86 / 2.50 ms at the 20th / 50th / 80th percentile). Both providers
    allocate through the same malloc (torch's CPU allocator does not cache), so this takes
    the page faults out of both. ``--glibc-malloc-defaults`` measures without it.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (not glibc)"
    # The mmap threshold cannot pass 32 MiB on 64-bit glibc: buffers above it stay mappings.
    if mallopt(_M_TRIM_THRESHOLD, 1 << 30) and mallopt(_M_MMAP_THRESHOLD, 32 << 20):
        return "glibc, freed memory kept (trim threshold 1 GiB, mmap threshold 32 MiB)"
    return "default (mallopt refused)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return env


def prepare(device: torch.device, glibc_malloc_defaults: bool = False) -> dict:
    """Set up the process for timing (on the CPU: steady_malloc unless asked not to) and
    return the environment record, which says what was set."""
    malloc = "default"
    if device.type == "cpu" and not glibc_malloc_defaults:
        malloc = steady_malloc()
    return {**environment(device), "malloc": malloc}


MALLOC_HELP = ("CPU: leave glibc's malloc as it is (by default freed memory is kept for reuse, so page "
               "faults do not make the samples bimodal; see harness.steady_malloc)")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of result rows (one line per case)."""
    rate = "TFLOP/s" if rows and "pyops_tflops" in rows[0] else "GB/s"
    header = ["op", "mode", "shape", "dtype", "format", "config", "pyops ms", "torch ms", "speedup", f"pyops {rate}",
              f"torch {rate}", "% peak", "ok"]
    lines = [header]
    for r in rows:
        lines.append([
            r["op"], r["mode"], "x".join(map(str, r["shape"])), r["dtype"].replace("torch.", ""), r["format"],
            r.get("config", ""),
            f"{r['pyops_ms']:.4f}", f"{r['torch_ms']:.4f}", f"{r['speedup']:.2f}",
            *((f"{r['pyops_tflops']:.2f}", f"{r['torch_tflops']:.2f}") if rate == "TFLOP/s" else
              (f"{r['pyops_gbps']:.1f}", f"{r['torch_gbps']:.1f}")),
            f"{r['pct_peak']:.1f}" if "pct_peak" in r else "",
            "yes" if r["correct"] else "NO",
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)


def write_rows(rows: list[dict], env: dict, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    return path


def default_out_dir(device: torch.device) -> Path:
    return Path(os.environ.get("PYOPS_BENCH_OUT", Path(__file__).resolve().parent / "results")) / device_slug(device)


def suite_main(name: str, run: Callable, description: str, argv=None) -> int:
    """Command line of one suite script: run it, print its table, write its JSON rows."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="more shapes and dtypes")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON rows")
    parser.add_argument("--glibc-malloc-defaults", action="store_true", help=MALLOC_HELP)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = prepare(device, args.glibc_malloc_defaults)
    rows = run(device, args.full)
    print(format_table(rows))
    print(f"rows written to {write_rows(rows, env, args.out or default_out_dir(device), name)}")
    return 0
