"""Test setup: the backend grid, a per-dtype tolerance table and shared helpers.

Without a GPU, TRITON_INTERPRET=1 is set here, before pyops imports its Triton
kernels, so the triton backend runs CPU tensors through Triton's interpreter. With
a GPU the Triton kernels compile for it and run on CUDA tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyops  # noqa: E402
from pyops._dispatch import triton_interpreted  # noqa: E402


def backend_cases():
    """(backend, device) pairs this machine can run: every op is tested on each."""
    cases = [("cpp", "cpu")]
    if triton_interpreted():
        cases.append(("triton", "cpu"))
    if torch.cuda.is_available():
        cases.append(("triton", "cuda"))
    return cases


BACKEND_CASES = backend_cases()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKEND_CASES]

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# (atol, rtol) of pyops against torch, per dtype. Half-precision outputs allow one
# rounding step (Triton's interpreter rounds float32 -> bfloat16 toward zero).
TOL = {
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
    torch.float32: (1e-6, 1e-5),
    torch.float64: (1e-12, 1e-12),
}


@pytest.fixture(params=BACKEND_CASES, ids=BACKEND_IDS)
def backend_device(request):
    """Run the test body with pyops pinned to one backend; yields the device to put tensors on."""
    name, device = request.param
    with pyops.backend(name):
        yield device


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="long fuzzing profile: thousands of examples per op (tests/fuzz)")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ["PYOPS_FUZZ"] = "long"
