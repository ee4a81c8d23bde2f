"""Functions with the names, signatures, defaults and semantics of ``torch.nn.functional``."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _conv, _pool
from ._library import plain_eager
from .ops.batch_norm import batch_norm as _batch_norm
from .ops.conv import Conv2dFunction, ConvTranspose2dFunction
from .ops.conv import conv as _conv_op
from .ops.dropout import DropoutFunction, draw_seed_offset
from .ops.pooling import avg_pool2d as _avg_pool_op
from .ops.pooling import max_pool2d as _max_pool_op
from .ops.sigmoid import sigmoid as _sigmoid_op

__all__ = ["avg_pool2d", "batch_norm", "conv2d", "conv_transpose2d", "dropout", "max_pool2d", "sigmoid"]


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
    return _sigmoid_op(input)


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
    _pool.check_bool(training, "train", "dropout")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0 and not input.is_floating_point():
        # torch's p == 1 is the product with a zero of the input's dtype (an integer, bool or
        # complex input included); pyops' kernels are floating-point only
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input.mul(zero)
    _check_floating(input, "dropout")
    seed_offset = draw_seed_offset(input.device)
    return DropoutFunction.apply(input, seed_offset, float(p), bool(inplace))


def _pool_args(input, kernel_size, stride, padding, dilation, ceil_mode: bool, fn: str, max_pool: bool):
    """Pooling's argument checks, in torch's order, and (4-D input, kernel, stride, padding,
    dilation, output (H, W)); the shape-and-argument part remembered as conv's (``_geometry``)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}(): argument 'input' must be Tensor, not {type(input).__name__}")
    geometry = _geometry(_pool_geometry, input, None, None, kernel_size, stride, padding, dilation, int(ceil_mode),
                         fn, int(max_pool))
    _pool.check_dtype(input, fn)
    return (input if input.dim() == 4 else input.unsqueeze(0)), *geometry


def _pool_geometry(input: Tensor, _weight, _bias, kernel_size, stride, padding, dilation, ceil_mode: int, fn: str,
                   max_pool: int):
    """(kernel, stride, padding, dilation, out_hw) of a pooling call, from the input's shape
    and the arguments (torch's checks and errors)."""
    _pool.check_input(input, fn)
    kernel = _pool.pair(kernel_size, "kernel_size", fn)
    empty_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
    stride = kernel if empty_stride else _pool.pair(stride, "stride", fn)
    padding = _pool.pair(padding, "padding", fn)
    dilation = _pool.pair(dilation, "dilation", fn)
    out_hw = _pool.check_geometry(input, kernel, stride, padding, dilation, bool(ceil_mode), fn, bool(max_pool))
    return list(kernel), list(stride), list(padding), list(dilation), list(out_hw)


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """2-D max pooling of an (N, C, H, W) or (C, H, W) input, as torch.nn.functional.max_pool2d.

    ``stride=None`` means ``kernel_size``. With ``return_indices`` also returns int64
    indices flat in each H*W plane (what torch.nn.MaxUnpool2d takes). NaN propagates
    and ties pick the first maximum in the window, as in torch.
    """
    _pool.check_bool(ceil_mode, "ceil_mode", "max_pool2d")
    x, kernel, stride, padding, dilation, out_hw = _pool_args(input, kernel_size, stride, padding, dilation,
                                                              ceil_mode, "max_pool2d", True)
    out, indices = _max_pool_op(x, (kernel, stride, padding, dilation, ceil_mode), out_hw)
    if input.dim() == 3:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if return_indices else out


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """2-D average pooling of an (N, C, H, W) or (C, H, W) input, as torch.nn.functional.avg_pool2d.

    The divisor is ``divisor_override`` if given, else the window size counting padding
    (``count_include_pad``) or only the elements inside the input, exactly as torch.
    """
    _pool.check_bool(ceil_mode, "ceil_mode", "avg_pool2d")
    _pool.check_bool(count_include_pad, "count_include_pad", "avg_pool2d")
    divisor = 0
    if divisor_override is not None:
        divisor = _pool.as_int(divisor_override)
        if divisor is None:
            raise TypeError(f"avg_pool2d(): argument 'divisor_override' must be int, not "
                            f"{type(divisor_override).__name__}")
        if divisor == 0:
            raise RuntimeError("avg_pool2d: divisor must be not zero")
    x, kernel, stride, padding, _, out_hw = _pool_args(input, kernel_size, stride, padding, 1, ceil_mode,
                                                       "avg_pool2d", False)
    geometry = (kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    out = _avg_pool_op(x, geometry, out_hw)
    return out.squeeze(0) if input.dim() == 3 else out


def _autocast(*tensors):
    """Under torch.autocast for the tensors' device, its low-precision dtype for a conv, as torch casts.

    Returns the tensors (None stays None) cast to the autocast dtype when autocast is
    on for their device type and they are floating point; otherwise unchanged.
    """
    for t in tensors:
        if t is not None and not isinstance(t, Tensor):
            return tensors  # the argument checks say what is wrong
    if tensors[0] is None or not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """2-D convolution of an (N, C, H, W) or (C, H, W) input, as torch.nn.functional.conv2d.

    ``padding`` is an int, a pair, ``'valid'`` or ``'same'`` (stride 1; an odd total
    padding puts the extra row/column at the bottom/right, as torch does). ``weight`` is
    (out_channels, in_channels / groups, kH, kW). The output is channels_last when the
    input or the weight is.
    """
    input, weight, bias = _autocast(input, weight, bias)
    _conv.check_tensors("conv2d", input, weight, bias)
    if type(groups) is not int:
        groups = _conv.groups_arg(groups)
    unbatched, stride, pad, dilation, out_hw = _geometry(_conv2d_geometry, input, weight, bias, stride, padding,
                                                         dilation, groups)
    x = input.unsqueeze(0) if unbatched else input
    out = _conv_op(Conv2dFunction, x, weight, bias, list(stride), list(pad), list(dilation), groups,
                   list(out_hw), _conv.conv_channels_last(x, weight))
    return out.squeeze(0) if unbatched else out


def _conv2d_geometry(input: Tensor, weight: Tensor, bias, stride, padding, dilation, groups):
    """conv2d's argument checks (after check_tensors) and geometry: (unbatched, stride,
    top/left padding, dilation, output (H, W)), from shapes and arguments only."""
    unbatched = _conv.check_dims("conv2d", input, weight)
    stride, dilation = _conv.pairs(stride, dilation, "conv2d")
    pad, pad_total = _conv.conv_padding(padding, weight, stride, dilation)
    _conv.check_params(stride, pad, dilation, groups)
    x = input.unsqueeze(0) if unbatched else input
    _conv.check_groups(weight, groups)
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(weight.shape)}, expected input"
                           f"{list(x.shape)} to have {weight.shape[1] * groups} channels, but got {x.shape[1]} "
                           f"channels instead")
    _conv.check_bias(weight, bias, weight.shape[0])
    out_hw = _conv.conv_output_size(x, weight, stride, pad_total, dilation)
    _conv.check_empty_input(x)
    return unbatched, stride, pad, dilation, out_hw


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1) -> Tensor:
    """2-D transposed convolution, as torch.nn.functional.conv_transpose2d.

    ``weight`` is (in_channels, out_channels / groups, kH, kW); the output's size is
    (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1.
    """
    input, weight, bias = _autocast(input, weight, bias)
    _conv.check_tensors("conv_transpose2d", input, weight, bias)
    if type(groups) is not int:
        groups = _conv.groups_arg(groups)
    unbatched, stride, pad, dilation, out_hw = _geometry(_conv_transpose2d_geometry, input, weight, bias, stride,
                                                         padding, dilation, groups, output_padding)
    x = input.unsqueeze(0) if unbatched else input
    out = _conv_op(ConvTranspose2dFunction, x, weight, bias, list(stride), list(pad), list(dilation),
                   groups, list(out_hw), _conv.conv_channels_last(x, weight))
    return out.squeeze(0) if unbatched else out


def _conv_transpose2d_geometry(input: Tensor, weight: Tensor, bias, stride, padding, dilation, groups,
                               output_padding):
    """conv_transpose2d's checks and geometry, as _conv2d_geometry."""
    unbatched = _conv.check_dims("conv_transpose2d", input, weight)
    stride, dilation = _conv.pairs(stride, dilation, "conv_transpose2d")
    if isinstance(padding, str):
        raise TypeError("conv_transpose2d(): argument 'padding' must be tuple of ints, not str")
    pad = _pool.pair(padding, "padding", "conv_transpose2d")
    output_padding = _pool.pair(output_padding, "output_padding", "conv_transpose2d")
    _conv.check_params(stride, pad, dilation, groups, output_padding)
    x = input.unsqueeze(0) if unbatched else input
    _conv.check_groups(weight, groups)
    if x.shape[1] != weight.shape[0]:
        raise RuntimeError(f"Given transposed=1, weight of size {list(weight.shape)}, expected input{list(x.shape)} "
                           f"to have {weight.shape[0]} channels, but got {x.shape[1]} channels instead")
    if weight.shape[1] == 0:
        raise RuntimeError(f"non-empty 4D weight tensor expected, but got: {list(weight.shape)}")
    _conv.check_bias(weight, bias, weight.shape[1] * groups)
    _conv.check_empty_input(x)
    out_hw = _conv.transpose_output_size(x, weight, stride, pad, output_padding, dilation)
    return unbatched, stride, pad, dilation, out_hw


_GEOMETRIES: dict = {}
_GEOMETRIES_MAX = 4096


def _plain(value) -> bool:
    """An int, a str, None or a pair of ints, by exact type (a bool is no int here: pair()
    rejects it, and True would find 1's entry)."""
    t = type(value)
    return t is int or t is str or value is None or (t is tuple and len(value) == 2 and type(value[0]) is int
                                                     and type(value[1]) is int)


def _geometry(compute, input: Tensor, weight: Tensor, bias, *args):
    """``compute(input, weight, bias, *args)`` (checks and geometry from shapes and plain
    arguments), remembered per (shapes, arguments) in plain eager mode: a model calls each
    layer with the same ones, and the checks cost as much as a small layer's kernel.
    Arguments of other types, tracing and modes (symbolic shapes) always compute."""
    for a in args:
        if not _plain(a):
            return compute(input, weight, bias, *args)
    if not plain_eager((input, weight, bias)):
        return compute(input, weight, bias, *args)
    key = (compute, input.shape, None if weight is None else weight.shape, None if bias is None else bias.shape,
           *args)
    geometry = _GEOMETRIES.get(key)
    if geometry is None:
        geometry = compute(input, weight, bias, *args)  # raises (nothing remembered) on bad arguments
        if len(_GEOMETRIES) >= _GEOMETRIES_MAX:
            _GEOMETRIES.clear()
        _GEOMETRIES[key] = geometry
    return geometry


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training: bool, eps: float,
                          fn: str = "batch_norm", per_process: bool = False) -> None:
    """torch's checks of batch_norm's arguments, with its error types and messages.

    ``per_process``: this process holds only part of the batch (SyncBatchNorm), so one
    value per channel here is no error.
    """
    _check_batch_norm_call(input, running_mean, running_var, weight, bias, training, eps, fn, per_process)
    _check_batch_norm_tensors(input, running_mean, running_var, weight, bias, training, fn)


def _check_batch_norm_call(input, running_mean, running_var, weight, bias, training: bool, eps: float,
                           fn: str = "batch_norm", per_process: bool = False) -> None:
    """The checks torch makes of every call, an empty input's too: argument types, the batch
    size in training (torch.nn.functional's ``_verify_batch_size``) and eps."""
    _check_tensor(input, fn)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None:
            _check_tensor_arg(t, name, fn)
    if training and input.dim() and not per_process:
        size = input.shape
        if size[0] * math.prod(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    _pool.check_bool(training, "training", fn)


def _check_batch_norm_tensors(input, running_mean, running_var, weight, bias, training: bool, fn: str) -> None:
    """torch's checks of a non-empty input and of the statistics and parameters that go with it."""
    if input.dim() < 2:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-max(input.dim(), 1)}, "
                         f"{max(input.dim(), 1) - 1}], but got 1)")
    if not input.is_floating_point():
        raise NotImplementedError(f'"{fn}" not implemented for \'{str(input.dtype).replace("torch.", "")}\'')
    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        if running_var is None:
            raise RuntimeError("running_var must be defined in evaluation mode")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"The function '{fn}' is not differentiable with respect to argument '{name}'. "
                               "This input cannot have requires_grad True.")
    C, dtype = input.shape[1], input.dtype
    for t in (running_mean, running_var, weight, bias):  # the usual case, checked quickly
        if t is not None and not (isinstance(t, Tensor) and t.dtype == dtype and t.numel() == C):
            break
    else:
        return
    low = dtype in (torch.float16, torch.bfloat16)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if t.dtype != input.dtype and not (low and t.dtype == torch.float32):
            raise RuntimeError(f"{fn}: mixed dtype: {name} is {t.dtype} but input is {input.dtype}; parameters "
                               "must have the input's dtype (or float32 for a float16/bfloat16 input)")


def _check_tensor_arg(t, name: str, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(t).__name__}")


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation of an (N, C, *) input over N and the spatial dims, as torch.nn.functional.batch_norm.

    Training uses the batch's statistics (biased variance) and, when given, moves
    ``running_mean``/``running_var`` in place toward the batch mean and unbiased
    variance by ``momentum``; eval uses the running statistics. Statistics are float32
    for float16/bfloat16/float32 inputs (float64 for float64) and the output keeps the
    input's dtype and memory format.
    """
    _check_batch_norm_call(input, running_mean, running_var, weight, bias, training, eps)
    if momentum is None or isinstance(momentum, str):  # torch.batch_norm's argument parser
        raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, not "
                        f"{type(momentum).__name__}")
    if input.numel() == 0:
        return _batch_norm_of_nothing(input, weight, bias)
    _check_batch_norm_tensors(input, running_mean, running_var, weight, bias, training, "batch_norm")
    return _batch_norm(input, running_mean, running_var, weight, bias, bool(training),
                       float(momentum), float(eps))


def _batch_norm_of_nothing(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Batch norm of an empty input, as ATen defines it (``_batch_norm_impl_index``): no
    statistics (running ones untouched) and no checks of the other tensors; the output is
    the input's copy times ``weight[0]`` plus ``bias[0]``, so it has the strides and dtype
    those elementwise ops give, weight and bias get zero gradients, and a weight or bias
    without elements raises torch's IndexError. torch's copy, product and sum run here, on
    tensors with no elements: there is nothing to compute."""
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out
