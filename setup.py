"""Build of pyops: the CPU extension pyops._C and the Triton kernels as pyops.triton_kernels.

Install into an environment that already has torch:
    pip install --no-build-isolation .        (or -e . for development)

PYOPS_CPU_ARCH=auto|avx512|avx2|default chooses the SIMD level at::vec is built for
(auto: what this machine's CPU reports). PYOPS_SANITIZE=1 builds with ASan + UBSan.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# at::vec picks its Vectorized<T> implementation from CPU_CAPABILITY_* macros; the
# matching -m flags let the compiler emit those instructions.
SIMD_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def simd_level():
    level = os.environ.get("PYOPS_CPU_ARCH", "auto").lower()
    if level != "auto":
        if level not in SIMD_FLAGS:
            raise ValueError(f"PYOPS_CPU_ARCH must be auto, avx512, avx2 or default, got {level!r}")
        return level
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


# torch >= 2.13 headers are written for C++20; older ones build as C++17.
_torch_version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
cxx_std = "-std=c++20" if _torch_version >= (2, 13) else "-std=c++17"
# -fno-math-errno: std::sqrt and friends never set errno here, so their loops vectorise
# (with errno, each sqrt is a scalar instruction plus a branch to the libm call).
# -g0: no debug info (Python's CFLAGS add -g); for ATen's templates it costs a third of the
# build time and most of the library's size. PYOPS_SANITIZE=1 builds keep it.
cxx_flags = ["-O3", "-g0", cxx_std, "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas",
             *SIMD_FLAGS[simd_level()]]
link_flags = ["-fopenmp"]
# PYOPS_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer build (scripts/sanitize.sh).
if os.environ.get("PYOPS_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined", "-g"]
    cxx_flags = [f for f in cxx_flags if f not in ("-O3", "-g0")] + ["-O1", *sanitize]
    link_flags += sanitize

setup(
    packages=["pyops", "pyops.ops", "pyops.triton_kernels"],
    # The Triton folder lives at the top of the repo (design card) but installs
    # only inside the pyops namespace: PyPI's `triton-kernels` owns that top-level name.
    package_dir={"pyops": "pyops", "pyops.ops": "pyops/ops", "pyops.triton_kernels": "triton_kernels"},
    ext_modules=[
        CppExtension(
            "pyops._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
