"""Small tensor-layout helpers shared by every launcher (both backends)."""
from __future__ import annotations

import torch


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill one block of storage with no gaps."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when dense (any dim order, e.g. channels_last), else a dense copy in
    ``t``'s dim order (``torch.empty_like``'s strides: a sliced channels_last view gives
    channels_last).

    Elementwise kernels walk a dense tensor's storage as one flat array, and the output
    made by ``torch.empty_like`` keeps its layout, as torch's elementwise ops do.
    """
    return t if is_dense(t) else torch.empty_like(t).copy_(t)


def elementwise_empty(t: torch.Tensor) -> torch.Tensor:
    """The output of an elementwise op of the dense tensor ``t``, laid out as torch's
    TensorIterator lays out a unary op's: contiguous when ``t`` is contiguous, channels_last
    when ``t`` is channels_last-contiguous (4-D), else ``t``'s own strides.

    Its storage order is ``t``'s in every case; the strides differ from ``t``'s only on
    size-1 dims (an N x C x 1 x 1 or N x 1 x H x W tensor with channels_last strides is
    contiguous too, and torch's output is then contiguous), and an empty output is contiguous.
    """
    if t.is_contiguous():
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=torch.channels_last)
    return torch.empty_like(t)


def iterator_strides(shape, operand_strides) -> tuple[int, ...]:
    """The strides TensorIterator gives the output of an elementwise op of operands of one
    ``shape`` with ``operand_strides`` (in argument order) when none of its fast layouts
    applies: dims ordered innermost first by the operands' strides (the first operand that
    tells two dims apart decides, a stride of 0 tells nothing, equal strides put the smaller
    dim inside) and packed densely; contiguous strides when that order is the contiguous one."""
    nd = len(shape)
    perm = list(range(nd - 1, -1, -1))  # innermost first

    def should_swap(d0: int, d1: int) -> int:
        for strides in operand_strides:
            s0, s1 = strides[d0], strides[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 != s1:
                return -1 if s0 < s1 else 1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    for i in range(1, nd):  # TensorIterator's insertion sort, ambiguous comparisons included
        d1 = i
        for d0 in range(i - 1, -1, -1):
            order = should_swap(perm[d0], perm[d1])
            if order > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif order < 0:
                break
    if perm == list(range(nd - 1, -1, -1)):
        return format_strides(shape, False)
    strides, step = [0] * nd, 1
    for dim in perm:
        strides[dim] = step
        step *= shape[dim]
    return tuple(strides)


def binary_elementwise_empty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The output of torch's elementwise op of ``a`` and ``b`` (one shape; ``a`` first, as
    a backward's incoming gradient), laid out as TensorIterator lays it out: contiguous or
    channels_last when both are, the strides of both when they are dense with the same
    strides, else ``iterator_strides`` (``a``'s order where its strides decide: an expanded
    gradient, all strides 0, leaves it to ``b``)."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.empty(a.shape, dtype=b.dtype, device=b.device)
    if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and \
            b.is_contiguous(memory_format=torch.channels_last):
        return torch.empty(a.shape, dtype=b.dtype, device=b.device, memory_format=torch.channels_last)
    if is_dense(a) and is_dense(b) and a.stride() == b.stride():
        return torch.empty_strided(a.shape, b.stride(), dtype=b.dtype, device=b.device)
    return torch.empty_strided(a.shape, iterator_strides(a.shape, (a.stride(), b.stride())), dtype=b.dtype,
                               device=b.device)


def format_strides(shape, channels_last: bool) -> tuple[int, ...]:
    """The strides of a dense tensor of ``shape`` in torch's contiguous format or, for 4-D and
    5-D shapes, channels_last (channels innermost, then the spatial dims, then N)."""
    d = len(shape)
    order = [1, *range(d - 1, 1, -1), 0] if channels_last and d in (4, 5) else list(range(d - 1, -1, -1))
    strides, step = [0] * d, 1
    for dim in order:
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two dense tensors of one shape store their elements in the same order: equal
    strides wherever a dim has more than one element."""
    return all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def restrided(t: torch.Tensor, stride) -> torch.Tensor:
    """The dense ``t`` with ``stride``, which differ from its own only on size-1 dims (no copy)."""
    return t if t.stride() == tuple(stride) else t.as_strided(t.shape, stride)


def dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides ``dense(t)`` has, without making the copy."""
    return t.stride() if is_dense(t) else torch.empty_like(t, device="meta").stride()


def with_strides(t: torch.Tensor, stride) -> torch.Tensor:
    """``t`` with exactly these (dense) strides: ``t`` itself when it has them, else a copy."""
    if t.stride() == tuple(stride):
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def strides_like_channels_last(t: torch.Tensor) -> bool:
    """torch's ``suggest_memory_format`` is channels_last (4-D) or channels_last_3d (5-D) for ``t``.

    c10's stride test: walking C, then the spatial dims innermost first, then N, each
    stride is at least the extent of the previous one. It decides by strides alone, so a
    tensor that is also contiguous (size-1 dims: N x C x 1 x 1, or N x 1 x H x W) is
    channels_last when its strides are channels_last's; a trivial C stride, or one equal
    to N's, is channel-major. Convolution and pooling choose their output's layout by it.
    """
    if t.dim() not in (4, 5):
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, *range(t.dim() - 1, 1, -1), 0):
        if sizes[d] == 0 or strides[d] < low:
            return False
        if d == 0 and low == strides[1]:
            return False
        low = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def suggests_channels_last(t: torch.Tensor) -> bool:
    """Batch norm's rule: channels_last by ``strides_like_channels_last`` unless contiguous
    (torch's batch norm runs a tensor that is both channel-major)."""
    return not t.is_contiguous() and strides_like_channels_last(t)
