"""2-D convolution as implicit GEMM: forward, input gradient (dgrad) and weight gradient (wgrad).

No im2col buffer is built in global memory: each program gathers its tiles of the
virtual patch matrix straight from the input through its strides, so NCHW and NHWC
(channels_last) inputs and outputs are both served. The reduction runs as one flat
loop over (kernel tap, channel block) so Triton pipelines it, and one tap's rows share
one 1-D bound check. The loop body is kept lean, since on an H100 the warps issuing the
tensor-core MMAs also compute every address and mask: (tap, block) advance by counters,
not integer division; rows are pointers at the first tap plus one per-tap scalar
offset; bound checks are single unsigned comparisons (common.below); wgrad finds its pixels
by multiply-shift division (common.divmod_by); scripts/sass_stats.py counts what is
left. Accumulation is float32 (float64 for float64 inputs); float32 products are exact
IEEE (no TF32), as torch with TF32 off.

One family serves both ops: conv_transpose2d's forward is ``conv2d_dgrad_kernel``
(with its bias), its input gradient ``conv2d_forward_kernel`` and its weight gradient
``conv2d_wgrad_kernel`` with the roles of input and gradient swapped.

- forward: M = N*OH*OW output pixels x N = K/groups output channels, reduced over
  (r, s, c). grid = (M tiles, K tiles, groups).
- dgrad: the input pixels are split by stride phase (h % SH, w % SW); within a phase
  the kernel taps that reach it are the same for every pixel, so only those taps are
  walked (no work on the zeros a strided transposed convolution would insert).
  grid = (pixel tiles of one phase, C tiles, groups * SH * SW).
- wgrad: M = K/groups x N = (r, s, c block), reduced over the N*OH*OW pixels split into
  SPLIT chunks (split-K) for parallelism; each chunk writes its own partial sum, added
  in a fixed order afterwards, so the result is deterministic.
"""
import triton
import triton.language as tl

from .common import below, divmod_by, packed_shift

# Tile configurations. The first is the interpreter's (pyops.ops.conv._heuristic): the
# interpreter's cost is per program and loop trip, nearly whatever the tile, so it takes
# long pixel tiles (M; wgrad's reduction chunk K) that still split the larger test cases
# over several programs and trips, and narrow channel tiles. GPUs take the others, chosen
# or timed per problem. float64 tiles are kept small (register file and shared memory).
CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
FP64_CONFIGS = [
    CONFIGS[0],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=2),
]

# Spatial and window arguments are not specialised (divisibility by 16, == 1): one compile
# serves every layer shape. Strides and the channel counts Cg, Kg (K) are: a unit channel
# stride makes the channel axis of a tile contiguous, and only when Cg / Kg are known
# multiples of 16 are the channel masks (c < Cg) constant over 16 lanes and the group
# offsets aligned, so the tiles load as 16-byte vectors through cp.async, which is what
# lets Triton pipeline the reduction loop (num_stages). With Cg, Kg unspecialised the sm_90
# PTX of the half-precision kernels had scalar loads and no cp.async (single-buffered);
# tests/test_aot_compile.py checks the PTX of the aligned variants.
_CONV2D_FORWARD_KERNEL_GEOMETRY = ["N", "H", "W", "OH", "OW", "R", "S", "SH", "SW", "PH", "PW", "DH", "DW"]
_CONV2D_DGRAD_KERNEL_GEOMETRY = ["N", "H", "W", "OH", "OW", "HQ", "WQ", "R", "S", "SH", "SW", "PH", "PW", "DH", "DW", "STEP_H", "STEP_W"]
_CONV2D_WGRAD_KERNEL_GEOMETRY = ["N", "H", "W", "OH", "OW", "OW_m", "OH_m", "shifts", "SPLIT", "P_SPLIT", "R", "S", "SH",
                                 "SW", "PH", "PW", "DH", "DW"]


@triton.jit
def _acc_init(ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    return acc


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b with exact float32 products (no TF32) and float64 kept float64.

    UPCAST (set under Triton's interpreter, whose dot mishandles bfloat16) multiplies
    half-precision tiles as float32: the same exact products a GPU's MMA makes.
    """
    if UPCAST and (a.dtype == tl.bfloat16 or a.dtype == tl.float16):
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)  # float64 needs saying on Triton 3.6
    return acc


@triton.jit
def _pid(axis, IDX64: tl.constexpr):
    pid = tl.program_id(axis)
    if IDX64:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def _next_step(r, s, c0, S, C, BLOCK: tl.constexpr):
    """The step after (tap (r, s), channel block c0) of a reduction over taps x channel blocks."""
    c0 += BLOCK
    wrap_c = c0 >= C
    c0 = tl.where(wrap_c, 0, c0)
    s = tl.where(wrap_c, s + 1, s)
    wrap_s = s >= S
    s = tl.where(wrap_s, 0, s)
    r = tl.where(wrap_s, r + 1, r)
    return r, s, c0


@triton.jit(do_not_specialize=_CONV2D_FORWARD_KERNEL_GEOMETRY)
def conv2d_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                          N, H, W, OH, OW, Cg, Kg,
                          sxn, sxc, sxh, sxw, swk, swc, swr, sws, syn, syc, syh, syw,
                          R, S, SH, SW, PH, PW, DH, DW,
                          HAS_BIAS: tl.constexpr, IDX64: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, g*Kg + k, oh, ow] = sum_{r, s, c} x[n, g*Cg + c, oh*SH - PH + r*DH, ow*SW - PW + s*DW] * w[g*Kg + k, c, r, s]."""
    g = _pid(2, IDX64)
    offs_m = _pid(0, IDX64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = _pid(1, IDX64) * BLOCK_N + tl.arange(0, BLOCK_N)    # output channel in the group
    m_ok = offs_m < N * OH * OW
    k_ok = offs_k < Kg
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = t // OH
    hb = tl.where(m_ok, oh * SH - PH, H)  # rows past M start out of range: no m_ok in the loop
    wb = ow * SW - PW
    x_rows = x_ptr + n * sxn + g * Cg * sxc + hb * sxh + wb * sxw     # at tap (0, 0)
    w_cols = w_ptr + (g * Kg + offs_k) * swk
    offs_c = tl.arange(0, BLOCK_K)
    acc = _acc_init(x_ptr, BLOCK_M, BLOCK_N)
    # (r, s, c0): the tap and channel block of step i, advanced by counters (no division in the loop)
    r = 0
    s = 0
    c0 = 0
    for i in range(0, R * S * tl.cdiv(Cg, BLOCK_K)):
        c = c0 + offs_c
        h = hb + r * DH
        w = wb + s * DW
        row_ok = below(h, H, IDX64) & below(w, W, IDX64)
        c_ok = c < Cg
        a = tl.load(x_rows[:, None] + (r * DH * sxh + s * DW * sxw) + (c * sxc)[None, :],
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_cols[None, :] + (c * swc + r * swr + s * sws)[:, None],
                    mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST)
        r, s, c0 = _next_step(r, s, c0, S, Cg, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + g * Kg + offs_k, mask=k_ok, other=0.0).to(acc.dtype)[None, :]
    y = y_ptr + (n * syn + oh * syh + ow * syw)[:, None] + ((g * Kg + offs_k) * syc)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _first_tap(phase, P, D, SD, STEP, R):
    """The first kernel tap r with (phase + P - r*D) % SD == 0, or R when no tap reaches the phase.

    Taps that reach a stride phase repeat every STEP = SD / gcd(SD, D), so only r < STEP are tried.
    """
    first = R
    for t in range(0, STEP):
        hit = ((phase + P - t * D) % SD) == 0  # a zero remainder reads the same truncated or floored
        first = tl.minimum(first, tl.where(hit, t, R))
    return first


@triton.jit(do_not_specialize=_CONV2D_DGRAD_KERNEL_GEOMETRY)
def conv2d_dgrad_kernel(dy_ptr, w_ptr, b_ptr, dx_ptr,
                        N, H, W, OH, OW, Cg, Kg, HQ, WQ,
                        sdn, sdk, sdh, sdw, swk, swc, swr, sws, sxn, sxc, sxh, sxw,
                        R, S, SH, SW, PH, PW, DH, DW, STEP_H, STEP_W,
                        HAS_BIAS: tl.constexpr, IDX64: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[n, g*Cg + c, h, w] = sum over taps (r, s) reaching (h, w) and k of dy[n, g*Kg + k, oh, ow] * w[g*Kg + k, c, r, s],
    where oh*SH = h + PH - r*DH (and likewise ow). Pixels of one stride phase per program."""
    z = _pid(2, IDX64)
    phases = SH * SW
    g = z // phases
    phase = z - g * phases
    ph_h = phase // SW
    ph_w = phase - ph_h * SW
    offs_m = _pid(0, IDX64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = _pid(1, IDX64) * BLOCK_N + tl.arange(0, BLOCK_N)     # input channel in the group
    wq = offs_m % WQ
    t = offs_m // WQ
    hq = t % HQ
    n = t // HQ
    h = hq * SH + ph_h
    w = wq * SW + ph_w
    m_ok = (offs_m < N * HQ * WQ) & (h < H) & (w < W)
    c_ok = offs_c < Cg
    # the taps that reach this phase: r = r0, r0 + STEP_H, ... (and s likewise)
    r0 = _first_tap(ph_h, PH, DH, SH, STEP_H, R)
    s0 = _first_tap(ph_w, PW, DW, SW, STEP_W, S)
    nr = tl.where(r0 < R, (R - r0 + STEP_H - 1) // STEP_H, 0)
    ns = tl.where(s0 < S, (S - s0 + STEP_W - 1) // STEP_W, 0)
    # Within the phase, tap (r, s) reads dy at oh = hq + (ph_h + PH - r*DH) / SH (an exact
    # division, the same for every pixel), and ow likewise: row pointers at hq, wq plus a
    # per-tap offset, no division in the loop. Each tap step moves oh by -STEP_H*DH / SH.
    dh0 = (ph_h + PH - r0 * DH) // SH
    dw0 = (ph_w + PW - s0 * DW) // SW
    dh_step = STEP_H * DH // SH
    dw_step = STEP_W * DW // SW
    dy_rows = dy_ptr + n * sdn + g * Kg * sdk + hq * sdh + wq * sdw
    w_cols = w_ptr + g * Kg * swk + offs_c * swc
    offs_k = tl.arange(0, BLOCK_K)
    acc = _acc_init(dx_ptr, BLOCK_M, BLOCK_N)
    tr = 0
    ts = 0
    k0 = 0
    for i in range(0, nr * ns * tl.cdiv(Kg, BLOCK_K)):
        k = k0 + offs_k
        dh = dh0 - tr * dh_step
        dw = dw0 - ts * dw_step
        row_ok = m_ok & below(hq + dh, OH, IDX64) & below(wq + dw, OW, IDX64)
        k_ok = k < Kg
        a = tl.load(dy_rows[:, None] + (dh * sdh + dw * sdw) + (k * sdk)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        tap = (r0 + tr * STEP_H) * swr + (s0 + ts * STEP_W) * sws
        b = tl.load(w_cols[None, :] + (k * swk)[:, None] + tap, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST)
        tr, ts, k0 = _next_step(tr, ts, k0, ns, Kg, BLOCK_K)
    if HAS_BIAS:  # conv_transpose2d's bias
        acc += tl.load(b_ptr + g * Cg + offs_c, mask=c_ok, other=0.0).to(acc.dtype)[None, :]
    dx = dx_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + ((g * Cg + offs_c) * sxc)[None, :]
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=_CONV2D_WGRAD_KERNEL_GEOMETRY)
def conv2d_wgrad_kernel(dy_ptr, x_ptr, ws_ptr,
                        N, H, W, OH, OW, OW_m, OH_m, shifts, Cg, Kg, K, SPLIT, P_SPLIT,
                        sdn, sdk, sdh, sdw, sxn, sxc, sxh, sxw,
                        R, S, SH, SW, PH, PW, DH, DW,
                        IDX64: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ws[split, g*Kg + k, c, r, s] = sum over pixels p of chunk ``split`` of dy[n, g*Kg + k, oh, ow] * x[n, g*Cg + c, h, w].

    ws is a dense (SPLIT, K, Cg, R, S) float32/float64 buffer (the weight itself when SPLIT == 1).
    Pixels are found by multiply-shift division (common.divmod_by): OW_m, OH_m and their
    shifts packed in ``shifts`` (pyops.ops._launch.dividers(OW, OH)).
    """
    z = _pid(2, IDX64)
    g = z // SPLIT
    split = z - g * SPLIT
    offs_k = _pid(0, IDX64) * BLOCK_M + tl.arange(0, BLOCK_M)     # output channel in the group
    cblocks = tl.cdiv(Cg, BLOCK_N)
    pid_n = _pid(1, IDX64)
    rs = pid_n // cblocks
    offs_c = (pid_n - rs * cblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = rs // S
    s = rs - r * S
    k_ok = offs_k < Kg
    c_ok = offs_c < Cg
    dy_rows = dy_ptr + (g * Kg + offs_k) * sdk
    x_cols = x_ptr + (g * Cg + offs_c) * sxc
    total = N * OH * OW
    p_begin = split * P_SPLIT
    p_end = tl.minimum(p_begin + P_SPLIT, total)
    offs_p = tl.arange(0, BLOCK_K)
    acc = _acc_init(ws_ptr, BLOCK_M, BLOCK_N)
    for p0 in range(p_begin, p_end, BLOCK_K):
        p = p0 + offs_p
        t, ow = divmod_by(p, OW, OW_m, packed_shift(shifts, 0), IDX64)
        n, oh = divmod_by(t, OH, OH_m, packed_shift(shifts, 1), IDX64)
        h = oh * SH - PH + r * DH
        w = ow * SW - PW + s * DW
        p_ok = p < p_end
        a = tl.load(dy_rows[:, None] + (n * sdn + oh * sdh + ow * sdw)[None, :],
                    mask=k_ok[:, None] & p_ok[None, :], other=0.0)
        x_ok = p_ok & below(h, H, IDX64) & below(w, W, IDX64)
        b = tl.load(x_cols[None, :] + (n * sxn + h * sxh + w * sxw)[:, None],
                    mask=x_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST)
    # ws is dense (SPLIT, K, Cg, R, S): the offset of (split, g*Kg + k, c, r, s)
    RS = R * S
    row = (split * K + g * Kg + offs_k) * (Cg * RS)
    out = ws_ptr + row[:, None] + (offs_c * RS + r * S + s)[None, :]
    tl.store(out, acc.to(ws_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])


@triton.jit
def sum_splits_kernel(ws_ptr, out_ptr, numel, SPLIT, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s * numel + i], in order s = 0, 1, ... (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_sum_kernel(g_ptr, out_ptr, N, K, HW, N_PER, sgn, sgk, sgp,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[j, k] = sum over images n of chunk j (N_PER images each) and pixels p of g[n, k, p].

    The bias gradient's partial sums; grid = (channel blocks, image chunks).
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    c_ok = offs_c < K
    if out_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros((BLOCK_C, BLOCK_P), tl.float64)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    n0 = chunk * N_PER
    # 64-bit pointers, advanced by one image per step
    rows = g_ptr + offs_c.to(tl.int64) * sgk + n0.to(tl.int64) * sgn
    for _ in range(n0, tl.minimum(n0 + N_PER, N)):
        for p0 in range(0, HW, BLOCK_P):
            p = p0 + offs_p
            acc += tl.load(rows[:, None] + (p.to(tl.int64) * sgp)[None, :],
                           mask=c_ok[:, None] & (p < HW)[None, :], other=0.0).to(acc.dtype)
        rows += sgn
    tl.store(out_ptr + chunk * K + offs_c, tl.sum(acc, axis=1), mask=c_ok)
