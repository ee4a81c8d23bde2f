"""How pyops registers its kernels as PyTorch operators (``torch.ops.pyops.*``).

Each kernel entry is defined with an explicit schema and one Python implementation
for every device (the implementation asks ``_dispatch.select`` for the backend), plus
a fake (meta) implementation, so torch.compile and torch.export trace through pyops.
Autograd is the job of the ``autograd.Function`` that calls these operators.

``torch.library.define``/``impl`` is used rather than ``torch.library.custom_op``:
same tracing behaviour, but about 3 us per call instead of 15-100 us (custom_op
re-binds the Python signature on every call), which matters for small layers.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("pyops", "DEF")


def op(schema: str) -> Callable:
    """Decorator defining ``pyops::<schema>`` with the decorated function as its kernel.

    The returned function gains ``register_fake(fake_fn)`` for the meta implementation.
    """
    name = schema.split("(", 1)[0]

    def wrap(fn: Callable) -> Callable:
        LIBRARY.define(schema)
        LIBRARY.impl(name, fn, "CompositeExplicitAutograd")

        def register_fake(fake: Callable) -> Callable:
            torch.library.register_fake(f"pyops::{name}", fake, lib=LIBRARY)
            return fake

        fn.register_fake = register_fake
        return fn

    return wrap
