"""The installed package: pyops._C built as the README promises, Triton kernels inside pyops."""
import importlib.util
import os

import pytest

import pyops
from pyops._dispatch import cpp_extension


def test_no_top_level_triton_kernels_module():
    # PyPI's `triton-kernels` owns that name; ours lives at pyops.triton_kernels.
    spec = importlib.util.find_spec("triton_kernels")
    assert spec is None or "pyops" not in (spec.origin or "")
    tk = importlib.import_module("pyops.triton_kernels")
    assert tk.__name__ == "pyops.triton_kernels"


def test_extension_built_with_openmp_and_simd():
    ext = cpp_extension()
    assert ext.openmp()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if os.environ.get("PYOPS_CPU_ARCH", "auto") == "auto" and " avx512bw " in flags and " avx512dq " in flags:
        assert ext.simd_level() == "AVX512"
    elif os.environ.get("PYOPS_CPU_ARCH", "auto") == "auto" and " avx2 " in flags:
        assert ext.simd_level() in ("AVX2", "AVX512")


def test_public_api():
    assert set(pyops.BACKENDS) == {"auto", "triton", "cpp"}
    for name in ("sigmoid", "dropout"):
        assert callable(getattr(pyops.functional, name))
    for name in ("Sigmoid", "Dropout"):
        assert isinstance(getattr(pyops.nn, name), type)
    with pytest.raises(ValueError):
        with pyops.backend("nope"):
            pass
