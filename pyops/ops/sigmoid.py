"""Sigmoid: launchers, the ``pyops::sigmoid_forward/backward`` operators and SigmoidFunction."""
from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import cpp_extension, select, triton_kernels
from .._library import apply_function, op, runs_cpp_eagerly
from .._tensor import binary_elementwise_empty, dense, elementwise_empty, with_strides
from ._launch import launch_elementwise


def _launch_forward(x: Tensor, y: Tensor) -> None:
    if select(x, y) == "cpp":
        cpp_extension().sigmoid_forward(x, y)
    else:
        k = triton_kernels().sigmoid
        launch_elementwise(k.sigmoid_forward_kernel, k.CONFIGS, x.numel(), x.device, x, y, x.numel())


def _launch_backward(grad_output: Tensor, output: Tensor, grad_input: Tensor) -> None:
    if select(grad_output, output, grad_input) == "cpp":
        cpp_extension().sigmoid_backward(grad_output, output, grad_input)
    else:
        k = triton_kernels().sigmoid
        n = output.numel()
        launch_elementwise(k.sigmoid_backward_kernel, k.CONFIGS, n, output.device, grad_output, output, grad_input, n)


@op("sigmoid_forward(Tensor x) -> Tensor")
def sigmoid_forward(x: Tensor) -> Tensor:
    """y = 1 / (1 + exp(-x)), same shape and memory format as ``x``."""
    x = dense(x)
    y = elementwise_empty(x)
    if y.numel():
        _launch_forward(x, y)
    return y


@sigmoid_forward.register_fake
def _(x: Tensor) -> Tensor:
    return elementwise_empty(dense(x))


@op("sigmoid_backward(Tensor grad_output, Tensor output) -> Tensor")
def sigmoid_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    """grad_input = grad_output * y * (1 - y) from the forward's output ``y``, laid out as
    torch's sigmoid_backward(grad_output, y) (``binary_elementwise_empty``: mostly the
    gradient's layout); the kernel reads both operands in that layout."""
    grad_input = binary_elementwise_empty(grad_output, output)
    _launch_backward(with_strides(grad_output, grad_input.stride()), with_strides(output, grad_input.stride()),
                     grad_input)
    return grad_input


@sigmoid_backward.register_fake
def _(grad_output: Tensor, output: Tensor) -> Tensor:
    return binary_elementwise_empty(grad_output, output)


class SigmoidFunction(torch.autograd.Function):
    """Sigmoid whose forward and backward both run pyops kernels; saves only the output.

    The backward is itself a Function (SigmoidBackwardFunction), so ``create_graph``
    gradients differentiate again: double backward, as torch.sigmoid.
    """

    # forward(ctx, ...) rather than setup_context: Function.apply binds a setup_context
    # forward's signature with inspect on every call (tens of microseconds).
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        output = sigmoid_forward(x)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (output,) = ctx.saved_tensors
        return apply_function(SigmoidBackwardFunction, grad_output, output)


class SigmoidBackwardFunction(torch.autograd.Function):
    """grad_input = g * y * (1 - y) as a function of both g and the forward's output y.

    d/dg is the same kernel on the incoming gradient; d/dy = gg * g * (1 - 2y) is
    plain tensor arithmetic, differentiable in turn.
    """

    @staticmethod
    def forward(ctx, grad_output: Tensor, output: Tensor) -> Tensor:
        ctx.save_for_backward(grad_output, output)
        return sigmoid_backward(grad_output, output)

    @staticmethod
    def backward(ctx, gg: Tensor):
        grad_output, output = ctx.saved_tensors
        d_grad = apply_function(SigmoidBackwardFunction, gg, output) if ctx.needs_input_grad[0] else None
        d_output = gg * grad_output * (1 - 2 * output) if ctx.needs_input_grad[1] else None
        return d_grad, d_output


def sigmoid(x: Tensor) -> Tensor:
    """``SigmoidFunction`` on a floating-point ``x`` or, in plain eager mode on the C++ backend,
    its C++ twin ``sigmoid_autograd`` (same kernels; it records a node only when ``x`` needs a
    gradient, and costs less than the Function's bare forward)."""
    if runs_cpp_eagerly((x,)):
        return cpp_extension().sigmoid_autograd(x)
    return apply_function(SigmoidFunction, x)
