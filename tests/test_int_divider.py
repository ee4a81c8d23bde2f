"""Division by multiply and shift (common.divmod_by with _launch.int_divider), against Python's //.

The kernels find an element's row, channel or window with it in 32-bit indexing, so a
wrong quotient for any n < 2^31 would misplace data silently.
"""
import random

import pytest
import torch
import triton
import triton.language as tl

from conftest import BACKEND_CASES
from pyops._dispatch import triton_kernels
from pyops.ops._launch import int_divider

TRITON_DEVICES = [d for b, d in BACKEND_CASES if b == "triton"]
divmod_by = triton_kernels().common.divmod_by
LIMIT = 2**31 - 1
# powers of two (magic 1), their neighbours, the conv/pool/BN sizes, the largest
DIVISORS = [1, 2, 3, 5, 7, 16, 17, 49, 56, 63, 64, 65, 196, 3136, 12544, 2**16 + 1, 2**24 - 1, 2**24 + 1,
            2**30, 2**30 + 1, LIMIT - 1, LIMIT]


def _numerators(d: int, rng: random.Random) -> list[int]:
    around = [d * k + r for k in (1, 2, 3, LIMIT // d - 1, LIMIT // d) for r in (-1, 0, 1)]
    fixed = [0, 1, LIMIT, LIMIT - 1, 2**30, 2**31 - d]
    return sorted({n for n in around + fixed + [rng.randrange(LIMIT + 1) for _ in range(64)] if 0 <= n <= LIMIT})


def _emulate(n: int, d: int) -> int:
    """The kernel's arithmetic in unsigned 32 bits."""
    magic, shift = int_divider(d)
    hi = (n * (magic & 0xFFFFFFFF)) >> 32
    return ((hi + n) & 0xFFFFFFFF) >> shift


def test_magic_numbers_divide_exactly():
    rng = random.Random(0)
    divisors = DIVISORS + [rng.randrange(1, LIMIT + 1) for _ in range(300)]
    for d in divisors:
        magic, shift = int_divider(d)
        assert -(2**31) <= magic <= LIMIT and 0 <= shift <= 31
        for n in _numerators(d, rng):
            assert _emulate(n, d) == n // d, (n, d)


def test_divisor_range():
    with pytest.raises(ValueError):
        int_divider(0)
    assert int_divider(2**31) == (0, 0)  # only 64-bit indexing divides by more; it divides natively


@triton.jit
def _divmod_kernel(n_ptr, q_ptr, r_ptr, count, d, magic, shift, NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    n = tl.load(n_ptr + offs, mask=mask, other=0)
    q, r = divmod_by(n, d, magic, shift, NATIVE)
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(r_ptr + offs, r, mask=mask)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_divmod_by(device):
    rng = random.Random(1)
    for d in DIVISORS:
        ns = _numerators(d, rng)
        n = torch.tensor(ns, dtype=torch.int32, device=device)
        q, r = torch.empty_like(n), torch.empty_like(n)
        magic, shift = int_divider(d)
        _divmod_kernel[(triton.cdiv(len(ns), 64),)](n, q, r, len(ns), d, magic, shift, NATIVE=False, BLOCK=64)
        assert q.cpu().tolist() == [v // d for v in ns], d
        assert r.cpu().tolist() == [v % d for v in ns], d
