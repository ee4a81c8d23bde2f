"""Dropout: the ``pyops::dropout`` operators and DropoutFunction.

The mask is never stored. Forward draws a (seed, offset) pair from torch's generator
for the input's device and the kernels derive each element's keep/drop decision from
Philox4x32-10 at (seed, offset, element index); backward replays the same kernel on the
gradient with the saved pair. One kernel is both forward and backward:
out = in * (keep ? 1 / (1 - p) : 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import cpp_extension, select, triton_kernels
from .._library import apply_function, op
from .._tensor import dense, dense_strides, with_strides
from ._launch import launch_elementwise

# Top bits of each Philox word compared with round(p * 2^24): p = 1 drops everything.
MASK_BITS = 24


def keep_rule(p: float) -> tuple[int, float]:
    """(threshold, scale) for drop probability ``p``: keep where (word >> 8) >= threshold."""
    threshold = int(round(p * (1 << MASK_BITS)))
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    return threshold, scale


def draw_seed_offset(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """A (seed, offset) int64 pair drawn from torch's generator for ``device``.

    Drawn as a tensor on that device, so ``torch.manual_seed`` reproduces a run, the GPU
    kernel reads it without a host sync, and torch.compile traces it.
    """
    return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


def _launch(x: Tensor, out: Tensor, seed_offset: Tensor, p: float) -> None:
    threshold, scale = keep_rule(p)
    if select(x, out, seed_offset) == "cpp":
        cpp_extension().dropout_apply(x, out, seed_offset, threshold, scale)
    else:
        k = triton_kernels().dropout
        n = x.numel()
        launch_elementwise(k.dropout_kernel, k.CONFIGS, n, x.device, x, out, seed_offset, n, threshold, scale)


@op("dropout(Tensor x, Tensor seed_offset, float p) -> Tensor")
def dropout_op(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    """x * keep * 1/(1-p) with the Philox mask of ``seed_offset``; same memory format as ``x``."""
    x = dense(x)
    out = torch.empty_like(x)
    _launch(x, out, seed_offset, p)
    return out


@dropout_op.register_fake
def _(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    return torch.empty_like(dense(x))


@op("dropout_(Tensor(a!) x, Tensor seed_offset, float p) -> ()")
def dropout_inplace_op(x: Tensor, seed_offset: Tensor, p: float) -> None:
    """In-place dropout of ``x`` (a non-dense view is processed through a dense copy)."""
    if x.numel() == 0:
        return
    work = dense(x)
    _launch(work, work, seed_offset, p)
    if work is not x:
        x.copy_(work)


@dropout_inplace_op.register_fake
def _(x: Tensor, seed_offset: Tensor, p: float) -> None:
    return None


class DropoutFunction(torch.autograd.Function):
    """Dropout with a fixed (seed, offset); saves that pair, never a mask.

    Dropout is linear with a fixed mask: its backward is this Function again on the
    gradient (same pair, same element order), so it differentiates any number of times.
    """

    @staticmethod
    def forward(ctx, x: Tensor, seed_offset: Tensor, p: float, inplace: bool) -> Tensor:
        # The mask follows the storage order the kernel walked (the dense layout of x);
        # backward lays the gradient out the same way before replaying the kernel.
        ctx.stride = dense_strides(x)
        ctx.p = p
        ctx.save_for_backward(seed_offset)
        if inplace:
            dropout_inplace_op(x, seed_offset, p)
            ctx.mark_dirty(x)
            return x
        return dropout_op(x, seed_offset, p)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (seed_offset,) = ctx.saved_tensors
        grad = with_strides(grad_output, ctx.stride)
        return apply_function(DropoutFunction, grad, seed_offset, ctx.p, False), None, None, None
