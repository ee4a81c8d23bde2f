"""Dropout with an in-kernel Philox mask; the same kernel is forward and backward.

Element i of the dense storage uses lane i % 4 of philox(seed, counter=(i // 4, offset))
and is kept when the word's top 24 bits are >= threshold = round(p * 2^24): the
stream of csrc/dropout.cpp, so both backends drop the same elements.
"""
import triton
import triton.language as tl

from .common import philox4x32_10, to_opmath

CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]


@triton.jit
def dropout_kernel(x_ptr, out_ptr, seed_offset_ptr, n, threshold, scale: tl.float64, BLOCK: tl.constexpr):
    """out = x * (keep ? scale : 0); out_ptr may equal x_ptr (in-place dropout)."""
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_offset_ptr)
    offset = tl.load(seed_offset_ptr + 1)
    counter = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = philox4x32_10(seed, counter, offset)
    # [r0[0], r1[0], r2[0], r3[0], r0[1], ...]: element 4c + k takes word k of counter c.
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    keep = (r >> 8).to(tl.int32) >= threshold
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    xf = to_opmath(x)
    # tl.full keeps all 64 bits of the scale (float64 inputs) on GPU and in the interpreter.
    s = tl.full((), scale, tl.float64).to(xf.dtype)
    out = xf * tl.where(keep, s, 0.0).to(xf.dtype)
    tl.store(out_ptr + offs, out.to(x.dtype), mask=mask)
