"""The one place that decides which backend runs a kernel.

CUDA tensors go to the Triton kernels, CPU tensors to the C++ kernels (``auto``).
``PYOPS_BACKEND=auto|triton|cpp`` or ``with pyops.backend(...)`` overrides that; the
context manager wins over the environment. With ``TRITON_INTERPRET=1`` set before
pyops' Triton kernels are imported, the triton backend runs CPU tensors through
Triton's interpreter (how CI proves the Triton code without a GPU).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "cpp")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("pyops_backend", default=None)


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the pyops calls inside the block on backend ``name`` ('auto', 'triton' or 'cpp')."""
    token = _override.set(_validate(name, "pyops.backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def _env_backend(value: str) -> str:
    return _validate(value.strip().lower() or "auto", "PYOPS_BACKEND")


# PYOPS_BACKEND is read on every kernel call. os.environ.get encodes the key and decodes
# the value each time (~1.5 us); CPython's os.environ keeps its encoded mapping in
# ``_data``, which every assignment through os.environ updates, so the raw value is read
# from there and parsed only when it changes. Elsewhere, os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("PYOPS_BACKEND") if hasattr(os.environ, "encodekey") else None
if _ENV_DATA is None or _ENV_KEY is None:
    def _raw_env():
        return os.environ.get("PYOPS_BACKEND")
else:
    def _raw_env():
        return _ENV_DATA.get(_ENV_KEY)

_env_cache: tuple[object, str] = (None, "auto")


def requested_backend() -> str:
    """The backend asked for now: the innermost ``pyops.backend`` block, else ``PYOPS_BACKEND``."""
    global _env_cache
    name = _override.get()
    if name is not None:
        return name
    raw = _raw_env()
    if raw != _env_cache[0]:  # parse once per distinct value
        value = os.environ.get("PYOPS_BACKEND", "auto")
        _env_cache = (raw, _env_backend(value))
    return _env_cache[1]


@functools.cache
def triton_kernels():
    """The ``pyops.triton_kernels`` package, imported on first use (None if triton is missing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from . import triton_kernels as tk
    from .triton_kernels import batchnorm, common, conv, dropout, pooling, sigmoid  # noqa: F401

    return tk


def triton_interpreted() -> bool:
    """True when pyops' Triton kernels were decorated under ``TRITON_INTERPRET=1``."""
    tk = triton_kernels()
    if tk is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tk.common.philox_blocks_kernel, InterpretedFunction)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run pyops' kernels in this environment, or None."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        # its scalars are 1-element arrays and loops over them call int() on one: an error since numpy 2.4
        return (f"Triton {triton.__version__}'s interpreter does not run with numpy {numpy.__version__}; "
                "install numpy<2.4 or triton>=3.7 (or use the C++ backend for CPU tensors)")
    return None


def select(*tensors: torch.Tensor | None) -> str:
    """Return 'triton' or 'cpp' for a kernel over ``tensors``, or raise RuntimeError saying how to fix the call."""
    device = None
    for t in tensors:
        if t is not None:
            if device is None:
                device = t.device
            elif t.device != device:
                devices = {str(u.device) for u in tensors if u is not None}
                raise RuntimeError("pyops: expected all tensors on the same device, but found "
                                   f"{', '.join(sorted(devices))}; move them with .to(device)")
    if device is None:
        raise RuntimeError("pyops: expected all tensors on the same device, but found none; "
                           "move them with .to(device)")
    name = requested_backend()
    kind = device.type
    if name == "auto":
        if kind == "cpu":
            return "cpp"
        if kind == "cuda":
            name = "triton"
        else:
            raise RuntimeError(f"pyops: no backend for {kind} tensors; use CPU or CUDA tensors")
    if name == "cpp":
        if kind != "cpu":
            raise RuntimeError(
                f"pyops: the C++ backend runs CPU tensors only, got a tensor on {device}; "
                "use PYOPS_BACKEND=auto or triton (or pyops.backend('triton')) for CUDA tensors, "
                "or move the tensor to the CPU"
            )
        return name
    if triton_kernels() is None:
        raise RuntimeError("pyops: the Triton backend needs the `triton` package; pip install triton")
    if kind == "cpu":
        if not triton_interpreted():
            raise RuntimeError(
                "pyops: the Triton backend runs CPU tensors only in Triton's interpreter; set "
                "TRITON_INTERPRET=1 before importing pyops, or use PYOPS_BACKEND=cpp "
                "(or pyops.backend('cpp')) for CPU tensors"
            )
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(f"pyops: {problem}")
    if kind not in ("cpu", "cuda"):
        raise RuntimeError(f"pyops: the Triton backend has no kernels for {kind} tensors")
    return name


@functools.cache
def cpp_extension():
    """The compiled C++ extension ``pyops._C``."""
    try:
        from . import _C
    except ImportError as e:
        raise RuntimeError(
            "pyops: the C++ extension pyops._C is not built; install pyops with "
            "`pip install --no-build-isolation .` in an environment that has torch"
        ) from e
    return _C
