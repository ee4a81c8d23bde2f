"""Convolution: the ``pyops::conv2d_*`` operators, their launchers and the autograd Functions.

Three operators carry all the math (C++ on CPU tensors, Triton otherwise):

- ``conv2d_forward``: y = conv(x, w) + bias;
- ``conv2d_input_grad``: conv's gradient with respect to its input, which is also
  conv_transpose2d's forward (with conv_transpose2d's bias);
- ``conv2d_weight_grad``: conv's gradient with respect to its weight;

plus ``conv2d_bias_grad`` (a per-channel sum). ``Conv2dFunction`` and
``ConvTranspose2dFunction`` combine them: conv_transpose2d's input gradient is
``conv2d_forward`` and its weight gradient ``conv2d_weight_grad`` with input and
gradient swapped. Padding is top/left; the output size is explicit (asymmetric 'same').
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .._conv import empty_like_layout
from .._dispatch import cpp_extension, select, triton_interpreted, triton_kernels
from .._library import apply_function, op, runs_cpp_eagerly
from ._launch import cdiv as _cdiv
from ._launch import device_guard, dividers, gpu_geometry, needs_int64
from ._launch import sm_count as _sm_count


def _dense(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------- Triton tile choice

_TUNED: dict[tuple, object] = {}
AUTOTUNE_MIN_FLOPS = 1 << 28   # smaller problems take the heuristic tile (tuning would cost more)


def _configs(dtype: torch.dtype):
    k = triton_kernels().conv
    return k.FP64_CONFIGS if dtype == torch.float64 else k.CONFIGS


def _heuristic(configs, device: torch.device, m: int, n: int, batch: int):
    """The largest tile whose grid still gives every SM a program (interpreter: the first, its own)."""
    if not gpu_geometry(device):
        return configs[0]
    sms = _sm_count(device)
    for cfg in reversed(configs[1:]):
        if _cdiv(m, cfg.kwargs["BLOCK_M"]) * _cdiv(n, cfg.kwargs["BLOCK_N"]) * batch >= sms:
            return cfg
    return configs[1]


def _choose(kind: str, key: tuple, dtype: torch.dtype, device: torch.device, m: int, n: int, batch: int,
            flops: int, launch):
    """Tile config for one problem: timed once per key on a GPU for large problems, else the heuristic.

    ``launch(cfg)`` runs the kernel with ``cfg`` (it must be safe to repeat). PYOPS_AUTOTUNE=0 turns
    timing off.
    """
    configs = _configs(dtype)
    if (triton_interpreted() or device.type != "cuda" or flops < AUTOTUNE_MIN_FLOPS
            or os.environ.get("PYOPS_AUTOTUNE", "1") == "0"):
        return _heuristic(configs, device, m, n, batch)
    full_key = (kind, dtype, device.index) + key
    if full_key not in _TUNED:
        from triton.testing import do_bench

        best, best_ms = None, math.inf
        for cfg in configs[1:]:
            try:
                ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=3, rep=15)
            except Exception:  # noqa: BLE001 - a config the GPU cannot run (e.g. shared memory)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _TUNED[full_key] = best or _heuristic(configs, device, m, n, batch)
    return _TUNED[full_key]


def _launch_opts(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, UPCAST=triton_interpreted())


# ---------------------------------------------------------------- Triton launchers


def _forward_triton(x, w, bias, y, stride, padding, dilation, groups):
    k = triton_kernels().conv
    N, _, H, W = x.shape
    K, Cg, R, S = w.shape
    OH, OW = y.shape[2:]
    Kg, M = K // groups, N * OH * OW
    idx64 = needs_int64(x, w, y)

    def launch(cfg):
        grid = (_cdiv(M, cfg.kwargs["BLOCK_M"]), _cdiv(Kg, cfg.kwargs["BLOCK_N"]), groups)
        k.conv2d_forward_kernel[grid](x, w, bias if bias is not None else y, y, N, H, W, OH, OW, Cg, Kg,
                                      *x.stride(), *w.stride(), *y.stride(), R, S, *stride, *padding, *dilation,
                                      HAS_BIAS=bias is not None, IDX64=idx64, **_launch_opts(cfg))

    key = (tuple(x.shape), tuple(w.shape), x.stride(), tuple(stride), tuple(padding), tuple(dilation), groups)
    with device_guard(x.device):
        launch(_choose("fwd", key, x.dtype, x.device, M, Kg, groups, 2 * M * K * Cg * R * S, launch))


def _input_grad_triton(dy, w, bias, dx, stride, padding, dilation, groups):
    k = triton_kernels().conv
    N, _, H, W = dx.shape
    K, Cg, R, S = w.shape
    OH, OW = dy.shape[2:]
    Kg = K // groups
    SH, SW = stride
    HQ, WQ = _cdiv(H, SH), _cdiv(W, SW)
    M = N * HQ * WQ
    steps = (SH // math.gcd(SH, dilation[0]), SW // math.gcd(SW, dilation[1]))
    idx64 = needs_int64(dy, w, dx)

    def launch(cfg):
        grid = (_cdiv(M, cfg.kwargs["BLOCK_M"]), _cdiv(Cg, cfg.kwargs["BLOCK_N"]), groups * SH * SW)
        k.conv2d_dgrad_kernel[grid](dy, w, bias if bias is not None else dx, dx, N, H, W, OH, OW, Cg, Kg, HQ, WQ,
                                    *dy.stride(), *w.stride(), *dx.stride(), R, S, *stride, *padding, *dilation,
                                    *steps, HAS_BIAS=bias is not None, IDX64=idx64, **_launch_opts(cfg))

    key = (tuple(dx.shape), tuple(w.shape), dy.stride(), tuple(stride), tuple(padding), tuple(dilation), groups)
    with device_guard(dx.device):
        flops = 2 * N * OH * OW * K * Cg * R * S
        launch(_choose("dgrad", key, dx.dtype, dx.device, M, Cg, groups * SH * SW, flops, launch))


def wgrad_splits(tiles: int, pixels: int, block_k: int, device: torch.device) -> int:
    """How many chunks the weight gradient's N*OH*OW reduction is split into (split-K)."""
    if not gpu_geometry(device):
        return max(1, min(2, _cdiv(pixels, block_k)))  # small, but exercises the split path
    want = _cdiv(2 * _sm_count(device), tiles)
    return max(1, min(want, pixels // (8 * block_k), 64))


def _weight_grad_triton(dy, x, dw, stride, padding, dilation, groups):
    k = triton_kernels().conv
    N, _, H, W = x.shape
    K, Cg, R, S = dw.shape
    OH, OW = dy.shape[2:]
    Kg, P = K // groups, N * OH * OW
    acc_dtype = torch.float64 if dw.dtype == torch.float64 else torch.float32
    idx64 = needs_int64(dy, x)

    def launch(cfg):
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        tiles = _cdiv(Kg, bm) * R * S * _cdiv(Cg, bn) * groups
        split = wgrad_splits(tiles, P, bk, dw.device)
        p_split = _cdiv(_cdiv(P, split), bk) * bk
        split = _cdiv(P, p_split)
        ws = dw if split == 1 and dw.dtype == acc_dtype else \
            torch.empty((split, K, Cg, R, S), dtype=acc_dtype, device=dw.device)
        grid = (_cdiv(Kg, bm), R * S * _cdiv(Cg, bn), groups * split)
        k.conv2d_wgrad_kernel[grid](dy, x, ws, N, H, W, OH, OW, *dividers(OW, OH), Cg, Kg, K, split, p_split,
                                    *dy.stride(), *x.stride(), R, S, *stride, *padding, *dilation,
                                    IDX64=idx64 or needs_int64(ws), **_launch_opts(cfg))
        if ws is not dw:
            _sum_splits(ws, dw, split)

    key = (tuple(x.shape), tuple(dw.shape), x.stride(), tuple(stride), tuple(padding), tuple(dilation), groups)
    with device_guard(dw.device):
        launch(_choose("wgrad", key, dw.dtype, dw.device, Kg, R * S * Cg, groups, 2 * P * K * Cg * R * S, launch))


def _sum_splits(ws: Tensor, out: Tensor, split: int) -> None:
    k = triton_kernels().conv
    numel = out.numel()
    block = 1024 if gpu_geometry(out.device) else 128
    k.sum_splits_kernel[(_cdiv(numel, block),)](ws, out, numel, split, BLOCK=block)


def _bias_grad_triton(dy: Tensor, out: Tensor) -> None:
    k = triton_kernels().conv
    N, K, H, W = dy.shape
    cl = dy.stride(1) == 1 and K > 1
    sgp = K if cl else 1
    gpu = gpu_geometry(dy.device)
    block_c, block_p = (32, 64) if gpu else (16, 16)
    # enough (channel block, image chunk) programs for every SM
    chunks = min(N, max(1, _cdiv(4 * _sm_count(dy.device), _cdiv(K, block_c)))) if gpu else 1
    n_per = _cdiv(N, chunks)
    chunks = _cdiv(N, n_per)
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    partial = torch.empty((chunks, K), dtype=acc_dtype, device=dy.device)
    with device_guard(dy.device):
        k.channel_sum_kernel[(_cdiv(K, block_c), chunks)](dy, partial, N, K, H * W, n_per, dy.stride(0),
                                                          dy.stride(1), sgp, BLOCK_C=block_c, BLOCK_P=block_p)
        _sum_splits(partial, out, chunks)


# ---------------------------------------------------------------- operators


@op("conv2d_forward(Tensor x, Tensor w, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, "
    "SymInt[] out_hw, bool channels_last) -> Tensor")
def conv2d_forward(x: Tensor, w: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int, out_hw: list[int], channels_last: bool) -> Tensor:
    """y = conv2d(x, w) + bias for a 4-D x; padding is top/left, out_hw the output's (H, W)."""
    y = empty_like_layout([x.shape[0], w.shape[0], *out_hw], x, channels_last)
    if y.numel() == 0:
        return y
    if x.numel() == 0:  # no input channels or pixels: only the bias
        return y.zero_() if bias is None else y.copy_(bias.view(1, -1, 1, 1).expand_as(y))
    x, w = _dense(x, channels_last), w.contiguous()
    if select(x, w) == "cpp":
        cpp_extension().conv2d_forward(x, w, bias, y, stride, padding, dilation, groups, channels_last)
    else:
        _forward_triton(x, w, bias, y, stride, padding, dilation, groups)
    return y


@conv2d_forward.register_fake
def _(x, w, bias, stride, padding, dilation, groups, out_hw, channels_last):
    return empty_like_layout([x.shape[0], w.shape[0], *out_hw], x, channels_last)


@op("conv2d_input_grad(Tensor grad, Tensor w, Tensor? bias, SymInt[] input_size, int[] stride, int[] padding, "
    "int[] dilation, int groups, bool channels_last) -> Tensor")
def conv2d_input_grad(grad: Tensor, w: Tensor, bias: Tensor | None, input_size: list[int], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, channels_last: bool) -> Tensor:
    """conv2d's gradient w.r.t. an input of ``input_size`` (+ bias: conv_transpose2d's forward)."""
    dx = empty_like_layout(input_size, grad, channels_last)
    if dx.numel() == 0:
        return dx
    if grad.numel() == 0:
        return dx.zero_() if bias is None else dx.copy_(bias.view(1, -1, 1, 1).expand_as(dx))
    grad, w = _dense(grad, channels_last), w.contiguous()
    if select(grad, w) == "cpp":
        cpp_extension().conv2d_input_grad(grad, w, bias, dx, stride, padding, dilation, groups, channels_last)
    else:
        _input_grad_triton(grad, w, bias, dx, stride, padding, dilation, groups)
    return dx


@conv2d_input_grad.register_fake
def _(grad, w, bias, input_size, stride, padding, dilation, groups, channels_last):
    return empty_like_layout(input_size, grad, channels_last)


@op("conv2d_weight_grad(Tensor grad, Tensor x, SymInt[] weight_size, int[] stride, int[] padding, "
    "int[] dilation, int groups, bool channels_last) -> Tensor")
def conv2d_weight_grad(grad: Tensor, x: Tensor, weight_size: list[int], stride: list[int], padding: list[int],
                       dilation: list[int], groups: int, channels_last: bool) -> Tensor:
    """conv2d's gradient w.r.t. a weight of ``weight_size``: sum over images and pixels."""
    dw = torch.empty(weight_size, dtype=grad.dtype, device=grad.device)
    if dw.numel() == 0:
        return dw
    if grad.numel() == 0 or x.numel() == 0:
        return dw.zero_()
    grad, x = _dense(grad, channels_last), _dense(x, channels_last)
    if select(grad, x) == "cpp":
        cpp_extension().conv2d_weight_grad(grad, x, dw, stride, padding, dilation, groups, channels_last)
    else:
        _weight_grad_triton(grad, x, dw, stride, padding, dilation, groups)
    return dw


@conv2d_weight_grad.register_fake
def _(grad, x, weight_size, stride, padding, dilation, groups, channels_last):
    return grad.new_empty(weight_size)


@op("conv2d_bias_grad(Tensor grad, bool channels_last) -> Tensor")
def conv2d_bias_grad(grad: Tensor, channels_last: bool) -> Tensor:
    """Sum of ``grad`` over images and pixels, per channel."""
    out = torch.empty(grad.shape[1], dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    if grad.numel() == 0:
        return out.zero_()
    grad = _dense(grad, channels_last)
    if select(grad) == "cpp":
        cpp_extension().channel_sum(grad, out, channels_last)
    else:
        _bias_grad_triton(grad, out)
    return out


@conv2d_bias_grad.register_fake
def _(grad, channels_last):
    return grad.new_empty(grad.shape[1])


# ---------------------------------------------------------------- autograd


class Conv2dFunction(torch.autograd.Function):
    """conv2d of a 4-D input: forward and all three gradients from pyops' operators.

    The gradients are Functions of this family too (conv's input gradient is
    ConvTranspose2dFunction, its weight gradient ConvWeightGradFunction), so gradients
    taken with ``create_graph`` differentiate again, to any order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias, stride, padding, dilation, groups, out_hw, channels_last):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, groups, channels_last)
        ctx.has_bias = bias is not None
        return conv2d_forward(x, w, bias, stride, padding, dilation, groups, out_hw, channels_last)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return _backward(ctx, grad, x, w, ConvTranspose2dFunction, (grad, x))


class ConvTranspose2dFunction(torch.autograd.Function):
    """conv_transpose2d of a 4-D input: conv2d's input gradient, with conv2d's ops as its gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias, stride, padding, dilation, groups, out_hw, channels_last):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, groups, channels_last)
        ctx.has_bias = bias is not None
        out_size = [x.shape[0], w.shape[1] * groups, *out_hw]
        return conv2d_input_grad(x, w, bias, out_size, stride, padding, dilation, groups,
                                 channels_last)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        # the transposed conv's output plays conv's input, its input conv's output gradient
        return _backward(ctx, grad, x, w, Conv2dFunction, (x, grad))


def _backward(ctx, grad: Tensor, x: Tensor, w: Tensor, input_function, weight_args: tuple) -> tuple:
    """Both Functions' gradients: ``input_function`` (the other direction) on the gradient
    for x, ConvWeightGradFunction on ``weight_args`` = (conv output gradient, conv input)
    for w, the per-channel sum for the bias."""
    stride, padding, dilation, groups, cl = ctx.conf
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = apply_function(input_function, grad, w, None, stride, padding, dilation, groups, list(x.shape[2:]), cl)
    if ctx.needs_input_grad[1]:
        gw = apply_function(ConvWeightGradFunction, *weight_args, list(w.shape), ctx.conf)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = apply_function(ChannelSumFunction, grad, cl)
    return gx, gw, gb, None, None, None, None, None, None


class ConvWeightGradFunction(torch.autograd.Function):
    """conv2d's weight gradient as a function of (output gradient ``dy``, input ``x``).

    Bilinear: with respect to dy it is conv2d of x by the incoming weight-shaped
    gradient, with respect to x the transposed conv of dy by it. ``conf`` is
    (stride, padding, dilation, groups, channels_last).
    """

    @staticmethod
    def forward(ctx, dy: Tensor, x: Tensor, weight_size: list[int], conf):
        ctx.save_for_backward(dy, x)
        ctx.conf = conf
        return conv2d_weight_grad(dy, x, weight_size, *conf)

    @staticmethod
    def backward(ctx, gg: Tensor):
        dy, x = ctx.saved_tensors
        stride, padding, dilation, groups, cl = ctx.conf
        d_dy = d_x = None
        if ctx.needs_input_grad[0]:
            d_dy = apply_function(Conv2dFunction, x, gg, None, stride, padding, dilation, groups,
                                  list(dy.shape[2:]), cl)
        if ctx.needs_input_grad[1]:
            d_x = apply_function(ConvTranspose2dFunction, dy, gg, None, stride, padding, dilation, groups,
                                 list(x.shape[2:]), cl)
        return d_dy, d_x, None, None


class ChannelSumFunction(torch.autograd.Function):
    """Per-channel sum of an (N, C, H, W) gradient (the bias gradient); its gradient broadcasts back."""

    @staticmethod
    def forward(ctx, grad: Tensor, channels_last: bool):
        ctx.shape = grad.shape
        return conv2d_bias_grad(grad, channels_last)

    @staticmethod
    def backward(ctx, gg: Tensor):
        return gg.view(1, -1, 1, 1).expand(ctx.shape), None


def conv(function: type[torch.autograd.Function], x: Tensor, w: Tensor, bias: Tensor | None, stride: list[int],
         padding: list[int], dilation: list[int], groups: int, out_hw: list[int], channels_last: bool) -> Tensor:
    """``Conv2dFunction`` or ``ConvTranspose2dFunction`` on checked 4-D arguments or, where
    ``runs_cpp_eagerly`` says so (and x, w are not empty), the C++ entry ``conv2d_autograd``:
    its node when a gradient is needed, else the kernels directly."""
    if x.numel() and w.numel() and runs_cpp_eagerly((x, w, bias)):
        return cpp_extension().conv2d_autograd(x, w, bias, stride, padding, dilation, groups, out_hw, channels_last,
                                               function is ConvTranspose2dFunction)
    return apply_function(function, x, w, bias, stride, padding, dilation, groups, out_hw, channels_last)
