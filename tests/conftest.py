"""Test setup: the backend grid, a per-dtype tolerance table and shared helpers.

Without a GPU, TRITON_INTERPRET=1 is set here, before pyops imports its Triton
kernels, so the triton backend runs CPU tensors through Triton's interpreter. With
a GPU the Triton kernels compile for it and run on CUDA tensors.
"""
import os
import signal
import subprocess
import sys
import tempfile
import zlib

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


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Seed torch's generators from the test's id, so a test draws the same values whether
    it runs in the whole suite, in a subset (``-k``), alone or under pytest-xdist."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=BACKEND_CASES, ids=BACKEND_IDS)
def backend_device(request):
    """Run the test body with pyops pinned to one backend; yields the device to put tensors on."""
    name, device = request.param
    with pyops.backend(name):
        yield device


def interpreting(device) -> bool:
    """Whether pyops runs ``device``'s tensors through Triton's interpreter now (triton backend, CPU).

    gradcheck takes ``fast_mode`` then: one random projection of the Jacobian rather than a
    launch per input element (the interpreter costs milliseconds to seconds a launch); the
    cpp backend checks the full Jacobian of the same Functions, and the *_matches_torch tests
    compare every gradient element of both backends with torch.
    """
    return torch.device(device).type == "cpu" and pyops.requested_backend() == "triton"


def assert_close(actual, expected, dtype=None):
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="long fuzzing profile: thousands of examples per op (tests/fuzz)")


def pytest_configure(config):
    if config.getoption("--long"):
        os.environ["PYOPS_FUZZ"] = "long"


# ---------------------------------------------------------------- the ahead-of-time compile check

AOT_TEST = "test_all_kernels_compile_for_sm90"
_AOT: dict = {}


def aot_compile_process():
    """(process, output file) of ``python -m pyops._aot --arch 90``, started once per session.

    It runs without TRITON_INTERPRET (the interpreter replaces the kernels it compiles) in
    the background while the other tests run: ``pytest_collection_modifyitems`` starts it
    and puts its test last, which then waits for it (under pytest-xdist the test starts it).
    """
    if "proc" not in _AOT:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = tempfile.TemporaryFile("w+")
        # its own process group: an interrupted run kills its pool of compile workers with it
        _AOT["proc"] = subprocess.Popen([sys.executable, "-P", "-m", "pyops._aot", "--arch", "90"], env=env,
                                        stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _AOT["out"] = out
    return _AOT["proc"], _AOT["out"]


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: a run without the AOT test does not start it
def pytest_collection_modifyitems(session, config, items):
    aot = [item for item in items if item.name == AOT_TEST]
    if aot:
        items[:] = [item for item in items if item.name != AOT_TEST] + aot
        # Under pytest-xdist every worker collects every test: the one that runs the AOT
        # test starts the compile then, rather than each worker at collection.
        if "PYTEST_XDIST_WORKER" not in os.environ:
            aot_compile_process()


def pytest_unconfigure(config):
    if "proc" in _AOT and _AOT["proc"].poll() is None:  # interrupted run: do not leave it compiling
        # the whole group: killing the parent alone left its spawned workers compiling for minutes
        os.killpg(_AOT["proc"].pid, signal.SIGKILL)
        _AOT["proc"].wait()
