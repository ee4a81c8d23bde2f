"""The Philox4x32-10 stream both backends use: known answers and agreement with Triton's own."""
import pytest
import torch

from conftest import BACKEND_CASES
from pyops._dispatch import cpp_extension, triton_kernels

M64 = 1 << 64


def s64(v):
    return v - M64 if v >= 1 << 63 else v


# Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds):
# counter (c0, c1, c2, c3), key (k0, k1) -> output. In our packing the counter is
# (first_lo, first_hi, offset_lo, offset_hi) and the key is (seed_lo, seed_hi).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _pack(counter, key):
    first = s64(counter[0] | counter[1] << 32)
    offset = s64(counter[2] | counter[3] << 32)
    seed = s64(key[0] | key[1] << 32)
    return seed, offset, first


def _triton_blocks(seed, offset, first, n, device):
    out = torch.empty(n, 4, dtype=torch.int64, device=device)
    block = 128
    triton_kernels().common.philox_blocks_kernel[((n + block - 1) // block,)](out, seed, offset, first, n, BLOCK=block)
    return out.cpu()


TRITON_DEVICES = [d for b, d in BACKEND_CASES if b == "triton"]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_cpp_known_answers(counter, key, expected):
    seed, offset, first = _pack(counter, key)
    assert cpp_extension().philox_blocks(seed, offset, first, 1)[0].tolist() == list(expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_triton_known_answers(device, counter, key, expected):
    seed, offset, first = _pack(counter, key)
    assert _triton_blocks(seed, offset, first, 1, device)[0].tolist() == list(expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("seed,offset,first", [(0, 0, 0), (123456789, 0, 2**32 - 3), (-5, 2**40 + 1, 2**50)])
def test_triton_equals_cpp_over_a_range(device, seed, offset, first):
    n = 300
    assert torch.equal(_triton_blocks(seed, offset, first, n, device), cpp_extension().philox_blocks(seed, offset, first, n))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_matches_triton_randint4x(device):
    """With offset 0 our stream is exactly tl.randint4x(seed, counter) (key (seed, 0), counter (c, 0, 0, 0))."""
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = c < n
        r0, r1, r2, r3 = tl.randint4x(seed, c)
        tl.store(out_ptr + c * 4 + 0, r0.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)
        tl.store(out_ptr + c * 4 + 1, r1.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)
        tl.store(out_ptr + c * 4 + 2, r2.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)
        tl.store(out_ptr + c * 4 + 3, r3.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)

    n, seed = 64, 987654321
    out = torch.empty(n, 4, dtype=torch.int64, device=device)
    randint4x_kernel[(1,)](out, seed, n, BLOCK=64)
    assert torch.equal(out.cpu(), cpp_extension().philox_blocks(seed, 0, 0, n))
