"""Helpers shared by the Triton kernels: compute precision, integer division, the Philox generator."""
import triton
import triton.language as tl

# Philox4x32-10 constants (Salmon et al., SC'11); csrc/common.h uses the same.
PHILOX_KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)


@triton.jit
def to_opmath(x):
    """float64 stays float64; float16/bfloat16/float32 compute in float32."""
    if x.dtype == tl.float64:
        y = x
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def divmod_by(n, d, magic, shift, NATIVE: tl.constexpr):
    """(n // d, n % d) for n >= 0, d >= 1; unless NATIVE (64-bit indexing) n < 2^31 and d is divided by
    multiplying with (magic, shift) = pyops.ops._launch.int_divider(d) (Granlund and
    Montgomery's method, as ATen's IntDivider): a high multiply, an add and a shift instead
    of the ~20 instructions of a GPU's 32-bit division. magic is passed as the int32 with
    its bits (it is an unsigned 32-bit number).
    """
    if NATIVE:
        q = n // d
    else:
        nu = n.to(tl.uint32, bitcast=True)
        hi = tl.umulhi(nu, tl.cast(magic, tl.uint32, bitcast=True))
        q = ((hi + nu) >> tl.cast(shift, tl.uint32)).to(tl.int32, bitcast=True)
    return q, n - q * d


@triton.jit
def below(v, n, IDX64: tl.constexpr):
    """0 <= v < n in one unsigned comparison (v may be negative; n >= 0)."""
    if IDX64:
        ok = v.to(tl.uint64, bitcast=True) < n.to(tl.uint64)
    else:
        ok = v.to(tl.uint32, bitcast=True) < n.to(tl.uint32)
    return ok


@triton.jit
def packed_shift(shifts, i: tl.constexpr):
    """The i-th 5-bit field of ``shifts``: the shift of a launcher's i-th divisor
    (pyops.ops._launch.dividers packs them so)."""
    return (shifts >> (5 * i)) & 31


@triton.jit
def philox4x32_10(seed, counter, offset):
    """Philox4x32-10 with key (seed_lo, seed_hi) and counter (ctr_lo, ctr_hi, offset_lo, offset_hi).

    seed and offset are int64 scalars, counter an int64 block; returns four uint32
    blocks of counter's shape. Written out here (not tl.randint) so the stream is
    fixed across Triton versions and equal to csrc/common.h's philox_batch.
    """
    seed = seed.to(tl.int64).to(tl.uint64, bitcast=True)
    offset = offset.to(tl.int64).to(tl.uint64, bitcast=True)
    counter = counter.to(tl.int64).to(tl.uint64, bitcast=True)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0 + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = c0 * 0 + (offset >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = _c2 * PHILOX_ROUND_B
        c3 = _c0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def philox_blocks_kernel(out_ptr, seed, offset, first, n, BLOCK: tl.constexpr):
    """Raw Philox blocks: out[c, k] = word k of counter first + c, for c in [0, n) (tests only)."""
    ctr = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = ctr < n
    r0, r1, r2, r3 = philox4x32_10(seed, ctr + first, offset)
    tl.store(out_ptr + ctr * 4 + 0, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + ctr * 4 + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + ctr * 4 + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + ctr * 4 + 3, r3.to(tl.int64), mask=mask)
