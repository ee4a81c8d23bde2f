"""Window arithmetic of 2-D pooling, shared by both backends' launchers and the tests.

Argument normalisation, torch's validation (with torch's error types and messages),
the output size rule (incl. ceil_mode's "last window must start inside the input or
the left padding") and the average-pool divisor. The kernels implement the same rules
(csrc/pooling.cpp, triton_kernels/pooling.py).
"""
from __future__ import annotations

import numbers

import torch

from ._tensor import strides_like_channels_last


def as_int(value):
    """``value`` as an int where torch's argument parser takes it for one (an int, a numpy
    integer, an integer tensor of one element), else None (a bool, a float, a string...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, torch.SymInt)):
        return value
    if isinstance(value, torch.Tensor):
        integral = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        return int(value.item()) if integral and value.numel() == 1 else None
    return int(value) if isinstance(value, numbers.Integral) else None  # numpy's bool is no Integral


def check_bool(value, name: str, fn: str) -> bool:
    """torch's argument parser's bool: a bool and nothing else (not 0 or 1, None, numpy's bool)."""
    if type(value) is not bool:
        raise TypeError(f"{fn}(): argument '{name}' must be bool, not {type(value).__name__}")
    return value


def pair(value, name: str, fn: str) -> tuple[int, int]:
    """torch's ``_pair`` with its errors: an int or a sequence of one or two ints (int-like:
    ``as_int``)."""
    if type(value) is int:  # the common case first: this runs on every call
        return (value, value)
    if not isinstance(value, (tuple, list, torch.Size)):
        v = as_int(value)
        if v is not None:
            return (v, v)
        if isinstance(value, float):
            raise TypeError(f"{fn}(): argument '{name}' must be tuple of ints, but found element of type float")
        raise TypeError(f"{fn}(): argument '{name}' must be tuple of ints, not {type(value).__name__}")
    values = tuple(as_int(v) for v in value)
    for v, given in zip(values, value):
        if v is None:
            raise TypeError(f"{fn}(): argument '{name}' must be tuple of ints, but found element of type "
                            f"{type(given).__name__}")
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2 and fn.startswith("conv"):
        raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values to match the "
                           f"convolution dimensions, but got {name}={list(values)}")
    if len(values) != 2:
        what = {"kernel_size": "kernel_size must either be a single int, or a tuple of two ints",
                "stride": "stride must either be omitted, a single int, or a tuple of two ints",
                "padding": "padding must either be a single int, or a tuple of two ints",
                "dilation": "dilation must be either a single int, or a tuple of two ints"}[name]
        raise RuntimeError(f"{fn}: {what}")
    return values


def output_size(size: int, kernel: int, pad: int, stride: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape for one spatial dimension."""
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or the left padding
    return out


def check_input(input: torch.Tensor, fn: str) -> None:
    """torch's checks of a pooling input's type and shape (``check_dtype`` its dtype)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{fn}(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dim() < 3 and fn == "avg_pool2d":  # torch's avg_pool2d reads input.size(-3) first
        if input.dim() == 0:
            raise IndexError("Dimension specified as -3 but tensor has no dimensions")
        raise IndexError(f"Dimension out of range (expected to be in range of [{-input.dim()}, {input.dim() - 1}], "
                         f"but got -3)")
    ok = (input.dim() == 3 and all(s != 0 for s in input.shape)) or \
         (input.dim() == 4 and input.shape[1] != 0 and input.shape[2] != 0 and input.shape[3] != 0)
    if not ok:
        raise RuntimeError(f"{fn}: Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for "
                           f"input, but got: {list(input.shape)}")


def check_dtype(input: torch.Tensor, fn: str) -> None:
    if not input.is_floating_point():
        # NotImplementedError (a RuntimeError), as torch for dtypes it has no kernel for
        raise NotImplementedError(f"{fn}: pyops has floating-point kernels only, got input of {input.dtype}")


def check_geometry(input: torch.Tensor, kernel, stride, padding, dilation, ceil_mode: bool, fn: str,
                   max_pool: bool) -> tuple[int, int]:
    """torch's pool2d_shape_check; returns the output size (OH, OW)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if kh <= 0 or kw <= 0:
        raise RuntimeError(f"{fn}: kernel size should be greater than zero, but got kH: {kh} kW: {kw}")
    if sh <= 0 or sw <= 0:
        raise RuntimeError(f"{fn}: stride should be greater than zero, but got dH: {sh} dW: {sw}")
    if dh <= 0 or dw <= 0:
        raise RuntimeError(f"{fn}: dilation should be greater than zero, but got dilationH: {dh} dilationW: {dw}")
    if ph < 0 or pw < 0:
        raise RuntimeError(f"{fn}: pad must be non-negative, but got padH: {ph} padW: {pw}")
    if max_pool:
        if ph > ((kh - 1) * dh + 1) // 2 or pw > ((kw - 1) * dw + 1) // 2:
            raise RuntimeError(f"{fn}: pad should be at most half of effective kernel size, but got "
                               f"pad={ph if ph > ((kh - 1) * dh + 1) // 2 else pw}, kernel_size="
                               f"{kh if ph > ((kh - 1) * dh + 1) // 2 else kw} and dilation={dh}")
    elif ph > kh // 2 or pw > kw // 2:
        raise RuntimeError(f"{fn}: pad should be smaller than or equal to half of kernel size, but got "
                           f"padW = {pw}, padH = {ph}, kW = {kw}, kH = {kh}")
    H, W = input.shape[-2:]
    oh = output_size(H, kh, ph, sh, dh, ceil_mode)
    ow = output_size(W, kw, pw, sw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        c = input.shape[-3]
        raise RuntimeError(f"{fn}: Given input size: ({c}x{H}x{W}). Calculated output size: ({c}x{oh}x{ow}). "
                           "Output size is too small")
    return oh, ow


def avg_divisor(oh: int, ow: int, size, kernel, stride, padding, count_include_pad: bool,
                divisor_override: int | None) -> int:
    """torch's avg_pool2d divisor of output (oh, ow) (for tests and documentation)."""
    if divisor_override:
        return divisor_override
    (H, W), (kh, kw), (sh, sw), (ph, pw) = size, kernel, stride, padding
    hs, ws = oh * sh - ph, ow * sw - pw
    he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
    if count_include_pad:
        return (he - hs) * (we - ws)
    return (min(he, H) - max(hs, 0)) * (min(we, W) - max(ws, 0))


def is_channels_last(x: torch.Tensor) -> bool:
    """torch's suggest_memory_format for 4-D tensors is channels_last: convolution and
    pooling then run, and return, channels_last (also for a sliced channels_last view, or
    an N x 1 x H x W tensor with channels_last strides, as torch)."""
    return x.dim() == 4 and strides_like_channels_last(x)

