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
