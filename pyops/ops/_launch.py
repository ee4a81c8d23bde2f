"""Launch helpers shared by the op modules."""
from __future__ import annotations

import contextlib
import functools

import torch

from .._dispatch import triton_interpreted


_FORCED_SMS: list[int] = []


def gpu_geometry(device: torch.device) -> bool:
    """Whether launches on ``device`` choose the tile configs and grids made for a GPU.

    Yes for CUDA tensors on compiled kernels. The interpreter gets the smallest tiles and
    grids (fast on tiny test tensors), unless a test forces the GPU's choices with
    ``forced_gpu_geometry`` so that those configs and grid computations run somewhere
    before a GPU does.
    """
    return bool(_FORCED_SMS) or (device.type == "cuda" and not triton_interpreted())


@contextlib.contextmanager
def forced_gpu_geometry(sms: int):
    """Tests: choose configs and grids as on a GPU with ``sms`` multiprocessors, on any device."""
    _FORCED_SMS.append(sms)
    try:
        yield
    finally:
        _FORCED_SMS.pop()


BIG_ELEMENTWISE = 1 << 20  # elements from which a flat kernel takes its last (largest) block


def elementwise_config(configs, n: int, device: torch.device):
    """Pick a launch config for a flat elementwise kernel over ``n`` elements.

    Memory-bound kernels want big blocks on big tensors; the interpreter (CPU) wants
    the smallest block so tiny test tensors do not run a mostly-masked program.
    """
    if not gpu_geometry(device) or n <= BIG_ELEMENTWISE:
        return configs[0]
    return configs[-1]


def device_guard(device: torch.device):
    """Make ``device`` current for a Triton launch on a CUDA tensor (a no-op context elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_elementwise(kernel, configs, n: int, device: torch.device, *args, **constexprs) -> None:
    """Launch ``kernel[grid](*args, BLOCK=...)`` with one program per BLOCK of ``n`` flat elements (none when n == 0)."""
    if n == 0:
        return
    cfg = elementwise_config(configs, n, device)
    block = cfg.kwargs["BLOCK"]
    grid = ((n + block - 1) // block,)
    with device_guard(device):
        kernel[grid](*args, **constexprs, BLOCK=block, num_warps=cfg.num_warps)


INT32_LIMIT = 2**31 - 1


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether a kernel indexing these tensors through their strides may pass int32 offsets."""
    for t in tensors:
        reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)
        if t.numel() > INT32_LIMIT or reach >= INT32_LIMIT:
            return True
    return False


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4096)  # computed on every launch otherwise; a model has few distinct sizes
def int_divider(d: int) -> tuple[int, int]:
    """(magic, shift) for triton_kernels.common.divmod_by: n // d == (umulhi(n, magic) + n) >> shift
    for 0 <= n < 2^31, 1 <= d < 2^31, in unsigned 32-bit arithmetic; magic as the int32 of its bits.

    A larger d comes only with 64-bit indexing (IDX64), where the kernels divide natively: (0, 0)."""
    if d < 1:
        raise ValueError(f"pyops: divisor {d} out of range")
    if d > INT32_LIMIT:
        return 0, 0
    shift = (d - 1).bit_length()
    magic = ((1 << 32) * ((1 << shift) - d)) // d + 1
    return (magic - (1 << 32) if magic > INT32_LIMIT else magic), shift


def dividers(*divisors: int) -> list[int]:
    """The magic numbers of ``divisors`` (int_divider), then their shifts packed 5 bits each,
    the i-th divisor's at bit 5 * i: the arguments of a kernel dividing by all of them."""
    pairs = [int_divider(d) for d in divisors]
    return [magic for magic, _ in pairs] + [sum(shift << (5 * i) for i, (_, shift) in enumerate(pairs))]


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached): how many programs fill it."""
    if _FORCED_SMS:
        return _FORCED_SMS[-1]
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]
