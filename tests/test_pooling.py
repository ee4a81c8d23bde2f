"""max_pool2d and avg_pool2d against torch over their whole argument space, both backends."""
import itertools

import pytest
import torch

import pyops
from conftest import FLOAT_DTYPES, assert_close, interpreting
from pyops import _pool

# (input shape, kernel, stride, padding, dilation, ceil_mode): odd, tiny, overlapping,
# dilated, non-square and ceil-mode windows; unbatched inputs.
MAX_CASES = [
    ((2, 3, 7, 9), 3, None, 0, 1, False),
    ((2, 3, 7, 9), 3, 2, 1, 1, False),
    ((2, 3, 7, 9), 3, 2, 1, 1, True),
    ((1, 2, 8, 8), 2, None, 0, 1, False),
    ((1, 2, 5, 6), (2, 3), (1, 2), (1, 0), (2, 1), True),
    ((2, 2, 9, 7), 3, 1, 1, 2, False),
    ((3, 1, 1, 1), 1, 1, 0, 1, False),
    ((1, 4, 6, 5), (3, 2), (2, 3), (1, 1), 1, True),
    ((3, 5, 6), 2, 1, 1, 1, False),
    ((4, 11, 13), (4, 3), (3, 2), (2, 1), (1, 2), True),
    ((2, 3, 4, 4), 4, 4, 0, 1, False),
    ((0, 3, 6, 6), 2, 2, 0, 1, False),
    ((2, 37, 7, 6), 3, 2, 1, 1, True),  # channels_last kernels: a block of 32 channels and a tail
    ((1, 64, 5, 5), (2, 3), (1, 2), (1, 1), (2, 1), False),
    # NCHW rows split by stride phase: outputs across a 16-lane block, strides 3 and 2 with dilation
    ((1, 3, 5, 40), 3, 3, 1, 1, False),
    ((1, 2, 4, 70), (2, 5), (1, 2), (0, 2), (1, 3), True),
    # stride 2 over dense rows: phases split by vector deinterleave, from an odd and an even padded column
    ((1, 2, 5, 45), 3, 2, 1, 1, False),
    ((2, 2, 4, 50), 2, 2, 0, 1, True),
]

# (input shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CASES = [
    ((2, 3, 7, 9), 3, None, 0, False, True, None),
    ((2, 3, 7, 9), 3, 2, 1, False, True, None),
    ((2, 3, 7, 9), 3, 2, 1, False, False, None),
    ((2, 3, 7, 9), 3, 2, 1, True, True, None),
    ((2, 3, 7, 9), 3, 2, 1, True, False, None),
    ((1, 2, 8, 8), 2, None, 0, False, True, 3),
    ((1, 2, 5, 6), (2, 3), (1, 2), (1, 1), True, False, None),
    ((1, 2, 5, 6), (2, 3), (1, 2), (1, 1), True, True, -2),
    ((3, 1, 1, 1), 1, 1, 0, False, True, None),
    ((3, 5, 6), 2, 1, 1, False, False, None),
    ((4, 11, 13), (4, 3), (3, 2), (2, 1), True, True, 5),
    ((2, 4, 7, 7), 7, None, 0, False, True, None),
    ((0, 3, 6, 6), 2, 2, 0, False, True, None),
    ((2, 37, 7, 6), 3, 2, 1, True, False, None),  # channels_last kernels: a block of 32 channels and a tail
    ((1, 64, 5, 5), (2, 3), (1, 2), (1, 1), False, True, 7),
    ((1, 3, 5, 40), (2, 4), 3, (1, 2), True, False, None),  # NCHW row phases across a 16-lane block
    ((1, 3, 6, 47), 3, 2, 1, False, True, None),  # stride 2, dense rows: the vector deinterleave
    ((2, 2, 4, 66), 2, None, 0, True, False, None),
    # stride 1 (overlapping windows): the backward's shifted-run column sums, across vectors
    ((2, 3, 9, 37), 3, 1, 1, False, True, None),
    ((1, 2, 6, 20), (2, 4), 1, (1, 2), True, False, None),
]


def _variants(x):
    yield x
    if x.dim() == 4:
        yield x.contiguous(memory_format=torch.channels_last)
        yield x.transpose(2, 3).contiguous().transpose(2, 3)  # H-W swapped strides


def _distinct(shape, dtype, device):
    """Values without ties (a permutation), so max-pool gradients are unambiguous."""
    n = max(1, torch.Size(shape).numel())
    x = torch.randperm(n, dtype=torch.float64)[: torch.Size(shape).numel()].reshape(shape) / n * 4 - 2
    return x.to(dtype).to(device)


def _check_against_float64(ours, theirs, x, dtype):
    """ours(x) against theirs on x in float64 (rounded to dtype): output, layout, gradient.

    Returns (ours' extra outputs, the reference's) for op-specific checks (indices).
    """
    x = x.detach().requires_grad_()
    xr = x.detach().double().requires_grad_()
    out, ref = ours(x), theirs(xr)
    extra = extra_ref = None
    if isinstance(out, tuple):
        (out, extra), (ref, extra_ref) = out, ref
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref.to(dtype))
    if x.dim() == 4 and _pool.is_channels_last(x):
        assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    assert_close(x.grad, xr.grad.to(dtype))
    return extra, extra_ref


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", MAX_CASES, ids=str)
def test_max_pool2d_matches_torch(backend_device, dtype, case):
    shape, k, s, p, d, ceil = case
    for x in _variants(_distinct(shape, dtype, backend_device)):
        idx, ref_idx = _check_against_float64(
            lambda t: pyops.functional.max_pool2d(t, k, s, p, d, ceil, return_indices=True),
            lambda t: torch.nn.functional.max_pool2d(t, k, s, p, d, ceil, return_indices=True), x, dtype)
        assert idx.dtype == torch.int64
        assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", AVG_CASES, ids=str)
def test_avg_pool2d_matches_torch(backend_device, dtype, case):
    shape, k, s, p, ceil, cip, div = case
    for x in _variants(torch.randn(shape, dtype=torch.float64).to(dtype).to(backend_device)):
        _check_against_float64(lambda t: pyops.functional.avg_pool2d(t, k, s, p, ceil, cip, div),
                               lambda t: torch.nn.functional.avg_pool2d(t, k, s, p, ceil, cip, div), x, dtype)


def test_max_pool2d_overlapping_windows_sum_gradients(backend_device):
    """stride < kernel: one input can be the max of several windows; its gradient sums them."""
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64, device=backend_device)
    x[0, 0, 2, 2] = 10.0
    x.requires_grad_()
    out = pyops.functional.max_pool2d(x, 3, 1)
    out.backward(torch.ones_like(out))
    assert x.grad[0, 0, 2, 2].item() == 9.0 and x.grad.sum().item() == 9.0


def test_max_pool2d_deterministic(backend_device):
    x = torch.randn(2, 3, 17, 17, device=backend_device).round()  # many ties
    grads = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        out = pyops.functional.max_pool2d(xi, 3, 1, 1)
        out.backward(torch.ones_like(out))
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("special", ["nan", "-inf", "ties"])
def test_max_pool2d_nan_inf_ties_like_torch(backend_device, special):
    x = torch.randn(2, 2, 6, 7, device=backend_device)
    if special == "nan":
        x[0, 0, 1, 1] = float("nan")
        x[1, 1, 3, 2:5] = float("nan")
    elif special == "-inf":
        x[0, 0] = float("-inf")
        x[1, 1, :3, :3] = float("-inf")
    else:
        x = x.round().clamp(-1, 1)
    out, idx = pyops.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    ref, ref_idx = torch.nn.functional.max_pool2d(x.cpu(), 3, 2, 1, ceil_mode=True, return_indices=True)
    torch.testing.assert_close(out.cpu(), ref, equal_nan=True)
    assert torch.equal(idx.cpu(), ref_idx)


def test_max_pool2d_window_wholly_in_padding(backend_device):
    """Found by tests/fuzz: with dilation a window can hold no input element at all.

    Its output is -inf with torch's index (which lies outside the window, here outside the
    1x1 plane); it depends on no input, so no gradient flows from it. torch's CPU backward
    writes that gradient out of bounds instead; the C++ backend used to raise.
    """
    x = torch.tensor([[[0.5]]], device=backend_device, requires_grad=True)
    kw = {"kernel_size": (1, 2), "padding": (0, 1), "dilation": (1, 2)}
    out, idx = pyops.functional.max_pool2d(x, return_indices=True, **kw)
    ref, ref_idx = torch.nn.functional.max_pool2d(x.detach().cpu(), return_indices=True, **kw)
    assert torch.equal(out.detach().cpu(), ref) and torch.equal(idx.cpu(), ref_idx)
    out.backward(torch.ones_like(out))
    assert x.grad.abs().sum() == 0


def test_indices_work_with_max_unpool(backend_device):
    x = torch.randn(2, 3, 8, 8, device=backend_device)
    out, idx = pyops.functional.max_pool2d(x, 2, return_indices=True)
    unpooled = torch.nn.functional.max_unpool2d(out.cpu(), idx.cpu(), 2)
    ref = torch.nn.functional.max_unpool2d(*torch.nn.functional.max_pool2d(x.cpu(), 2, return_indices=True), 2)
    assert torch.equal(unpooled, ref)


@pytest.mark.parametrize("fn", ["max", "avg"])
def test_gradcheck(backend_device, fn):
    x = _distinct((2, 2, 5, 6), torch.float64, backend_device).requires_grad_()
    if fn == "max":
        f = lambda t: pyops.functional.max_pool2d(t, (3, 2), (2, 1), 1, (1, 2), True)  # noqa: E731
    else:
        f = lambda t: pyops.functional.avg_pool2d(t, 3, 2, 1, True, False)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), fast_mode=interpreting(backend_device))


def test_output_size_rule_matches_torch():
    for size, k, p, s, d, ceil in itertools.product([1, 2, 5, 8], [1, 2, 3], [0, 1], [1, 2, 3], [1, 2], [False, True]):
        if p > ((k - 1) * d + 1) // 2 or size + 2 * p < (k - 1) * d + 1:
            continue
        x = torch.zeros(1, 1, size, size)
        ref = torch.nn.functional.max_pool2d(x, k, s, p, d, ceil).shape[-1]
        assert _pool.output_size(size, k, p, s, d, ceil) == ref, (size, k, p, s, d, ceil)


def test_divisor_rule_matches_torch():
    x = torch.ones(1, 1, 5, 6, dtype=torch.float64)
    for cip, ceil in itertools.product([True, False], [True, False]):
        out = torch.nn.functional.avg_pool2d(x, (3, 2), (2, 2), 1, ceil, cip)
        for oh, ow in itertools.product(range(out.shape[2]), range(out.shape[3])):
            # sum of ones inside the input / divisor = torch's value
            hs, ws = oh * 2 - 1, ow * 2 - 1
            inside = (min(hs + 3, 5) - max(hs, 0)) * (min(ws + 2, 6) - max(ws, 0))
            div = _pool.avg_divisor(oh, ow, (5, 6), (3, 2), (2, 2), (1, 1), cip, None)
            assert abs(inside / div - out[0, 0, oh, ow].item()) < 1e-12


BAD_POOL_ARGS = [
    # (function, args, kwargs) that torch rejects
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 0), {}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 2), {"stride": 0}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 2), {"dilation": 0}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 2), {"padding": 2}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 2), {"padding": -1}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 5), {}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), (2, 2, 2)), {}),
    ("max_pool2d", (torch.randn(3, 4), 2), {}),
    ("max_pool2d", (torch.randn(1, 2, 3, 4, 4), 2), {}),
    ("max_pool2d", (torch.randn(2, 0, 4, 4), 2), {}),
    ("max_pool2d", (torch.randn(2, 3, 4, 4), 2.0), {}),
    ("max_pool2d", ([1.0, 2.0], 2), {}),
    ("avg_pool2d", (torch.randn(2, 3, 4, 4), 2), {"padding": 2}),
    ("avg_pool2d", (torch.randn(2, 3, 4, 4), 2), {"divisor_override": 0}),
    ("avg_pool2d", (torch.randn(2, 3, 4, 4), 0), {}),
    ("avg_pool2d", (torch.randn(2, 3, 4, 4), 2), {"stride": (1, 2, 3)}),
    ("avg_pool2d", (torch.randn(2, 3, 2, 2), 3), {}),
]


@pytest.mark.parametrize("fn,args,kwargs", BAD_POOL_ARGS, ids=[f"{f}-{i}" for i, (f, *_ ) in enumerate(BAD_POOL_ARGS)])
def test_bad_arguments_raise_like_torch(fn, args, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.nn.functional, fn)(*args, **kwargs)
    with pytest.raises(theirs.type):
        getattr(pyops.functional, fn)(*args, **kwargs)


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (pyops.nn.MaxPool2d, torch.nn.MaxPool2d, {"kernel_size": 3}),
    (pyops.nn.MaxPool2d, torch.nn.MaxPool2d, {"kernel_size": (3, 2), "stride": 2, "padding": 1, "dilation": 1,
                                              "return_indices": True, "ceil_mode": True}),
    (pyops.nn.AvgPool2d, torch.nn.AvgPool2d, {"kernel_size": 3}),
    (pyops.nn.AvgPool2d, torch.nn.AvgPool2d, {"kernel_size": 2, "stride": 1, "padding": 1, "ceil_mode": True,
                                              "count_include_pad": False, "divisor_override": 3}),
])
def test_modules_match_torch(backend_device, ours, theirs, kwargs):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert isinstance(a, theirs) and repr(a) == repr(b)
    x = torch.randn(2, 3, 9, 8, device=backend_device)
    ya, yb = a(x), b(x)
    if isinstance(ya, tuple):
        assert torch.equal(ya[1], yb[1])
        ya, yb = ya[0], yb[0]
    assert_close(ya, yb)


@pytest.mark.parametrize("fn", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_expanded_and_strided_gradients(backend_device, fn, channels_last):
    """Gradients that are not dense (out.sum() expands a scalar) give torch's result."""
    x = _distinct((2, 3, 6, 7), torch.float64, backend_device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    getattr(pyops.functional, fn)(xa, 3, 2, 1).sum().backward()
    getattr(torch.nn.functional, fn)(xb, 3, 2, 1).sum().backward()
    assert_close(xa.grad, xb.grad)
    # a gradient with permuted strides
    xa.grad = xb.grad = None
    ya = getattr(pyops.functional, fn)(xa, 2)
    yb = getattr(torch.nn.functional, fn)(xb, 2)
    g = torch.randn(ya.shape[::-1], dtype=ya.dtype, device=ya.device).permute(3, 2, 1, 0)
    ya.backward(g)
    yb.backward(g)
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fn", ["max_pool2d", "avg_pool2d"])
def test_int64_index_path_matches(fn, channels_last, monkeypatch):
    """The Triton kernels' int64 index variant (taken past 2^31 offsets) gives the int32 one's
    result (NCHW: native division against multiply-shift division)."""
    import pyops.ops.pooling as pooling_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter
    x = _distinct((2, 3, 9, 8), torch.float32, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (3, 2, 1, 2, True) if fn == "max_pool2d" else (3, 2, 1, True, False)
    results = []
    for force in (False, True):
        monkeypatch.setattr(pooling_ops, "needs_int64", lambda *t, force=force: force)
        xi = x.clone().requires_grad_()
        with pyops.backend("triton"):
            out = getattr(pyops.functional, fn)(xi, *args)
            out.backward(torch.arange(out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape))
        results.append((out, xi.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [2**31 - 1, 2**31 - 3])
@pytest.mark.parametrize("fn", ["max_pool2d", "avg_pool2d"])
def test_stride_near_int32_limit(backend_device, fn, stride, channels_last):
    """A window search of row + padding + stride past 2^31 (the backward takes 64-bit indices)."""
    x = _distinct((2, 3, 5, 6), torch.float64, backend_device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.cpu().clone().requires_grad_()
    ya = getattr(pyops.functional, fn)(xa, 3, stride, 1)
    yb = getattr(torch.nn.functional, fn)(xb, 3, stride, 1)
    g = torch.randn(yb.shape, dtype=torch.float64)
    ya.backward(g.to(backend_device))
    yb.backward(g)
    assert_close(ya.cpu(), yb)
    assert_close(xa.grad.cpu(), xb.grad)
