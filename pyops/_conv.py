"""Convolution geometry and torch's argument checks, shared by conv2d and conv_transpose2d.

The kernels take top/left padding and an explicit output size, so torch's asymmetric
``padding='same'`` (the extra row/column goes bottom/right) needs no padded copy.
Error types and messages follow torch's (ATen's ConvUtils.h / Convolution.cpp).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._pool import as_int, is_channels_last, pair


def check_tensors(fn: str, input, weight, bias) -> None:
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{fn}(): argument 'bias' must be Tensor, not {type(bias).__name__}")
    for name, t in (("Input", input), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            # NotImplementedError (a RuntimeError) is what torch raises for dtypes it has no kernel for
            raise NotImplementedError(f"{fn}: pyops has floating-point kernels only, got {name} of {t.dtype}")
    if input.dtype != weight.dtype:
        raise RuntimeError(f"Input type ({input.dtype}) and weight type ({weight.dtype}) should be the same")
    if bias is not None and bias.dtype != input.dtype:
        raise RuntimeError(f"Input type ({input.dtype}) and bias type ({bias.dtype}) should be the same")
    device = input.device
    if weight.device == device and (bias is None or bias.device == device):
        return
    devices = {t.device for t in (input, weight, bias) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{', '.join(sorted(map(str, devices)))}!")


def check_dims(fn: str, input: Tensor, weight: Tensor) -> bool:
    """torch's rank checks; returns whether the input is unbatched (C, H, W)."""
    if input.dim() not in (3, 4):
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to {fn}, but got input of size: "
                           f"{list(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"Expected 4-dimensional weight for 4-dimensional input {list(input.shape)}, "
                           f"but got {weight.dim()}-dimensional weight of size {list(weight.shape)} instead")
    return input.dim() == 3


def check_params(stride, padding, dilation, groups, output_padding=(0, 0)) -> None:
    if any(s <= 0 for s in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(p < 0 for p in padding):
        raise RuntimeError("negative padding is not supported")
    if any(p < 0 for p in output_padding):
        raise RuntimeError("negative output_padding is not supported")
    if any(d <= 0 for d in dilation):
        raise RuntimeError("dilation should be greater than zero")
    if type(groups) is not int:
        raise TypeError(f"groups must be int, not {type(groups).__name__}")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")


def groups_arg(groups) -> int:
    """``groups`` as an int (int-like: ``_pool.as_int``), else torch's TypeError."""
    value = as_int(groups)
    if value is None:
        raise TypeError(f"groups must be int, not {type(groups).__name__}")
    return value


def check_groups(weight: Tensor, groups: int, dim: int = 0) -> None:
    if weight.shape[dim] < groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be at least {groups} at dimension {dim}, "
                           f"but got weight of size {list(weight.shape)} instead")
    if weight.shape[dim] % groups != 0:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} at dimension {dim}, "
                           f"but got weight of size {list(weight.shape)} instead")


def check_bias(weight: Tensor, bias, channels: int) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != channels):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with "
                           f"{channels} elements, but got bias of size {list(bias.shape)} instead")


def check_empty_input(x: Tensor) -> None:
    """torch convolves an empty input only when its batch or its channels are empty (an
    empty plane with images and channels is an error, ATen's select_conv_backend)."""
    if x.numel() == 0 and x.shape[0] != 0 and x.shape[1] != 0:
        raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but got input shape: "
                           f"{list(x.shape)}")


def conv_padding(padding, weight: Tensor, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(top/left padding, total padding) per spatial dim for an int, pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if any(s != 1 for s in stride):
                raise RuntimeError("padding='same' is not supported for strided convolutions")
            total = tuple(d * (k - 1) for d, k in zip(dilation, weight.shape[2:]))
            return (total[0] // 2, total[1] // 2), total
        raise RuntimeError(f"Invalid padding string: '{padding}'")
    pad = pair(padding, "padding", "conv2d")
    return pad, (2 * pad[0], 2 * pad[1])


def conv_output_size(input: Tensor, weight: Tensor, stride, pad_total, dilation) -> tuple[int, int]:
    """The output's (H, W), with torch's error when the kernel outgrows the padded input."""
    padded = [input.shape[2 + i] + pad_total[i] for i in range(2)]
    extent = [dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
    if any(e > p for e, p in zip(extent, padded)):
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
                           f"Kernel size: ({extent[0]} x {extent[1]}). "
                           f"Kernel size can't be greater than actual input size")
    return tuple((padded[i] - extent[i]) // stride[i] + 1 for i in range(2))


def transpose_output_size(input: Tensor, weight: Tensor, stride, padding, output_padding, dilation):
    """conv_transpose2d's output (H, W): (in - 1) * stride - 2 * pad + dil * (k - 1) + output_padding + 1.

    A size of 0 is an error, as in torch's reference kernel, except for an empty input (no
    images or no channels), whose empty output torch returns; a negative size always is."""
    for op, s, d in zip(output_padding, stride, dilation):
        if op >= s and op >= d:
            raise RuntimeError(
                f"output padding must be smaller than either stride or dilation, but got output_padding_height: "
                f"{output_padding[0]} output_padding_width: {output_padding[1]} stride_height: {stride[0]} "
                f"stride_width: {stride[1]} dilation_height: {dilation[0]} dilation_width: {dilation[1]}")
    out = tuple((input.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1)
                + output_padding[i] + 1 for i in range(2))
    if any(o < 0 or (o == 0 and input.numel() > 0) for o in out):
        raise RuntimeError(f"Given input size per channel: ({input.shape[2]} x {input.shape[3]}). "
                           f"Calculated output size per channel: ({out[0]} x {out[1]}). Output size is too small")
    return out


def conv_channels_last(input: Tensor, weight: Tensor) -> bool:
    """torch's layout rule for convolutions: channels_last output if the input or the weight is,
    except float64 on CUDA, which torch computes contiguous (cuDNN's rule,
    ``cudnn_conv_suggest_memory_format``; its depthwise kernel then takes a contiguous copy too).
    The CPU's float64 convolution keeps channels_last, as its other dtypes."""
    if input.dtype == torch.float64 and input.is_cuda:
        return False
    return is_channels_last(input) or is_channels_last(weight)


def pairs(stride, dilation, fn: str):
    return pair(stride, "stride", fn), pair(dilation, "dilation", fn)


def empty_like_layout(shape, like: Tensor, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
