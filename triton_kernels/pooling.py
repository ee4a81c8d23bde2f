"""Max and average pooling, forward and backward, for 4-D inputs of any strides.

One program handles BLOCK elements of its output (forward: pooled outputs; backward:
input gradients), numbered in that tensor's memory order (NCHW, or NHWC when
CHANNELS_LAST) so stores are coalesced. Backward gathers: each input element walks
only the output windows that can contain it (at most ceil(span / stride) per axis,
one for non-overlapping windows) and sums their gradients (max: those whose argmax it
is), so no atomics and a deterministic result even for overlapping windows. Index math
is int32 unless the launcher sets IDX64 (an offset may pass 2^31): integer division is
several times dearer in int64 on a GPU. In int32 NCHW, the divisions of every element
(its (n, c, h, w), the windows it is in) multiply by the launcher's magic numbers
(common.divmod_by; ``*_m`` arguments, their shifts packed 5 bits each in ``shifts``):
a GPU's own 32-bit division costs ~20 instructions, a large share of what the element's
memory traffic allows (channels-last: see _decode). Window bounds are one unsigned
comparison each (common.below). Window arithmetic is the one of pyops/_pool.py and
csrc/pooling.cpp.
"""
import triton
import triton.language as tl

from .common import below, divmod_by, packed_shift, to_opmath

# The magic numbers and shifts vary with the shape but are not worth a specialisation each.
_OUT_DIVIDERS = ["C_m", "OH_m", "OW_m", "shifts"]
_IN_DIVIDERS = ["C_m", "H_m", "W_m", "SH_m", "SW_m", "shifts"]

CONFIGS = [
    triton.Config({"BLOCK": 256}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=4),
]


@triton.jit
def _offsets(BLOCK: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _decode(offs, C, H, W, C_m, H_m, W_m, shifts, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr):
    """(n, c, h, w) of flat index offs in a (N, C, H, W) tensor stored NCHW or NHWC.

    NCHW divides by C, H, W with the launcher's divisors 0, 1, 2 (magic numbers C_m, H_m,
    W_m). NHWC keeps `//` and `%`: with C a multiple of 16 (as the JIT sees) Triton knows
    that runs of 16 channels share (n, h, w), so it loads them as vectors and divides once
    per run; magic-number arithmetic would hide that from it.
    """
    if CHANNELS_LAST:
        c = offs % C
        t = offs // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:
        t, w = divmod_by(offs, W, W_m, packed_shift(shifts, 2), IDX64)
        t, h = divmod_by(t, H, H_m, packed_shift(shifts, 1), IDX64)
        n, c = divmod_by(t, C, C_m, packed_shift(shifts, 0), IDX64)
    return n, c, h, w


@triton.jit
def _first_valid(start, step):
    """The smallest start + k * step >= 0 (k >= 0): the first in-bounds row of a dilated window."""
    neg = tl.maximum(-start, 0)
    return start + ((neg + step - 1) // step) * step


@triton.jit
def _windows_containing(i, P, K, S, D, O, S_m, S_shift, NATIVE: tl.constexpr):
    """[lo, hi]: the output positions whose window (start o*S - P, span (K-1)*D) covers input i.

    Only non-negative numbers are divided (Triton's // truncates on a GPU and floors in
    the interpreter); (S_m, S_shift) divide by S unless NATIVE (see _decode).
    """
    top = i + P                      # >= 0
    num = top - (K - 1) * D
    lo, _ = divmod_by(tl.maximum(num, 0) + S - 1, S, S_m, S_shift, NATIVE)
    hi, _ = divmod_by(top, S, S_m, S_shift, NATIVE)
    return tl.where(num > 0, lo, 0), tl.minimum(hi, O - 1)


@triton.jit
def _avg_divisor(hs, ws, H, W, KH, KW, PH, PW, divisor_override, COUNT_INCLUDE_PAD: tl.constexpr):
    """torch's avg_pool2d divisor for windows starting at (hs, ws)."""
    he = tl.minimum(hs + KH, H + PH)
    we = tl.minimum(ws + KW, W + PW)
    if COUNT_INCLUDE_PAD:
        div = (he - hs) * (we - ws)
    else:
        div = (tl.minimum(he, H) - tl.maximum(hs, 0)) * (tl.minimum(we, W) - tl.maximum(ws, 0))
    return tl.where(divisor_override != 0, divisor_override, div)  # 0 stands for none


@triton.jit(do_not_specialize=_OUT_DIVIDERS)
def max_pool2d_forward_kernel(x_ptr, out_ptr, idx_ptr, total, C, H, W, OH, OW, C_m, OH_m, OW_m, shifts,
                              sxn, sxc, sxh, sxw, son, soc, soh, sow,
                              KH, KW, SH, SW, PH, PW, DH, DW,
                              CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < total
    n, c, oh, ow = _decode(offs, C, OH, OW, C_m, OH_m, OW_m, shifts, CHANNELS_LAST, IDX64)
    hs = oh * SH - PH
    ws = ow * SW - PW
    # torch's rule: start at -inf on the window's first in-bounds position; a strictly
    # larger value or any NaN takes over, so ties keep the first and NaN propagates.
    best_idx = _first_valid(hs, DH) * W + _first_valid(ws, DW)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    if x_ptr.dtype.element_ty == tl.float64:
        best = best.to(tl.float64)
    base = n * sxn + c * sxc
    h0 = tl.where(mask, hs, H)  # lanes past the end see no row in range
    for kh in range(0, KH):
        h = h0 + kh * DH
        h_ok = below(h, H, IDX64)
        for kw in range(0, KW):
            w = ws + kw * DW
            ok = h_ok & below(w, W, IDX64)
            v = to_opmath(tl.load(x_ptr + base + h * sxh + w * sxw, mask=ok, other=float("-inf")))
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            best_idx = tl.where(take, h * W + w, best_idx)
    o = n * son + c * soc + oh * soh + ow * sow
    tl.store(out_ptr + o, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + o, best_idx.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=_IN_DIVIDERS)
def max_pool2d_backward_kernel(go_ptr, idx_ptr, gi_ptr, total, C, H, W, OH, OW, C_m, H_m, W_m, SH_m, SW_m, shifts,
                               sgn, sgc, sgh, sgw, sjn, sjc, sjh, sjw,
                               KH, KW, SH, SW, PH, PW, DH, DW, NTH, NTW,
                               CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    """NTH, NTW: the most windows one input row / column can be in (the loop trip counts)."""
    offs = _offsets(BLOCK, IDX64)
    mask = offs < total
    n, c, ih, iw = _decode(offs, C, H, W, C_m, H_m, W_m, shifts, CHANNELS_LAST, IDX64)
    me = ih * W + iw
    acc = tl.zeros((BLOCK,), tl.float32)
    if gi_ptr.dtype.element_ty == tl.float64:
        acc = acc.to(tl.float64)
    gbase = n * sgn + c * sgc
    jbase = n * sjn + c * sjc
    oh_lo, oh_hi = _windows_containing(ih, PH, KH, SH, DH, OH, SH_m, packed_shift(shifts, 3), IDX64 | CHANNELS_LAST)
    ow_lo, ow_hi = _windows_containing(iw, PW, KW, SW, DW, OW, SW_m, packed_shift(shifts, 4), IDX64 | CHANNELS_LAST)
    for th in range(0, NTH):
        oh = oh_lo + th
        h_ok = mask & (oh <= oh_hi)
        for tw in range(0, NTW):
            ow = ow_lo + tw
            ok = h_ok & (ow <= ow_hi)
            # a window within reach but not on the dilation grid never has ``me`` as argmax
            j = tl.load(idx_ptr + jbase + oh * sjh + ow * sjw, mask=ok, other=-1)
            if not IDX64:
                j = j.to(tl.int32)  # an index within a plane of fewer than 2^31 elements
            g = tl.load(go_ptr + gbase + oh * sgh + ow * sgw, mask=ok & (j == me), other=0.0)
            acc += to_opmath(g)
    # grad_input is dense in the order offs counts, so offs is its storage offset
    tl.store(gi_ptr + offs, acc.to(gi_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_OUT_DIVIDERS)
def avg_pool2d_forward_kernel(x_ptr, out_ptr, total, C, H, W, OH, OW, C_m, OH_m, OW_m, shifts,
                              sxn, sxc, sxh, sxw, son, soc, soh, sow,
                              KH, KW, SH, SW, PH, PW, divisor_override,
                              COUNT_INCLUDE_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                              BLOCK: tl.constexpr):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < total
    n, c, oh, ow = _decode(offs, C, OH, OW, C_m, OH_m, OW_m, shifts, CHANNELS_LAST, IDX64)
    hs = oh * SH - PH
    ws = ow * SW - PW
    acc = tl.zeros((BLOCK,), tl.float32)
    if x_ptr.dtype.element_ty == tl.float64:
        acc = acc.to(tl.float64)
    base = n * sxn + c * sxc
    h0 = tl.where(mask, hs, H)  # lanes past the end see no row in range
    for kh in range(0, KH):
        h = h0 + kh
        h_ok = below(h, H, IDX64)
        for kw in range(0, KW):
            w = ws + kw
            ok = h_ok & below(w, W, IDX64)
            acc += to_opmath(tl.load(x_ptr + base + h * sxh + w * sxw, mask=ok, other=0.0))
    div = _avg_divisor(hs, ws, H, W, KH, KW, PH, PW, divisor_override, COUNT_INCLUDE_PAD)
    empty = (tl.maximum(hs, 0) >= tl.minimum(hs + KH, H)) | (tl.maximum(ws, 0) >= tl.minimum(ws + KW, W))
    out = tl.where(empty, 0.0, acc / tl.where(div == 0, 1, div).to(acc.dtype))
    o = n * son + c * soc + oh * soh + ow * sow
    tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_IN_DIVIDERS)
def avg_pool2d_backward_kernel(go_ptr, gi_ptr, total, C, H, W, OH, OW, C_m, H_m, W_m, SH_m, SW_m, shifts,
                               sgn, sgc, sgh, sgw,
                               KH, KW, SH, SW, PH, PW, divisor_override, NTH, NTW,
                               COUNT_INCLUDE_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, IDX64: tl.constexpr,
                               BLOCK: tl.constexpr):
    """NTH, NTW: the most windows one input row / column can be in (the loop trip counts)."""
    offs = _offsets(BLOCK, IDX64)
    mask = offs < total
    n, c, ih, iw = _decode(offs, C, H, W, C_m, H_m, W_m, shifts, CHANNELS_LAST, IDX64)
    acc = tl.zeros((BLOCK,), tl.float32)
    if gi_ptr.dtype.element_ty == tl.float64:
        acc = acc.to(tl.float64)
    gbase = n * sgn + c * sgc
    oh_lo, oh_hi = _windows_containing(ih, PH, KH, SH, 1, OH, SH_m, packed_shift(shifts, 3), IDX64 | CHANNELS_LAST)
    ow_lo, ow_hi = _windows_containing(iw, PW, KW, SW, 1, OW, SW_m, packed_shift(shifts, 4), IDX64 | CHANNELS_LAST)
    for th in range(0, NTH):
        oh = oh_lo + th
        h_ok = mask & (oh <= oh_hi)
        for tw in range(0, NTW):
            ow = ow_lo + tw
            ok = h_ok & (ow <= ow_hi)
            g = to_opmath(tl.load(go_ptr + gbase + oh * sgh + ow * sgw, mask=ok, other=0.0))
            div = _avg_divisor(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, divisor_override,
                               COUNT_INCLUDE_PAD)
            acc += tl.where(ok, g / tl.where(div == 0, 1, div).to(acc.dtype), 0.0)
    # grad_input is dense in the order offs counts, so offs is its storage offset
    tl.store(gi_ptr + offs, acc.to(gi_ptr.dtype.element_ty), mask=mask)
