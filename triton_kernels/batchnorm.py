"""Batch normalisation: per-channel moments, their merge, normalisation and gradients.

Inputs are 3-D views (N, C, L) stored densely channel-major (NCL: NCHW flattened) or
channel-minor (NLC: channels_last, CHANNELS_LAST); row r of a channel is element
(n, l) = (r // L, r % L) of the N * L it reduces over.

The reductions run on a grid of (channel blocks, splits of the rows): each program
walks its rows in (BLOCK_R, BLOCK_C) tiles and writes one partial result per channel,
so large N * L is spread over many programs. Moments are (count, mean, biased
variance), each tile's mean and squared deviations taken from the tile itself and
merged with Chan et al.'s pairwise update (no E[x^2] - E[x]^2 cancellation). The
merge kernel combines partials in a fixed order: those of one process, or those
gathered from all processes (SyncBatchNorm). csrc/batchnorm.cpp computes the same.
"""
import triton
import triton.language as tl

from .common import to_opmath

# (BLOCK_R, BLOCK_C) reduction tiles: channel-major wants long rows, channel-minor wide channels.
REDUCE_CONFIGS = [
    triton.Config({"BLOCK_R": 16, "BLOCK_C": 4}, num_warps=4),     # interpreter
    triton.Config({"BLOCK_R": 1024, "BLOCK_C": 1}, num_warps=4),   # NCL, long rows
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 16}, num_warps=4),    # NCL, short rows
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 64}, num_warps=4),    # NLC
]
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 256}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=4),
]
MERGE_BLOCK_C = 64

APPLY: tl.constexpr = tl.constexpr(0)          # y = (x - mean) * invstd * w + b
BACKWARD_TRAIN: tl.constexpr = tl.constexpr(1)  # dx with batch statistics
BACKWARD_EVAL: tl.constexpr = tl.constexpr(2)   # dx with running statistics


@triton.jit
def _invstd(var, eps):
    """1 / sqrt(var + eps), correctly rounded sqrt (fp32 sqrt is approximate by default; fp64's is exact)."""
    v = var + tl.full((), eps, tl.float64).to(var.dtype)
    if v.dtype == tl.float64:
        r = tl.sqrt(v)
    else:
        r = tl.sqrt_rn(v)
    return 1.0 / r


@triton.jit
def _tile(ptr, rows, offs_c, R, C, L, CHANNELS_LAST: tl.constexpr):
    """Load the (BLOCK_R, BLOCK_C) tile of rows x channels in opmath, its mask too."""
    mask = (rows[:, None] < R) & (offs_c[None, :] < C)
    if CHANNELS_LAST:
        offs = rows[:, None] * C + offs_c[None, :]
    else:
        n = rows // L
        offs = (n * C * L + rows - n * L)[:, None] + offs_c[None, :] * L
    return to_opmath(tl.load(ptr + offs, mask=mask, other=0.0)), mask


@triton.jit
def _row_range(R, R_PER, IDX64: tl.constexpr):
    start = tl.program_id(1) * R_PER
    if IDX64:
        start = start.to(tl.int64)
    return start, tl.minimum(start + R_PER, R)


@triton.jit
def partial_stats_kernel(x_ptr, part_ptr, R, C, L, R_PER, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[split, :, c] = (count, mean, biased var) of channel c over rows [split * R_PER, ...)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    start, end = _row_range(R, R_PER, IDX64)
    acc_ty = part_ptr.dtype.element_ty
    count = tl.zeros((BLOCK_C,), acc_ty)
    mean = tl.zeros((BLOCK_C,), acc_ty)
    m2 = tl.zeros((BLOCK_C,), acc_ty)
    # Shift by the program's first row: x - pivot is exact for x near pivot (Sterbenz), so
    # the tile means and deltas below are O(std) numbers, not O(mean) ones whose float32
    # rounding (mean 1e4: 6e-4) would leak into the variance through the merges.
    first, _ = _tile(x_ptr, start + tl.arange(0, 1), offs_c, end, C, L, CHANNELS_LAST)
    pivot = tl.sum(first.to(acc_ty), axis=0)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        x, mask = _tile(x_ptr, rows, offs_c, end, C, L, CHANNELS_LAST)
        x = tl.where(mask, x.to(acc_ty) - pivot[None, :], 0.0)
        nb = tl.sum(mask.to(acc_ty), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(nb, 1.0)
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        total = count + nb
        delta = tile_mean - mean
        frac = nb / tl.maximum(total, 1.0)
        mean += delta * frac
        m2 += tile_m2 + delta * delta * count * frac
        count = total
    c_ok = offs_c < C
    base = part_ptr + tl.program_id(1) * 3 * C + offs_c
    tl.store(base, count, mask=c_ok)
    tl.store(base + C, pivot + mean, mask=c_ok)
    tl.store(base + 2 * C, m2 / tl.maximum(count, 1.0), mask=c_ok)


@triton.jit
def merge_stats_kernel(part_ptr, out_ptr, rm_ptr, rv_ptr, P, C, momentum: tl.float64,
                       HAS_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = merged (count, mean, biased var) of the P partials (P, 3, C), in order.

    With HAS_RUNNING, running_mean/var (C,) move toward the batch mean and unbiased
    variance by `momentum`, where the count is not 0 (as torch leaves them otherwise).
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc_ty = out_ptr.dtype.element_ty
    count = tl.zeros((BLOCK_C,), acc_ty)
    mean = tl.zeros((BLOCK_C,), acc_ty)
    m2 = tl.zeros((BLOCK_C,), acc_ty)
    for p in range(0, P):
        base = part_ptr + p * 3 * C + offs_c
        nb = tl.load(base, mask=c_ok, other=0.0).to(acc_ty)
        mb = tl.load(base + C, mask=c_ok, other=0.0).to(acc_ty)
        vb = tl.load(base + 2 * C, mask=c_ok, other=0.0).to(acc_ty)
        total = count + nb
        delta = mb - mean
        frac = nb / tl.maximum(total, 1.0)
        mean += delta * frac
        m2 += vb * nb + delta * delta * count * frac
        count = total
    tl.store(out_ptr + offs_c, count, mask=c_ok)
    tl.store(out_ptr + C + offs_c, mean, mask=c_ok)
    tl.store(out_ptr + 2 * C + offs_c, m2 / tl.maximum(count, 1.0), mask=c_ok)
    if HAS_RUNNING:
        m = tl.full((), momentum, tl.float64).to(acc_ty)
        upd = c_ok & (count > 0)
        rm = tl.load(rm_ptr + offs_c, mask=upd, other=0.0)
        rv = tl.load(rv_ptr + offs_c, mask=upd, other=0.0)
        unbiased = m2 / (count - 1.0)
        tl.store(rm_ptr + offs_c, ((1.0 - m) * rm.to(acc_ty) + m * mean).to(rm.dtype), mask=upd)
        tl.store(rv_ptr + offs_c, ((1.0 - m) * rv.to(acc_ty) + m * unbiased).to(rv.dtype), mask=upd)


@triton.jit
def grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, part_ptr, R, C, L, R_PER, CHANNELS_LAST: tl.constexpr,
                     IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[split, :, c] = (sum dy, sum dy * (x - mean)) over the split's rows: both in one pass."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    start, end = _row_range(R, R_PER, IDX64)
    acc_ty = part_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(acc_ty)
    s_dy = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    s_dyx = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        g, _ = _tile(dy_ptr, rows, offs_c, end, C, L, CHANNELS_LAST)
        x, mask = _tile(x_ptr, rows, offs_c, end, C, L, CHANNELS_LAST)
        g = g.to(acc_ty)
        s_dy += g
        s_dyx += tl.where(mask, g * (x.to(acc_ty) - mean[None, :]), 0.0)
    base = part_ptr + tl.program_id(1) * 2 * C + offs_c
    tl.store(base, tl.sum(s_dy, axis=0), mask=c_ok)
    tl.store(base + C, tl.sum(s_dyx, axis=0), mask=c_ok)


@triton.jit
def grad_finalize_kernel(part_ptr, var_ptr, out_ptr, P, C, eps: tl.float64, BLOCK_C: tl.constexpr):
    """out (4, C) = (sum dy, sum dy (x - mean), grad_weight, grad_bias) from P partials, in order."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc_ty = out_ptr.dtype.element_ty
    s_dy = tl.zeros((BLOCK_C,), acc_ty)
    s_dyx = tl.zeros((BLOCK_C,), acc_ty)
    for p in range(0, P):
        s_dy += tl.load(part_ptr + p * 2 * C + offs_c, mask=c_ok, other=0.0)
        s_dyx += tl.load(part_ptr + p * 2 * C + C + offs_c, mask=c_ok, other=0.0)
    var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0).to(acc_ty)
    invstd = _invstd(var, eps)
    tl.store(out_ptr + offs_c, s_dy, mask=c_ok)
    tl.store(out_ptr + C + offs_c, s_dyx, mask=c_ok)
    tl.store(out_ptr + 2 * C + offs_c, s_dyx * invstd, mask=c_ok)
    tl.store(out_ptr + 3 * C + offs_c, s_dy, mask=c_ok)


@triton.jit
def elementwise_kernel(u_ptr, v_ptr, out_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sums_ptr, count_ptr,
                       total, C, L, eps: tl.float64, MODE: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One per-channel map over dense (N, C, L) storage, by MODE:

    APPLY: out = (u - mean) * invstd * w + b, u = x;
    BACKWARD_TRAIN: out = (u - sum_dy / M - (v - mean) * invstd^2 * sum_dy_xmu / M) * invstd * w,
    u = dy, v = x, M = count, sums = (sum_dy, sum_dy_xmu);
    BACKWARD_EVAL: out = u * invstd * w, u = dy.
    """
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    if CHANNELS_LAST:
        c = offs % C
    else:
        c = (offs // L) % C
    u = to_opmath(tl.load(u_ptr + offs, mask=mask, other=0.0))
    ty = u.dtype
    var = tl.load(var_ptr + c, mask=mask, other=1.0).to(ty)
    invstd = _invstd(var, eps)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask, other=1.0).to(ty)
    if MODE == 0:
        mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(ty)
        out = (u - mean) * scale
        if HAS_B:
            out += tl.load(b_ptr + c, mask=mask, other=0.0).to(ty)
    elif MODE == 1:
        mean = tl.load(mean_ptr + c, mask=mask, other=0.0).to(ty)
        x = to_opmath(tl.load(v_ptr + offs, mask=mask, other=0.0)).to(ty)
        n = tl.load(count_ptr + c, mask=mask, other=1.0).to(ty)
        s_dy = tl.load(sums_ptr + c, mask=mask, other=0.0).to(ty)
        s_dyx = tl.load(sums_ptr + C + c, mask=mask, other=0.0).to(ty)
        out = (u - s_dy / n - (x - mean) * (invstd * invstd * s_dyx / n)) * scale
    else:
        out = u * scale
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
