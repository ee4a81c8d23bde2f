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

from .common import divmod_by, to_opmath

# (BLOCK_R, BLOCK_C) reduction tiles: channel-major wants long rows, channel-minor wide channels.
# MAGIC_DIV: channel-major rows find their image by common.divmod_by rather than `//`. Long
# rows keep `//`: when L is a multiple of 16 (as the JIT sees), Triton divides once per 16
# rows and loads them as vectors, which a multiply-shift division would hide from it.
REDUCE_CONFIGS = [
    triton.Config({"BLOCK_R": 16, "BLOCK_C": 4, "MAGIC_DIV": True}, num_warps=4),     # interpreter
    triton.Config({"BLOCK_R": 1024, "BLOCK_C": 1, "MAGIC_DIV": False}, num_warps=4),  # NCL, long rows
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 16, "MAGIC_DIV": True}, num_warps=4),    # NCL, short rows
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 64, "MAGIC_DIV": False}, num_warps=4),   # NLC
]
# elementwise_kernel's (BLOCK_R, BLOCK_S) tiles: BLOCK_S is the smallest of these at least the
# row length (NCL: L, channels_last: C), BLOCK_R fills the tile; the interpreter's tiles hold
# INTERPRETER_TILE elements, a GPU's GPU_TILE.
ELEMENTWISE_WIDTHS = {False: (16, 64, 256, 1024), True: (16, 64, 256)}
GPU_TILE = 2048
INTERPRETER_TILE = 256
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
def _tile(ptr, rows, offs_c, R, C, L, L_magic, L_shift, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
          MAGIC_DIV: tl.constexpr):
    """Load the (BLOCK_R, BLOCK_C) tile of rows x channels in opmath, its mask too.

    Channel-major rows are divided by L with (L_magic, L_shift) when MAGIC_DIV (common.divmod_by)."""
    mask = (rows[:, None] < R) & (offs_c[None, :] < C)
    if CHANNELS_LAST:
        offs = rows[:, None] * C + offs_c[None, :]
    else:
        if MAGIC_DIV:
            n, l = divmod_by(rows, L, L_magic, L_shift, IDX64)
        else:
            n = rows // L
            l = rows - n * L
        offs = (n * C * L + l)[:, None] + offs_c[None, :] * L
    return to_opmath(tl.load(ptr + offs, mask=mask, other=0.0)), mask


@triton.jit
def _row_range(R, R_PER, IDX64: tl.constexpr):
    start = tl.program_id(1) * R_PER
    if IDX64:
        start = start.to(tl.int64)
    return start, tl.minimum(start + R_PER, R)


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, sum of squared deviations) moments."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit(do_not_specialize=["L_magic", "L_shift"])
def partial_stats_kernel(x_ptr, part_ptr, R, C, L, L_magic, L_shift, R_PER, CHANNELS_LAST: tl.constexpr,
                         IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         MAGIC_DIV: tl.constexpr):
    """part[split, :, c] = (count, mean, biased var) of channel c over rows [split * R_PER, ...).

    Each lane of the (BLOCK_R, BLOCK_C) tile keeps its own Welford moments over the tiles
    it sees (no cross-thread reduction per tile), merged once at the end (Chan). Tiles
    are consecutive rows and only the last can be partial, so every lane still in range
    at the k-th tile has seen exactly k values: one reciprocal per tile serves all lanes.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    start, end = _row_range(R, R_PER, IDX64)
    acc_ty = part_ptr.dtype.element_ty
    mean = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    m2 = tl.zeros((BLOCK_R, BLOCK_C), acc_ty)
    seen = tl.zeros((), acc_ty)
    # Shift by the program's first row: x - pivot is exact for x near pivot (Sterbenz), so
    # the means and deltas below are O(std) numbers, not O(mean) ones whose float32
    # rounding (mean 1e4: 6e-4) would leak into the variance through the merges.
    first, _ = _tile(x_ptr, start + tl.arange(0, 1), offs_c, end, C, L, L_magic, L_shift, CHANNELS_LAST, IDX64,
                     MAGIC_DIV)
    pivot = tl.sum(first.to(acc_ty), axis=0)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        x, mask = _tile(x_ptr, rows, offs_c, end, C, L, L_magic, L_shift, CHANNELS_LAST, IDX64, MAGIC_DIV)
        x = x.to(acc_ty) - pivot[None, :]
        seen += 1.0
        inv = 1.0 / seen
        delta = x - mean
        new_mean = mean + delta * inv
        m2 = tl.where(mask, m2 + delta * (x - new_mean), m2)
        mean = tl.where(mask, new_mean, mean)
    # lane i saw the rows start + i + k * BLOCK_R below end
    lane = (end - start - tl.arange(0, BLOCK_R) + BLOCK_R - 1) // BLOCK_R
    count = tl.where((offs_c < C)[None, :], tl.maximum(lane, 0)[:, None].to(acc_ty), 0.0)
    count, mean, m2 = tl.reduce((count, mean, m2), 0, _chan_combine)
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


@triton.jit(do_not_specialize=["L_magic", "L_shift"])
def grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, part_ptr, R, C, L, L_magic, L_shift, R_PER,
                     CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     MAGIC_DIV: tl.constexpr):
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
        g, _ = _tile(dy_ptr, rows, offs_c, end, C, L, L_magic, L_shift, CHANNELS_LAST, IDX64, MAGIC_DIV)
        x, mask = _tile(x_ptr, rows, offs_c, end, C, L, L_magic, L_shift, CHANNELS_LAST, IDX64, MAGIC_DIV)
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
                       R, S, C, eps: tl.float64, MODE: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """One per-channel map over dense (N, C, L) storage seen as R rows of S elements, by MODE:

    APPLY: out = (u - mean) * invstd * w + b, u = x;
    BACKWARD_TRAIN: out = (u - sum_dy / M - (v - mean) * invstd^2 * sum_dy_xmu / M) * invstd * w,
    u = dy, v = x, M = count, sums = (sum_dy, sum_dy_xmu);
    BACKWARD_EVAL: out = u * invstd * w, u = dy.

    Rows are the N * C planes (NCL: S = L, a row's channel is row % C) or the N * L pixels
    (CHANNELS_LAST: S = C, a column's channel is the column). Each program maps one
    (BLOCK_R, BLOCK_S) tile, so the per-channel coefficients (a square root and divisions)
    are computed once per row or column of the tile and no element pays an integer
    division to find its channel: on a GPU both would cost more than the memory traffic.
    """
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(S, BLOCK_S)
    rb = pid // col_blocks
    cb = pid - rb * col_blocks
    if IDX64:
        rb = rb.to(tl.int64)
        cb = cb.to(tl.int64)
    cols = cb * BLOCK_S + tl.arange(0, BLOCK_S)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (rows < R)[:, None] & (cols < S)[None, :]
    offs = rows[:, None] * S + cols[None, :]
    if CHANNELS_LAST:
        c = cols
        c_ok = cols < S
    else:
        c = rows % C
        c_ok = rows < R
    u = to_opmath(tl.load(u_ptr + offs, mask=mask, other=0.0))
    ty = u.dtype
    invstd = _invstd(tl.load(var_ptr + c, mask=c_ok, other=1.0).to(ty), eps)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(ty)
    if MODE == 0:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ty)
        out = (u - _across(mean, CHANNELS_LAST)) * _across(scale, CHANNELS_LAST)
        if HAS_B:
            out += _across(tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ty), CHANNELS_LAST)
    elif MODE == 1:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ty)
        n = tl.load(count_ptr + c, mask=c_ok, other=1.0).to(ty)
        mean_dy = tl.load(sums_ptr + c, mask=c_ok, other=0.0).to(ty) / n
        proj = invstd * invstd * tl.load(sums_ptr + C + c, mask=c_ok, other=0.0).to(ty) / n
        x = to_opmath(tl.load(v_ptr + offs, mask=mask, other=0.0)).to(ty)
        xmu = x - _across(mean, CHANNELS_LAST)
        out = (u - _across(mean_dy, CHANNELS_LAST) - xmu * _across(proj, CHANNELS_LAST)) * _across(scale, CHANNELS_LAST)
    else:
        out = u * _across(scale, CHANNELS_LAST)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _across(per_channel, CHANNELS_LAST: tl.constexpr):
    """A per-channel vector of elementwise_kernel broadcast over its tile (channels are columns or rows)."""
    if CHANNELS_LAST:
        t = per_channel[None, :]
    else:
        t = per_channel[:, None]
    return t
