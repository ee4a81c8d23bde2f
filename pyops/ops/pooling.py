"""Max and average pooling: launchers, the ``pyops::*_pool2d_*`` operators and Functions.

Operators take 4-D tensors of any strides (the kernels index through strides); the
outputs are NCHW-contiguous, or channels_last when the input is (torch's rule).
Backward needs only the input's shape and layout, not the input itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import cpp_extension, select, triton_kernels
from .._library import apply_function, op, runs_cpp_eagerly
from .._pool import is_channels_last, output_size
from ._launch import INT32_LIMIT, dividers, launch_elementwise, needs_int64


def _empty(shape, like: Tensor, channels_last: bool, dtype=None) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def _dense_as(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in the forward's output layout (a copy only when it is not: e.g. an expanded gradient)."""
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _out_shape(x: Tensor, kernel, stride, padding, dilation, ceil_mode) -> list[int]:
    return [x.shape[0], x.shape[1],
            output_size(x.shape[2], kernel[0], padding[0], stride[0], dilation[0], ceil_mode),
            output_size(x.shape[3], kernel[1], padding[1], stride[1], dilation[1], ceil_mode)]


def _trip_counts(kernel, stride, dilation) -> tuple[int, int]:
    """The most windows one input row (column) lies in: the gather backward's loop lengths."""
    return tuple(-(-((k - 1) * d + 1) // s) for k, s, d in zip(kernel, stride, dilation))


def _gather_int64(input_size, stride, padding, *tensors: Tensor) -> bool:
    """Whether a backward (gather) kernel needs 64-bit indices: for an offset of ``tensors``, or
    for the window search (row + padding + stride) of a stride near 2^31."""
    return needs_int64(*tensors) or max(n + p + s for n, p, s in zip(input_size[2:], padding, stride)) > INT32_LIMIT


# ---------------------------------------------------------------- max pooling


@op("max_pool2d_forward(Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, bool ceil_mode) "
    "-> (Tensor, Tensor)")
def max_pool2d_forward(x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                       dilation: list[int], ceil_mode: bool) -> tuple[Tensor, Tensor]:
    """(output, indices) of 2-D max pooling over a 4-D ``x``; indices are flat in each H*W plane."""
    cl = is_channels_last(x)
    shape = _out_shape(x, kernel, stride, padding, dilation, ceil_mode)
    out = _empty(shape, x, cl)
    idx = _empty(shape, x, cl, torch.int64)
    if out.numel() == 0:
        return out, idx
    if select(x) == "cpp":
        cpp_extension().max_pool2d_forward(x, out, idx, kernel, stride, padding, dilation)
    else:
        k = triton_kernels().pooling
        launch_elementwise(k.max_pool2d_forward_kernel, k.CONFIGS, out.numel(), x.device,
                           x, out, idx, out.numel(), x.shape[1], x.shape[2], x.shape[3], shape[2], shape[3],
                           *dividers(x.shape[1], shape[2], shape[3]), *x.stride(), *out.stride(), *kernel, *stride,
                           *padding, *dilation, CHANNELS_LAST=cl, IDX64=needs_int64(x, out))
    return out, idx


@max_pool2d_forward.register_fake
def _(x, kernel, stride, padding, dilation, ceil_mode):
    cl = is_channels_last(x)
    shape = _out_shape(x, kernel, stride, padding, dilation, ceil_mode)
    return _empty(shape, x, cl), _empty(shape, x, cl, torch.int64)


@op("max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[] input_size, bool channels_last, "
    "int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor")
def max_pool2d_backward(grad_output: Tensor, indices: Tensor, input_size: list[int], channels_last: bool,
                        kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """Gradient of max pooling: each input element receives the gradients of the windows it is the max of."""
    grad_input = _empty(input_size, grad_output, channels_last)
    if grad_input.numel() == 0:
        return grad_input
    grad_output = _dense_as(grad_output, channels_last)
    if select(grad_output, indices) == "cpp":
        cpp_extension().max_pool2d_backward(grad_output, indices, grad_input, kernel, stride, padding, dilation)
    else:
        k = triton_kernels().pooling
        _, C, H, W = input_size
        launch_elementwise(k.max_pool2d_backward_kernel, k.CONFIGS, grad_input.numel(), grad_input.device,
                           grad_output, indices, grad_input, grad_input.numel(), C, H, W,
                           grad_output.shape[2], grad_output.shape[3], *dividers(C, H, W, *stride),
                           *grad_output.stride(), *indices.stride(),
                           *kernel, *stride, *padding, *dilation, *_trip_counts(kernel, stride, dilation),
                           CHANNELS_LAST=channels_last,
                           IDX64=_gather_int64(input_size, stride, padding, grad_output, indices, grad_input))
    return grad_input


@max_pool2d_backward.register_fake
def _(grad_output, indices, input_size, channels_last, kernel, stride, padding, dilation):
    return _empty(input_size, grad_output, channels_last)


class MaxPool2dFunction(torch.autograd.Function):
    """2-D max pooling of a 4-D input; returns (output, indices), indices not differentiable.

    ``args`` is (kernel, stride, padding, dilation, ceil_mode), one argument rather than
    five: autograd.Function.apply costs time per argument, on every call.
    """

    @staticmethod
    def forward(ctx, x: Tensor, args):
        kernel, stride, padding, dilation, ceil_mode = args
        out, indices = max_pool2d_forward(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.mark_non_differentiable(indices)
        # No zero-filled gradient for the indices (an int64-sized fill per backward).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(indices)
        ctx.geometry = (list(x.shape), is_channels_last(x), kernel, stride, padding, dilation)
        return out, indices

    @staticmethod
    def backward(ctx, grad_output, _grad_indices):
        if grad_output is None:  # only the indices were used
            return None, None
        (indices,) = ctx.saved_tensors
        return apply_function(MaxPool2dBackwardFunction, grad_output, indices, ctx.geometry), None


class MaxPool2dBackwardFunction(torch.autograd.Function):
    """Max pooling's input gradient as a function of the output gradient (linear in it).

    Its own gradient reads the incoming gradient at each window's argmax (a gather by the
    saved indices); with respect to the pooled input it is zero almost everywhere, as in
    torch. ``geometry`` is MaxPool2dFunction's.
    """

    @staticmethod
    def forward(ctx, grad_output: Tensor, indices: Tensor, geometry):
        ctx.save_for_backward(indices)
        return max_pool2d_backward(grad_output, indices, *geometry)

    @staticmethod
    def backward(ctx, gg: Tensor):
        (indices,) = ctx.saved_tensors
        flat = indices.reshape(*indices.shape[:2], -1)
        picked = gg.reshape(*gg.shape[:2], -1).gather(2, flat)
        return picked.view(indices.shape[0], indices.shape[1], *indices.shape[2:]), None, None


# ---------------------------------------------------------------- average pooling


@op("avg_pool2d_forward(Tensor x, int[] kernel, int[] stride, int[] padding, bool ceil_mode, "
    "bool count_include_pad, int divisor_override) -> Tensor")
def avg_pool2d_forward(x: Tensor, kernel: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
                       count_include_pad: bool, divisor_override: int) -> Tensor:
    """2-D average pooling of a 4-D ``x``; ``divisor_override`` 0 means none (torch forbids 0 itself)."""
    cl = is_channels_last(x)
    out = _empty(_out_shape(x, kernel, stride, padding, (1, 1), ceil_mode), x, cl)
    if out.numel() == 0:
        return out
    if select(x) == "cpp":
        cpp_extension().avg_pool2d_forward(x, out, kernel, stride, padding, count_include_pad, divisor_override)
    else:
        k = triton_kernels().pooling
        launch_elementwise(k.avg_pool2d_forward_kernel, k.CONFIGS, out.numel(), x.device,
                           x, out, out.numel(), x.shape[1], x.shape[2], x.shape[3], out.shape[2], out.shape[3],
                           *dividers(x.shape[1], out.shape[2], out.shape[3]), *x.stride(), *out.stride(), *kernel,
                           *stride, *padding, divisor_override, COUNT_INCLUDE_PAD=count_include_pad, CHANNELS_LAST=cl,
                           IDX64=needs_int64(x, out))
    return out


@avg_pool2d_forward.register_fake
def _(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _empty(_out_shape(x, kernel, stride, padding, (1, 1), ceil_mode), x, is_channels_last(x))


@op("avg_pool2d_backward(Tensor grad_output, SymInt[] input_size, bool channels_last, int[] kernel, "
    "int[] stride, int[] padding, bool count_include_pad, int divisor_override) -> Tensor")
def avg_pool2d_backward(grad_output: Tensor, input_size: list[int], channels_last: bool, kernel: list[int],
                        stride: list[int], padding: list[int], count_include_pad: bool,
                        divisor_override: int) -> Tensor:
    """Gradient of average pooling: each input element sums grad / divisor over its windows."""
    grad_input = _empty(input_size, grad_output, channels_last)
    if grad_input.numel() == 0:
        return grad_input
    grad_output = _dense_as(grad_output, channels_last)
    if select(grad_output) == "cpp":
        cpp_extension().avg_pool2d_backward(grad_output, grad_input, kernel, stride, padding, count_include_pad,
                                            divisor_override)
    else:
        k = triton_kernels().pooling
        _, C, H, W = input_size
        launch_elementwise(k.avg_pool2d_backward_kernel, k.CONFIGS, grad_input.numel(), grad_input.device,
                           grad_output, grad_input, grad_input.numel(), C, H, W,
                           grad_output.shape[2], grad_output.shape[3], *dividers(C, H, W, *stride),
                           *grad_output.stride(),
                           *kernel, *stride, *padding, divisor_override, *_trip_counts(kernel, stride, (1, 1)),
                           COUNT_INCLUDE_PAD=count_include_pad, CHANNELS_LAST=channels_last,
                           IDX64=_gather_int64(input_size, stride, padding, grad_output, grad_input))
    return grad_input


@avg_pool2d_backward.register_fake
def _(grad_output, input_size, channels_last, kernel, stride, padding, count_include_pad, divisor_override):
    return _empty(input_size, grad_output, channels_last)


class AvgPool2dFunction(torch.autograd.Function):
    """2-D average pooling of a 4-D input; ``args`` is (kernel, stride, padding, ceil_mode,
    count_include_pad, divisor_override), packed as for MaxPool2dFunction."""

    @staticmethod
    def forward(ctx, x: Tensor, args):
        kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = args
        ctx.args = args
        ctx.geometry = (list(x.shape), is_channels_last(x), kernel, stride, padding, count_include_pad,
                        divisor_override)
        return avg_pool2d_forward(x, kernel, stride, padding, ceil_mode, count_include_pad,
                                  divisor_override)

    @staticmethod
    def backward(ctx, grad_output):
        return apply_function(AvgPool2dBackwardFunction, grad_output, ctx.args, ctx.geometry), None


class AvgPool2dBackwardFunction(torch.autograd.Function):
    """Average pooling's input gradient, linear in the output gradient: its own gradient is
    average pooling (the adjoint: same windows, same divisors) of the incoming gradient."""

    @staticmethod
    def forward(ctx, grad_output: Tensor, args, geometry):
        ctx.args = args
        return avg_pool2d_backward(grad_output, *geometry)

    @staticmethod
    def backward(ctx, gg: Tensor):
        return apply_function(AvgPool2dFunction, gg, ctx.args), None, None


# ---------------------------------------------------------------- entry points


def max_pool2d(x: Tensor, args, out_hw: list[int]) -> tuple[Tensor, Tensor]:
    """(output, indices): ``MaxPool2dFunction`` on a checked 4-D ``x`` or, in plain eager mode
    on the C++ backend, its C++ twin ``max_pool2d_autograd`` (same kernels; it records a node
    only when ``x`` needs a gradient, and costs less than the Function's bare forward).
    ``out_hw`` is the output size the checks computed (pyops/_pool.py)."""
    if runs_cpp_eagerly((x,)):
        kernel, stride, padding, dilation, _ = args
        return cpp_extension().max_pool2d_autograd(x, kernel, stride, padding, dilation, out_hw, is_channels_last(x))
    return apply_function(MaxPool2dFunction, x, args)


def avg_pool2d(x: Tensor, args, out_hw: list[int]) -> Tensor:
    """``AvgPool2dFunction`` on a checked 4-D ``x`` or, as for max_pool2d, its C++ twin
    ``avg_pool2d_autograd`` (same kernels); ``out_hw`` as for max_pool2d."""
    if runs_cpp_eagerly((x,)):
        kernel, stride, padding, _, count_include_pad, divisor_override = args
        return cpp_extension().avg_pool2d_autograd(x, kernel, stride, padding, out_hw, count_include_pad,
                                                   divisor_override, is_channels_last(x))
    return apply_function(AvgPool2dFunction, x, args)
