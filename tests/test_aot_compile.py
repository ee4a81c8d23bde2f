"""Every Triton kernel and launch config compiles ahead of time for the H100 (sm_90).

Runs in a subprocess without TRITON_INTERPRET, since the interpreter replaces the
kernels this has to compile; no GPU is needed. conftest starts it when the session
begins (it overlaps the other tests) and runs this test last.
"""
import os

import pytest

from conftest import aot_compile_process

pytest.importorskip("triton")


def test_all_kernels_compile_for_sm90():
    proc, out = aot_compile_process()
    returncode = proc.wait(timeout=1800)
    out.seek(0)
    stdout = out.read()
    assert returncode == 0, stdout[-8000:]
    assert "all kernels compiled" in stdout
    compiled = [line for line in stdout.splitlines() if line.startswith("ok")]
    from pyops import _aot

    assert len(compiled) == len(list(_aot.kernel_specs())) > 100
    _check_conv_pipelined(compiled)


def _check_conv_pipelined(lines):
    """The conv variants the JIT makes for aligned tensors must compile to the fast code:
    cp.async loads (what lets Triton pipeline the reduction over num_stages buffers) and, in
    half precision, wgmma. Losing the alignment facts (e.g. unspecialised channel counts)
    silently gives scalar, single-buffered loads; this catches that without a GPU."""
    import re

    checked = 0
    for line in lines:
        m = re.search(r" (conv2d_\w+)/(cl|nchw)\[\w+=\*(\w+),.*'BLOCK_M': (\d+).*num_warps=\((\d+), (\d+)\)\] "
                      r"ptx: wgmma=(\d+) mma=(\d+) cp.async=(\d+)", line)
        if not m:
            continue
        kernel, layout, dtype, block_m, _, stages, wgmma, _, cp_async = m.groups()
        if int(stages) < 2:
            continue
        if layout == "cl" or dtype in ("fp32", "fp64"):  # 2-byte NCHW pixels gather too narrowly for cp.async
            assert int(cp_async) > 0, f"not pipelined: {line}"
        if dtype in ("bf16", "fp16") and int(block_m) >= 64:
            assert int(wgmma) > 0, f"no wgmma: {line}"
        checked += 1
    assert checked >= 60, checked


def test_specs_cover_every_kernel():
    """A new @triton.jit kernel in triton_kernels/ must be added to the AOT specs."""
    import importlib
    import pkgutil

    import pyops.triton_kernels as tk
    from pyops import _aot

    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction as Kernel
    else:
        from triton.runtime.jit import JITFunction as Kernel
    covered = {fn.fn if hasattr(fn, "fn") else fn for _, fn, *_ in _aot.kernel_specs()}
    found = set()
    for mod in pkgutil.iter_modules(tk.__path__):
        m = importlib.import_module(f"{tk.__name__}.{mod.name}")
        for name, obj in vars(m).items():
            if isinstance(obj, Kernel) and name.endswith("_kernel") and obj.fn.__module__ == m.__name__:
                found.add(obj.fn)
    assert found and found <= covered, sorted(f.__name__ for f in found - covered)


def test_sass_stats_counts_a_kernel():
    """scripts/sass_stats.py (SASS instruction counts per loop trip) works on this install."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "sass_stats.py"), r"^max_pool2d_forward\[",
                           r"x_ptr=\*fp32", "total=i32", "'IDX64': False", "'CHANNELS_LAST': False", "BLOCK': 1024"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "1 variants", proc.stdout
    kernel = next(line for line in lines if line.strip().startswith("kernel:"))
    assert "LDG=" in kernel and "STG=" in kernel, kernel
    assert any(line.strip().startswith("loop at") for line in lines), proc.stdout  # the window loop
