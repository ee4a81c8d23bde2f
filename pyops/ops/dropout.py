"""Dropout: the ``pyops::dropout`` operators and DropoutFunction.

Forward draws a (seed, offset) pair from torch's generator for the input's device and
the kernels derive each element's keep/drop decision from Philox4x32-10 at (seed,
offset, element index): out = in * (keep ? 1 / (1 - p) : 0). On a GPU the backward
replays the same kernel on the gradient with the saved pair (no mask is stored; Philox
is cheap next to the memory traffic there). On the CPU, where Philox costs more than
the traffic, the forward also writes the keep decisions as bits (``dropout_bits``: one
int64 word per 64 elements, 1/32 of a float32 input, where torch's CPU dropout keeps
a mask as large as the input) and the backward applies them (``dropout_apply_bits``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import cpp_extension, select, triton_kernels
from .._library import apply_function, op
from .._tensor import dense, dense_strides, elementwise_empty, with_strides
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


def _launch(x: Tensor, out: Tensor, seed_offset: Tensor, p: float, bits: Tensor | None = None) -> None:
    threshold, scale = keep_rule(p)
    if bits is not None or select(x, out, seed_offset) == "cpp":
        cpp_extension().dropout_apply(x, out, seed_offset, threshold, scale, bits)
    else:
        k = triton_kernels().dropout
        n = x.numel()
        launch_elementwise(k.dropout_kernel, k.CONFIGS, n, x.device, x, out, seed_offset, n, threshold, scale)


@op("dropout(Tensor x, Tensor seed_offset, float p) -> Tensor")
def dropout_op(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    """x * keep * 1/(1-p) with the Philox mask of ``seed_offset``; same memory format as ``x``."""
    x = dense(x)
    out = elementwise_empty(x)
    _launch(x, out, seed_offset, p)
    return out


@dropout_op.register_fake
def _(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    return elementwise_empty(dense(x))


def _bits_out(x: Tensor, seed_offset: Tensor) -> Tensor:
    """The keep bits' buffer: one int64 word per 64 elements on the C++ backend, none on
    Triton's (whose backward regenerates the mask)."""
    words = (x.numel() + 63) // 64 if select(x, seed_offset) == "cpp" else 0
    return torch.empty((words,), dtype=torch.int64, device=x.device)


@op("dropout_bits(Tensor x, Tensor seed_offset, float p) -> (Tensor, Tensor)")
def dropout_bits_op(x: Tensor, seed_offset: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``dropout``, also returning its keep decisions as bits on the C++ backend (element i of
    the output's dense storage: bit i % 64 of word i // 64); on Triton's an empty tensor."""
    x = dense(x)
    out, bits = elementwise_empty(x), _bits_out(x, seed_offset)
    _launch(x, out, seed_offset, p, bits if bits.numel() else None)
    return out, bits


@dropout_bits_op.register_fake
def _(x: Tensor, seed_offset: Tensor, p: float) -> tuple[Tensor, Tensor]:
    return elementwise_empty(dense(x)), _bits_out(x, seed_offset)


@op("dropout_bits_(Tensor(a!) x, Tensor seed_offset, float p) -> Tensor")
def dropout_bits_inplace_op(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    """In-place ``dropout_bits`` (a non-dense view is processed through a dense copy); returns the bits."""
    bits = _bits_out(x, seed_offset)
    if x.numel() == 0:
        return bits
    work = dense(x)
    _launch(work, work, seed_offset, p, bits if bits.numel() else None)
    if work is not x:
        x.copy_(work)
    return bits


@dropout_bits_inplace_op.register_fake
def _(x: Tensor, seed_offset: Tensor, p: float) -> Tensor:
    return _bits_out(x, seed_offset)


@op("dropout_apply_bits(Tensor x, Tensor bits, float p) -> Tensor")
def dropout_apply_bits_op(x: Tensor, bits: Tensor, p: float) -> Tensor:
    """x * (keep ? 1 / (1 - p) : 0) with the keep bits ``dropout_bits`` returned (CPU); x
    dense in the layout the forward walked."""
    out = elementwise_empty(x)
    cpp_extension().dropout_apply_bits(x, out, bits, keep_rule(p)[1])
    return out


@dropout_apply_bits_op.register_fake
def _(x: Tensor, bits: Tensor, p: float) -> Tensor:
    return elementwise_empty(x)


class DropoutFunction(torch.autograd.Function):
    """Dropout with a fixed (seed, offset); saves that pair and, on the CPU, the keep bits.

    Dropout is linear with a fixed mask: its backward is the same mask on the gradient
    (this Function again with the same pair and element order, or DropoutBitsFunction
    with the saved bits), so it differentiates any number of times.
    """

    @staticmethod
    def forward(ctx, x: Tensor, seed_offset: Tensor, p: float, inplace: bool) -> Tensor:
        # The mask follows the storage order the kernel walked (the dense layout of x);
        # backward lays the gradient out the same way before applying it.
        ctx.stride = dense_strides(x)
        ctx.p = p
        if inplace:
            bits = dropout_bits_inplace_op(x, seed_offset, p)
            ctx.mark_dirty(x)
            out = x
        else:
            out, bits = dropout_bits_op(x, seed_offset, p)
        ctx.save_for_backward(seed_offset, bits)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        seed_offset, bits = ctx.saved_tensors
        grad = with_strides(grad_output, ctx.stride)
        if bits.numel():
            return apply_function(DropoutBitsFunction, grad, bits, ctx.p), None, None, None
        return apply_function(DropoutFunction, grad, seed_offset, ctx.p, False), None, None, None


class DropoutBitsFunction(torch.autograd.Function):
    """Dropout's backward on the CPU: the saved keep bits applied to a gradient laid out as
    the forward's input was. Linear with a fixed mask, so its backward is itself."""

    @staticmethod
    def forward(ctx, grad: Tensor, bits: Tensor, p: float) -> Tensor:
        ctx.stride = grad.stride()
        ctx.p = p
        ctx.save_for_backward(bits)
        return dropout_apply_bits_op(grad, bits, p)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (bits,) = ctx.saved_tensors
        return apply_function(DropoutBitsFunction, with_strides(grad_output, ctx.stride), bits, ctx.p), None, None
