"""Instruction counts of Triton kernels compiled for an H100 (sm_90), no GPU needed.

    python scripts/sass_stats.py REGEX [REGEX ...] [--arch 90] [--dump]

Compiles every variant of pyops._aot.kernel_specs() whose description matches all the
REGEXes (e.g. 'conv2d_forward/cl' 'x_ptr=\\*bf16' "BLOCK_M': 128, 'BLOCK_N': 128") and
prints its SASS size and, for each loop (a backward branch), the instructions of one
trip: vector and uniform-datapath ones, memory and tensor-core ones. A loop's count per
trip, against the work it does (elements loaded, MMAs issued), tells whether a kernel
can be limited by instruction issue rather than memory or tensor cores. --dump prints
the innermost loop.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"


def sass_lines(cubin: bytes) -> list[str]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]


def opcode(line: str) -> str:
    parts = line.split(";")[0].split()[1:]
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else "?"


def loops(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of each loop: a branch back to an earlier address."""
    index = {int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16): i for i, line in enumerate(lines)}
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", line)
        if m and index.get(int(m.group(1), 16), i) < i:
            found.append((index[int(m.group(1), 16)], i))
    return found


def summary(lines: list[str]) -> str:
    ops = collections.Counter(opcode(line) for line in lines)
    uniform = sum(n for op, n in ops.items() if op.startswith("U"))
    keys = ("LDG", "LDGSTS", "LDS", "STG", "HGMMA", "HMMA", "DMMA", "MUFU", "BAR")
    mem = " ".join(f"{k}={ops[k]}" for k in keys if ops[k])
    return f"{len(lines)} ({len(lines) - uniform} vector, {uniform} uniform) {mem}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="regexes the variant description must all match")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dump", action="store_true", help="print the innermost loop's SASS")
    args = parser.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyops import _aot

    target = GPUTarget("cuda", args.arch, 32)
    count = 0
    for spec in _aot.kernel_specs():
        described = _aot._describe(spec, None)
        if not all(re.search(p, described) for p in args.patterns):
            continue
        count += 1
        name, fn, signature, constexprs, warps, *rest = spec
        num_warps, stages = warps if isinstance(warps, tuple) else (warps, None)
        options = {"num_warps": num_warps} | ({"num_stages": stages} if stages else {})
        compiled = triton.compile(ASTSource(fn, signature, constexprs, rest[0] if rest else None), target=target,
                                  options=options)
        lines = sass_lines(compiled.asm["cubin"])
        print(described)
        print(f"  kernel: {summary(lines)}")
        spans = loops(lines)
        for first, last in spans:
            print(f"  loop at {first}: {summary(lines[first:last + 1])}")
        if args.dump and spans:
            first, last = min(spans, key=lambda s: s[1] - s[0])
            print("\n".join(" ".join(line.split(";")[0].split()[1:]) for line in lines[first:last + 1]))
    print(f"{count} variants")
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main())
