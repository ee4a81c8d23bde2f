"""Batch normalisation: the ``pyops::batch_norm_*`` operators, launchers and Functions.

Operators take 3-D views (N, C, L) of the input (L = product of the spatial sizes),
stored densely channel-major (NCL, e.g. NCHW) or channel-minor (NLC, channels_last);
``as_ncl`` makes that view. Statistics travel as one (3, C) tensor of (count, mean,
biased variance) rows, float32 (float64 for float64 inputs):

- ``batch_norm_stats``: a process's statistics of x, updating running stats;
- ``batch_norm_gather_stats``: merge (P, 3, C) statistics (one per process, for
  SyncBatchNorm), updating running stats;
- ``batch_norm_apply``: y = (x - mean) / sqrt(var + eps) * weight + bias;
- ``batch_norm_backward_reduce``: (sum dy, sum dy * (x - mean), grad_weight, grad_bias)
  as (4, C), the two reductions in one pass;
- ``batch_norm_backward_input``: grad_input from those sums (training) or from the
  running statistics (eval).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._dispatch import cpp_extension, select, triton_kernels
from .._library import apply_function, op, runs_cpp_eagerly
from .._tensor import format_strides, is_dense, restrided, same_order, suggests_channels_last
from ._launch import cdiv, device_guard, dividers, gpu_geometry, needs_int64, sm_count


def is_nlc(x: Tensor) -> bool:
    """Whether batch norm of ``x`` (N, C, *) runs, and returns, channel-minor: torch's channels_last rule."""
    return suggests_channels_last(x)


def as_ncl(t: Tensor, nlc: bool) -> Tensor:
    """(N, C, L) view of ``t`` in the given storage order (copying only when it is not)."""
    N, C = t.shape[0], t.shape[1]
    L = math.prod(t.shape[2:])
    t = t.movedim(1, -1).contiguous().movedim(-1, 1) if nlc else t.contiguous()
    return t.view(N, C, L)


def output_like(y3: Tensor, x: Tensor, nlc: bool) -> Tensor:
    """The kernels' (N, C, L) result as the output of input ``x``, with torch's strides: those
    of a contiguous or (channel-minor) channels_last tensor, also on size-1 dims (the view
    alone may differ there: an N x C x 1 x 1 input with channels_last strides); an empty
    input gives an empty output with ``x``'s strides, as torch (which clones an empty input)."""
    if not x.numel():
        return torch.empty_like(x)
    return restrided(y3.view(x.shape), format_strides(x.shape, nlc))


def grad_input_like(dx3: Tensor, x: Tensor) -> Tensor:
    """The kernels' (N, C, L) input gradient shaped as ``x``: with ``x``'s own strides when ``x``
    is dense in the same order (torch's ``empty_like(x)``; they differ on size-1 dims)."""
    dx = dx3.view(x.shape)
    return restrided(dx, x.stride()) if is_dense(x) and same_order(dx, x) else dx


def _nlc3(x3: Tensor) -> bool:
    """Whether an (N, C, L) view is stored channel-minor (as_ncl's views are NCL-contiguous otherwise)."""
    return not x3.is_contiguous()


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_ncl(x3: Tensor) -> Tensor:
    """An uninitialised tensor shaped and stored like ``as_ncl``'s view ``x3``."""
    N, C, L = x3.shape
    if _nlc3(x3):
        return torch.empty((N, L, C), dtype=x3.dtype, device=x3.device).permute(0, 2, 1)
    return torch.empty((N, C, L), dtype=x3.dtype, device=x3.device)


def _stats_out(x3: Tensor) -> Tensor:
    return torch.empty((3, x3.shape[1]), dtype=stats_dtype(x3.dtype), device=x3.device)


# ---------------------------------------------------------------- Triton launch shapes


def _reduce_config(x3: Tensor):
    """(config, splits, rows per split) of a per-channel reduction over the N*L rows of x3."""
    k = triton_kernels().batchnorm
    N, C, L = x3.shape
    rows = N * L
    if not gpu_geometry(x3.device):
        cfg = k.REDUCE_CONFIGS[0]
        splits = min(2, max(1, cdiv(rows, cfg.kwargs["BLOCK_R"])))  # small, but exercises the merge
    else:
        if _nlc3(x3):
            cfg = k.REDUCE_CONFIGS[3]
        else:
            cfg = k.REDUCE_CONFIGS[1] if L >= 512 else k.REDUCE_CONFIGS[2]
        blocks = cdiv(C, cfg.kwargs["BLOCK_C"])
        splits = max(1, min(cdiv(4 * sm_count(x3.device), blocks), cdiv(rows, 4 * cfg.kwargs["BLOCK_R"])))
    block_r = cfg.kwargs["BLOCK_R"]
    per = max(1, cdiv(cdiv(rows, splits), block_r)) * block_r
    return cfg, max(1, cdiv(rows, per)), per


def _merge(partials: Tensor, out: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
           momentum: float) -> None:
    if select(partials, out, running_mean, running_var) == "cpp":
        cpp_extension().batch_norm_merge_stats(partials, out, running_mean, running_var, momentum)
        return
    k = triton_kernels().batchnorm
    C = out.shape[1]
    has_running = running_mean is not None
    if has_running != (running_var is not None):
        raise RuntimeError("pyops: running_mean and running_var must both be given or both be None")
    with device_guard(out.device):
        k.merge_stats_kernel[(cdiv(C, k.MERGE_BLOCK_C),)](
            partials.contiguous(), out, running_mean if has_running else out, running_var if has_running else out,
            partials.shape[0], C, float(momentum), HAS_RUNNING=has_running, BLOCK_C=k.MERGE_BLOCK_C)


def _check_running(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise RuntimeError(f"pyops: {name} must be contiguous")


# ---------------------------------------------------------------- operators


@op("batch_norm_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) -> Tensor")
def batch_norm_stats(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     momentum: float) -> Tensor:
    """(3, C) (count, mean, biased var) of x (N, C, L) per channel; running stats updated in place."""
    _check_running(running_mean, running_var)
    out = _stats_out(x)
    if select(x) == "cpp":
        partials = cpp_extension().batch_norm_partial_stats(x, _nlc3(x))
    else:
        k = triton_kernels().batchnorm
        N, C, L = x.shape
        cfg, splits, per = _reduce_config(x)
        partials = torch.zeros((splits, 3, C), dtype=out.dtype, device=x.device)
        if x.numel() > 0:
            with device_guard(x.device):
                k.partial_stats_kernel[(cdiv(C, cfg.kwargs["BLOCK_C"]), splits)](
                    x, partials, N * L, C, L, *dividers(L), per, CHANNELS_LAST=_nlc3(x), IDX64=needs_int64(x),
                    **cfg.kwargs, num_warps=cfg.num_warps)
    _merge(partials, out, running_mean, running_var, momentum)
    return out


@batch_norm_stats.register_fake
def _(x, running_mean, running_var, momentum):
    return _stats_out(x)


@op("batch_norm_gather_stats(Tensor partials, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "float momentum) -> Tensor")
def batch_norm_gather_stats(partials: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                            momentum: float) -> Tensor:
    """Merge (P, 3, C) statistics, in order, into (3, C); running stats updated in place."""
    _check_running(running_mean, running_var)
    out = torch.empty(partials.shape[1:], dtype=partials.dtype, device=partials.device)
    _merge(partials, out, running_mean, running_var, momentum)
    return out


@batch_norm_gather_stats.register_fake
def _(partials, running_mean, running_var, momentum):
    return partials.new_empty(partials.shape[1:])


def _elementwise_tile(R: int, S: int, nlc: bool, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_S, programs) of elementwise_kernel over R rows of S elements."""
    k = triton_kernels().batchnorm
    widths = k.ELEMENTWISE_WIDTHS[nlc]
    block_s = next((w for w in widths if w >= S), widths[-1])
    block_r = max(1, (k.GPU_TILE if gpu_geometry(device) else k.INTERPRETER_TILE) // block_s)
    return block_r, block_s, cdiv(R, block_r) * cdiv(S, block_s)


def _elementwise(mode: int, u: Tensor, v: Tensor | None, mean: Tensor, var: Tensor, weight: Tensor | None,
                 bias: Tensor | None, sums: Tensor | None, count: Tensor | None, eps: float) -> Tensor:
    k = triton_kernels().batchnorm
    out = _empty_ncl(u)
    if u.numel() == 0:
        return out
    N, C, L = u.shape
    nlc = _nlc3(u)
    R, S = (N * L, C) if nlc else (N * C, L)
    block_r, block_s, programs = _elementwise_tile(R, S, nlc, u.device)
    dummy = var
    with device_guard(u.device):
        k.elementwise_kernel[(programs,)](
            u, u if v is None else v, out, mean, var, dummy if weight is None else weight,
            dummy if bias is None else bias, dummy if sums is None else sums, dummy if count is None else count,
            R, S, C, float(eps), MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, CHANNELS_LAST=nlc,
            IDX64=needs_int64(u), BLOCK_R=block_r, BLOCK_S=block_s, num_warps=4)
    return out


@op("batch_norm_apply(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor")
def batch_norm_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over x (N, C, L), per channel; same storage order."""
    if select(x, mean, var, weight, bias) == "cpp":
        y = _empty_ncl(x)
        cpp_extension().batch_norm_apply(x, y, mean, var, weight, bias, eps, _nlc3(x))
        return y
    return _elementwise(0, x, None, mean, var, weight, bias, None, None, eps)


@batch_norm_apply.register_fake
def _(x, mean, var, weight, bias, eps):
    return _empty_ncl(x)


@op("batch_norm_backward_reduce(Tensor grad_output, Tensor x, Tensor mean, Tensor var, float eps) -> Tensor")
def batch_norm_backward_reduce(grad_output: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """(4, C): sum dy, sum dy * (x - mean), grad_weight, grad_bias; statistics dtype."""
    if select(grad_output, x, mean, var) == "cpp":
        return cpp_extension().batch_norm_backward_reduce(grad_output, x, mean, var, eps, _nlc3(x)).to(
            stats_dtype(x.dtype))
    k = triton_kernels().batchnorm
    N, C, L = x.shape
    out = torch.empty((4, C), dtype=stats_dtype(x.dtype), device=x.device)
    cfg, splits, per = _reduce_config(x)
    partials = torch.zeros((splits, 2, C), dtype=out.dtype, device=x.device)
    with device_guard(x.device):
        if x.numel() > 0:
            k.grad_sums_kernel[(cdiv(C, cfg.kwargs["BLOCK_C"]), splits)](
                grad_output, x, mean, partials, N * L, C, L, *dividers(L), per, CHANNELS_LAST=_nlc3(x),
                IDX64=needs_int64(x), **cfg.kwargs, num_warps=cfg.num_warps)
        k.grad_finalize_kernel[(cdiv(C, k.MERGE_BLOCK_C),)](partials, var, out, splits, C, float(eps),
                                                             BLOCK_C=k.MERGE_BLOCK_C)
    return out


@batch_norm_backward_reduce.register_fake
def _(grad_output, x, mean, var, eps):
    return x.new_empty((4, x.shape[1]), dtype=stats_dtype(x.dtype))


@op("batch_norm_backward_input(Tensor grad_output, Tensor x, Tensor mean, Tensor var, Tensor? weight, "
    "Tensor sums, Tensor count, float eps, bool training) -> Tensor")
def batch_norm_backward_input(grad_output: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                              sums: Tensor, count: Tensor, eps: float, training: bool) -> Tensor:
    """grad_input: from the (2, C) sums (sum dy, sum dy (x - mean)) and count with batch statistics, else dy's map."""
    if select(grad_output, x, mean, var, weight, sums, count) == "cpp":
        dx = _empty_ncl(x)
        cpp_extension().batch_norm_backward_input(grad_output, x, dx, mean, var, weight, sums, count, eps, training,
                                                  _nlc3(x))
        return dx
    if training:
        return _elementwise(1, grad_output, x, mean, var, weight, None, sums.contiguous(), count, eps)
    return _elementwise(2, grad_output, None, mean, var, weight, None, None, None, eps)


@batch_norm_backward_input.register_fake
def _(grad_output, x, mean, var, weight, sums, count, eps, training):
    return _empty_ncl(x)


@op("batch_norm_train(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? weight, "
    "Tensor? bias, float momentum, float eps) -> (Tensor, Tensor)")
def batch_norm_train(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                     bias: Tensor | None, momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """The training forward as one operator: (y, (3, C) statistics); running stats updated in place.

    ``batch_norm_stats`` then ``batch_norm_apply``; the C++ backend does both in one call.
    """
    if select(x, running_mean, running_var, weight, bias) == "cpp":
        _check_running(running_mean, running_var)
        return cpp_extension().batch_norm_train_forward(x, running_mean, running_var, weight, bias, momentum, eps,
                                                        _nlc3(x))
    stats = batch_norm_stats.impl(x, running_mean, running_var, momentum)
    return batch_norm_apply.impl(x, stats[1], stats[2], weight, bias, eps), stats


@batch_norm_train.register_fake
def _(x, running_mean, running_var, weight, bias, momentum, eps):
    return _empty_ncl(x), _stats_out(x)


@op("batch_norm_backward(Tensor grad_output, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? count, "
    "float eps, bool need_input, bool need_reduce) -> (Tensor, Tensor)")
def batch_norm_backward(grad_output: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                        count: Tensor | None, eps: float, need_input: bool, need_reduce: bool) -> tuple[Tensor, Tensor]:
    """The whole backward as one operator: (grad_input, the (4, C) sums of ``batch_norm_backward_reduce``).

    ``count`` given: training (batch statistics ``mean``, ``var``); None: eval (running
    ones). A part not asked for (``need_input``, ``need_reduce``) comes back empty.
    """
    training = count is not None
    if select(grad_output, x, mean, var, weight, count) == "cpp":
        return cpp_extension().batch_norm_backward(grad_output, x, mean, var, weight, count, eps, need_input,
                                                   need_reduce, _nlc3(x))
    red = x.new_empty((0,), dtype=stats_dtype(x.dtype))
    if need_reduce or (training and need_input):
        red = batch_norm_backward_reduce.impl(grad_output, x, mean, var, eps)
    dx = x.new_empty((0,))
    if need_input:
        dx = batch_norm_backward_input.impl(grad_output, x, mean, var, weight, red[:2] if training else var,
                                            count if training else var, eps, training)
    return dx, red


@batch_norm_backward.register_fake
def _(grad_output, x, mean, var, weight, count, eps, need_input, need_reduce):
    training = count is not None
    dx = _empty_ncl(x) if need_input else x.new_empty((0,))
    red_shape = (4, x.shape[1]) if need_reduce or (training and need_input) else (0,)
    return dx, x.new_empty(red_shape, dtype=stats_dtype(x.dtype))


# ---------------------------------------------------------------- autograd


def _param_grads(ctx, red: Tensor | None, weight: Tensor | None, bias: Tensor | None, w_arg: int):
    """(grad_weight, grad_bias) from backward_reduce's rows; weight and bias are the Function's
    arguments w_arg and w_arg + 1."""
    gw = red[2].to(weight.dtype) if weight is not None and ctx.needs_input_grad[w_arg] else None
    gb = red[3].to(bias.dtype) if bias is not None and ctx.needs_input_grad[w_arg + 1] else None
    return gw, gb


class BatchNormFunction(torch.autograd.Function):
    """Batch norm over (N, C, *) with batch statistics (training) or the given running ones.

    One operator each way (``batch_norm_train`` or ``batch_norm_apply``, then
    ``batch_norm_backward``): on small layers the per-call cost, not the kernels, is
    most of the time. A backward that is differentiated again (create_graph) is
    BatchNormBackwardFunction, whose own gradient is once-differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, running_mean, running_var, weight, bias, training: bool, momentum: float,
                eps: float):
        nlc = is_nlc(x)
        x3 = as_ncl(x, nlc)
        if training:
            y3, stats = batch_norm_train(x3, running_mean, running_var, weight, bias, momentum, eps)
            count, mean, var = stats.unbind(0)
        else:
            count, mean, var = None, running_mean, running_var
            y3 = batch_norm_apply(x3, mean, var, weight, bias, eps)
        ctx.save_for_backward(x3, weight, bias, mean, var, count, x)
        ctx.meta = (nlc, eps)
        return output_like(y3, x, nlc)

    @staticmethod
    def backward(ctx, grad_output):
        x3, weight, bias, mean, var, count, x = ctx.saved_tensors
        nlc, eps = ctx.meta
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph
            dx, gw, gb = BatchNormBackwardFunction.apply(as_ncl(grad_output, nlc), as_ncl(x, nlc), weight, mean, var,
                                                         count, eps)
            red = (None, None, gw, gb)
        else:
            dx, red = batch_norm_backward(as_ncl(grad_output, nlc), x3, mean, var, weight, count, eps, need[0],
                                          need[3] or need[4])
        gw, gb = _param_grads(ctx, red, weight, bias, 3)
        return grad_input_like(dx, x) if need[0] else None, None, None, gw, gb, None, None, None


class BatchNormBackwardFunction(torch.autograd.Function):
    """Batch norm's (grad_input, grad_weight, grad_bias) as a function of (grad_output, x,
    weight), (N, C, L) views: the same kernels, and batch_norm_double_backward (csrc/batchnorm.cpp,
    tensor arithmetic) as its gradient, once-differentiable."""

    @staticmethod
    def forward(ctx, g3: Tensor, x3: Tensor, weight, mean, var, count, eps: float):
        dx, red = batch_norm_backward(g3, x3, mean, var, weight, count, eps, True, True)
        ctx.save_for_backward(g3, x3, weight, mean, var)
        ctx.eps, ctx.training = eps, count is not None
        return dx, red[2], red[3]

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        g3, x3, weight, mean, var = ctx.saved_tensors
        dg, dx, dw = cpp_extension().batch_norm_double_backward(ggx, ggw, ggb, g3, x3, weight, mean, var, ctx.eps,
                                                                ctx.training)
        return dg, dx, dw.to(weight.dtype) if weight is not None else None, None, None, None, None


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
               bias: Tensor | None, training: bool, momentum: float, eps: float) -> Tensor:
    """Batch norm with autograd, arguments already checked: ``BatchNormFunction`` or, where
    ``runs_cpp_eagerly`` says so, its C++ twin ``batch_norm_autograd`` (same kernels; it
    records its node only when a gradient is needed, and makes the (N, C, L) view with
    ``is_nlc``'s rule and ``_check_running``'s checks itself)."""
    if (running_mean is not None and not running_mean.is_contiguous()) or \
            (running_var is not None and not running_var.is_contiguous()):
        # the kernels update contiguous running statistics: a strided view's go through a copy
        stats = [None if t is None else t.contiguous() for t in (running_mean, running_var)]
        y = batch_norm(x, *stats, weight, bias, training, momentum, eps)
        for given, updated in zip((running_mean, running_var), stats):
            if given is not None and training:
                given.copy_(updated)
        return y
    if runs_cpp_eagerly((x, running_mean, running_var, weight, bias)):
        return cpp_extension().batch_norm_autograd(x, running_mean, running_var, weight, bias, training, momentum,
                                                   eps)
    return apply_function(BatchNormFunction, x, running_mean, running_var, weight, bias, training, momentum, eps)


class SyncBatchNormFunction(torch.autograd.Function):
    """Training batch norm whose statistics and gradient sums span every process of a group.

    Each process computes its (3, C) statistics with pyops' kernels; they are gathered
    with torch.distributed and merged (count-weighted) by the same merge kernel; the
    backward all-reduces the two per-channel gradient sums. grad_weight and grad_bias
    stay local, as in torch.nn.SyncBatchNorm (DDP averages them).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, running_mean, running_var, eps: float, momentum: float,
                process_group, world_size: int):
        import torch.distributed as dist

        nlc = is_nlc(x)
        x3 = as_ncl(x, nlc)
        local = batch_norm_stats(x3, None, None, 0.0)
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        stats = batch_norm_gather_stats(torch.stack(gathered), running_mean, running_var, momentum)
        count, mean, var = stats[0], stats[1], stats[2]
        y3 = batch_norm_apply(x3, mean, var, weight, bias, eps)
        ctx.save_for_backward(x3, weight, bias, mean, var, count)
        ctx.meta = (nlc, eps, x.shape, process_group)
        return output_like(y3, x, nlc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        import torch.distributed as dist

        x3, weight, bias, mean, var, count = ctx.saved_tensors
        nlc, eps, shape, process_group = ctx.meta
        dy3 = as_ncl(grad_output, nlc)
        red = batch_norm_backward_reduce(dy3, x3, mean, var, eps)
        sums = red[:2].contiguous()
        dist.all_reduce(sums, dist.ReduceOp.SUM, group=process_group)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = batch_norm_backward_input(dy3, x3, mean, var, weight, sums, count, eps,
                                           True).view(shape)
        gw, gb = _param_grads(ctx, red, weight, bias, 1)
        return dx, gw, gb, None, None, None, None, None, None
