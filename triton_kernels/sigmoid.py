"""Sigmoid forward and backward: one program per BLOCK of the flat, dense storage."""
import triton
import triton.language as tl

from .common import to_opmath

# Launch configurations the launcher chooses from (and the AOT compile test covers).
CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]


@triton.jit
def sigmoid_forward_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = 1 / (1 + exp(-x)); exp overflow gives exactly 0, underflow exactly 1."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    xf = to_opmath(x)
    y = 1.0 / (1.0 + tl.exp(-xf))
    tl.store(y_ptr + offs, y.to(x.dtype), mask=mask)


@triton.jit
def sigmoid_backward_kernel(dy_ptr, y_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    """dx = dy * y * (1 - y) from the saved output y."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask)
    y = to_opmath(tl.load(y_ptr + offs, mask=mask))
    dx = to_opmath(dy) * y * (1.0 - y)
    tl.store(dx_ptr + offs, dx.to(dy.dtype), mask=mask)
