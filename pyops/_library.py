"""How pyops registers its kernels as PyTorch operators (``torch.ops.pyops.*``).

Each kernel entry is defined with an explicit schema and one Python implementation
for every device (the implementation asks ``_dispatch.select`` for the backend), plus
a fake (meta) implementation, so torch.compile and torch.export trace through pyops.
Autograd is the job of the ``autograd.Function`` that calls these operators;
``apply_function`` skips the Function (and its graph node) when no argument needs a
gradient, as in inference; ``runs_cpp_eagerly`` says when a call takes the op's C++ entry
instead (CPU, plain eager), which records a C++ autograd node when a gradient is needed
(csrc/autograd.h) and otherwise runs the kernels directly.

``torch.library.define``/``impl`` is used rather than ``torch.library.custom_op``:
same tracing behaviour, but about 3 us per call instead of 15-100 us (custom_op
re-binds the Python signature on every call), which matters for small layers.

The ``autograd.Function``s call the function that ``op`` returns, not
``torch.ops.pyops.<name>``. In plain eager mode (not tracing, no dispatch or
``__torch_function__`` mode, no tensor subclass among the arguments) it runs the
implementation directly: the dispatcher's round trip from Python to C++ and back
costs 6-12 us per call, as much as a small pooling or BatchNorm kernel. Everywhere
else it goes through ``torch.ops.pyops``, so tracers, fake tensors and modes see the
operator.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ._dispatch import select

LIBRARY = torch.library.Library("pyops", "DEF")

_len_dispatch_modes = torch._C._len_torch_dispatch_stack
_has_torch_function = torch._C._has_torch_function
_functorch_active = torch._C._are_functorch_transforms_active


def plain_eager(args: tuple) -> bool:
    """True when calling an implementation directly is what the dispatcher would do.

    Not under torch.func transforms (vmap, grad, ...): their wrapped tensors have no
    storage for a kernel to read; through ``torch.ops.pyops`` the dispatcher runs vmap's
    fallback (the op per batch entry) and grad's own autograd."""
    return not (torch.compiler.is_compiling() or _len_dispatch_modes() or _has_torch_function(args)
                or _functorch_active())


def op(schema: str) -> Callable:
    """Decorator defining ``pyops::<schema>`` with the decorated function as its kernel.

    Returns a caller of the operator (see the module docstring) with ``impl`` (the
    decorated function) and ``register_fake(fake_fn)`` for the meta implementation.
    """
    name = schema.split("(", 1)[0]

    def wrap(fn: Callable) -> Callable:
        LIBRARY.define(schema)
        LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        overload = getattr(getattr(torch.ops.pyops, name), "default")

        def call(*args):
            if plain_eager(args):
                return fn(*args)
            return overload(*args)

        def register_fake(fake: Callable) -> Callable:
            torch.library.register_fake(f"pyops::{name}", fake, lib=LIBRARY)
            return fake

        call.__name__ = call.__qualname__ = name
        call.__doc__ = fn.__doc__
        call.impl = fn
        call.register_fake = register_fake
        return call

    return wrap


class _NoGradCtx:
    """The ctx a Function's forward gets when it runs without autograd: it keeps nothing."""

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def apply_function(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``, or only its forward when no tensor argument needs a gradient.

    Function.apply costs ~12 us per call even then (a graph node and its ctx are built
    and dropped): in a model's inference pass that is as much as a small layer's kernel.
    Not for forwards that call ``ctx.mark_dirty`` (in-place outputs).
    """
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.forward(_NoGradCtx(), *args)


def runs_cpp_eagerly(tensors: tuple) -> bool:
    """Whether a call takes its op's C++ entry: plain eager (tracers and modes must see the
    operators) with ``tensors`` on the C++ backend.

    The entry records pyops' C++ autograd node when an argument needs a gradient (the same
    kernels as the Python Function without its per-call cost: Function.apply, a Python
    graph node, the operator layer; ~50-80 us per conv or batch-norm layer) and otherwise
    runs the kernels directly, cheaper than ``apply_function``'s shortcut too."""
    return plain_eager(tensors) and select(*tensors) == "cpp"
