"""Functions with the names, signatures, defaults and semantics of ``torch.nn.functional``."""
from __future__ import annotations

import torch
from torch import Tensor

from .ops.dropout import DropoutFunction, draw_seed_offset
from .ops.sigmoid import SigmoidFunction

__all__ = ["dropout", "sigmoid"]


def _check_tensor(input, fn: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}(): argument 'input' must be Tensor, not {type(input).__name__}")


def _check_floating(input: Tensor, fn: str) -> None:
    if not input.is_floating_point():
        raise RuntimeError(f"{fn}(): expected a floating-point input, got {input.dtype}")


def sigmoid(input: Tensor) -> Tensor:
    """Elementwise 1 / (1 + exp(-input)); any shape, memory format kept.

    Integer and bool inputs are promoted to the default float dtype, as torch.sigmoid does.
    """
    _check_tensor(input, "sigmoid")
    if input.is_complex():
        raise RuntimeError(f"sigmoid(): pyops has no complex kernels, got {input.dtype}")
    if not input.is_floating_point():
        input = input.to(torch.get_default_dtype())
    return SigmoidFunction.apply(input)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    Identity (the input itself) when ``training`` is False or ``p == 0``; zeros when
    ``p == 1``. The mask comes from a Philox stream seeded from torch's generator for
    the input's device, so ``torch.manual_seed`` reproduces it.
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p != p:  # NaN passes torch's Python check and fails its C++ one
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    _check_tensor(input, "dropout")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    _check_floating(input, "dropout")
    seed_offset = draw_seed_offset(input.device)
    return DropoutFunction.apply(input, seed_offset, float(p), bool(inplace))
