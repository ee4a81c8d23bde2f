"""Sigmoid against torch on every backend: dtypes, shapes, layouts, gradients, stability."""
import pytest
import torch

import pyops
from conftest import FLOAT_DTYPES, assert_close, interpreting

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 5, 7), (1031,), (2, 0, 3)]


def _layouts(x):
    """The same values as x in several memory layouts."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() >= 2:
        yield "transposed", x.transpose(0, -1)
        yield "strided", x[..., ::2]
    if x.dim() == 1 and x.numel() > 2:
        yield "strided", x[1::3]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_torch(backend_device, dtype, shape):
    base = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).to(backend_device)
    for _, x in _layouts(base):
        x = x.detach().requires_grad_()
        y = pyops.functional.sigmoid(x)
        ref = torch.sigmoid(x.detach())
        assert y.shape == ref.shape and y.dtype == ref.dtype
        assert_close(y, ref)
        # Backward is checked from pyops' own output y: near saturation 1 - y is so
        # sensitive that a one-ulp difference in y would dominate the comparison.
        g = torch.randn_like(ref)
        y.backward(g)
        assert_close(x.grad, torch.ops.aten.sigmoid_backward(g, y.detach()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_memory_format_kept(backend_device, dtype):
    x = torch.randn(2, 3, 4, 5, dtype=dtype, device=backend_device).contiguous(memory_format=torch.channels_last)
    y = pyops.functional.sigmoid(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == torch.sigmoid(x).stride()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_stable_for_large_inputs(backend_device, dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([-big, -1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4, big,
                      float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    x = x.clamp(-big, big).to(dtype).to(backend_device)
    x[-3:] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    x.requires_grad_()
    y = pyops.functional.sigmoid(x)
    ref = torch.sigmoid(x.detach())
    assert_close(y, ref)
    assert torch.isfinite(y[:-1]).all()
    assert y[0] == 0 and y[8] == 1 and y[9] == 1 and y[10] == 0
    y.sum().backward()
    assert torch.isfinite(x.grad[:-1]).all()


@pytest.mark.parametrize("shape", [(3,), (2, 3), (1, 2, 3, 2)], ids=str)
def test_gradcheck(backend_device, shape):
    x = torch.randn(shape, dtype=torch.float64, device=backend_device, requires_grad=True)
    assert torch.autograd.gradcheck(pyops.functional.sigmoid, (x,), fast_mode=interpreting(backend_device))


def test_integer_input_promotes_like_torch(backend_device):
    x = torch.arange(-3, 4, device=backend_device)
    y = pyops.functional.sigmoid(x)
    ref = torch.sigmoid(x)
    assert y.dtype == ref.dtype
    assert_close(y, ref)


def test_bad_input():
    with pytest.raises(TypeError, match="input"):
        pyops.functional.sigmoid([1.0, 2.0])
    with pytest.raises(RuntimeError, match="complex"):
        pyops.functional.sigmoid(torch.randn(3, dtype=torch.complex64))
