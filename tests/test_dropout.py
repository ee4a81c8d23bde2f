"""Dropout: torch's semantics, the statistics of the mask, reproducibility, and one
Philox stream shared by both backends."""
import math

import pytest
import torch

import pyops
from conftest import BACKEND_CASES, FLOAT_DTYPES, assert_close, interpreting
from pyops.ops.dropout import DropoutFunction, keep_rule


def _seed_offset(seed=1234, offset=5678, device="cpu"):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


@pytest.mark.parametrize("p,error", [(-0.1, ValueError), (1.1, ValueError), (float("nan"), RuntimeError)])
def test_invalid_p_raises_like_torch(p, error):
    x = torch.randn(3)
    with pytest.raises(error, match="dropout probability has to be between 0 and 1"):
        torch.nn.functional.dropout(x, p)  # the rule we copy
    with pytest.raises(error, match="dropout probability has to be between 0 and 1"):
        pyops.functional.dropout(x, p)
    if error is ValueError:
        with pytest.raises(ValueError):
            pyops.nn.Dropout(p)


def test_bad_input_types():
    with pytest.raises(TypeError, match="input"):
        pyops.functional.dropout([1.0, 2.0], 0.5)
    with pytest.raises(RuntimeError, match="floating-point"):
        pyops.functional.dropout(torch.ones(3, dtype=torch.int64), 0.5)


@pytest.mark.parametrize("inplace", [False, True])
def test_identity_when_eval_or_p_zero(backend_device, inplace):
    x = torch.randn(5, 7, device=backend_device)
    assert pyops.functional.dropout(x, 0.5, training=False, inplace=inplace) is x
    assert pyops.functional.dropout(x, 0.0, inplace=inplace) is x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_p_one_gives_zeros(backend_device, dtype):
    x = torch.randn(33, 5, dtype=dtype, device=backend_device, requires_grad=True)
    y = pyops.functional.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_values_scaled_and_backward_uses_same_mask(backend_device, dtype, p):
    x = (torch.rand(4099, dtype=torch.float64) + 0.5).to(dtype).to(backend_device).requires_grad_()
    y = pyops.functional.dropout(x, p)
    kept = y != 0
    expected = (x.detach().double() / (1 - p)).to(dtype)
    assert_close(y[kept], expected[kept])
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad != 0, kept & (g != 0))
    assert_close(x.grad[kept], (g.double() / (1 - p)).to(dtype)[kept])


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_kept_fraction_statistics(backend_device, p):
    n = 1 << 16
    x = torch.ones(n, device=backend_device)
    y = pyops.functional.dropout(x, p)
    kept = (y != 0).double().mean().item()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 6 * sd, (kept, 1 - p)
    # Mean is preserved in expectation: E[y] = 1.
    assert abs(y.double().mean().item() - 1.0) < 6 * sd / (1 - p)
    # No visible structure: neighbouring elements are (nearly) uncorrelated.
    m = (y != 0).double()
    corr = torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()
    assert abs(corr) < 0.03


def test_manual_seed_reproduces_and_calls_differ(backend_device):
    x = torch.randn(1000, device=backend_device)
    torch.manual_seed(7)
    a = pyops.functional.dropout(x)
    b = pyops.functional.dropout(x)
    torch.manual_seed(7)
    c = pyops.functional.dropout(x)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_seed_and_offset_both_change_the_mask(backend_device):
    x = torch.ones(4096, device=backend_device)
    base = torch.ops.pyops.dropout(x, _seed_offset(device=backend_device), 0.5)
    other_seed = torch.ops.pyops.dropout(x, _seed_offset(seed=1235, device=backend_device), 0.5)
    other_offset = torch.ops.pyops.dropout(x, _seed_offset(offset=5679, device=backend_device), 0.5)
    assert not torch.equal(base, other_seed)
    assert not torch.equal(base, other_offset)


TRITON_DEVICES = [d for b, d in BACKEND_CASES if b == "triton"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,p", [((4099,), 0.5), ((3, 5, 7, 11), 0.25), ((1,), 0.9), ((2, 1030), 0.999)], ids=str)
def test_same_mask_on_both_backends(device, dtype, shape, p):
    """C++ (CPU) and Triton (interpreter or GPU) draw one Philox stream: same seed, same mask."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    so = _seed_offset(seed=2**40 + 17, offset=2**33 + 3)
    with pyops.backend("cpp"):
        a = torch.ops.pyops.dropout(x, so, p)
    with pyops.backend("triton"):
        b = torch.ops.pyops.dropout(x.to(device), so.to(device), p).cpu()
    assert torch.equal(a != 0, b != 0)
    if dtype == torch.bfloat16:
        assert_close(a, b)  # the interpreter rounds float32 -> bfloat16 toward zero
    else:
        assert torch.equal(a, b)
    if device == "cpu":  # the public API, seeded by torch.manual_seed (one generator for both)
        with pyops.backend("cpp"):
            torch.manual_seed(3)
            c = pyops.functional.dropout(x, p)
        with pyops.backend("triton"):
            torch.manual_seed(3)
            d = pyops.functional.dropout(x, p)
        assert torch.equal(c != 0, d != 0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mask_independent_of_triton_block_size(device):
    """The stream is a function of the element index, not of the launch configuration."""
    tk = pyops._dispatch.triton_kernels()
    x = torch.randn(5000)
    so = _seed_offset()
    threshold, scale = keep_rule(0.5)
    with pyops.backend("cpp"):
        expected = torch.ops.pyops.dropout(x, so, 0.5)
    xd, sod = x.to(device), so.to(device)
    for cfg in tk.dropout.CONFIGS:
        out = torch.empty_like(xd)
        block = cfg.kwargs["BLOCK"]
        grid = (triton_cdiv(x.numel(), block),)
        tk.dropout.dropout_kernel[grid](xd, out, sod, x.numel(), threshold, scale, BLOCK=block, num_warps=cfg.num_warps)
        assert torch.equal(out.cpu(), expected), cfg


def triton_cdiv(a, b):
    return (a + b - 1) // b


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_inplace_mutates_input(backend_device, dtype):
    x = torch.randn(6, 7, dtype=dtype, device=backend_device)
    before = x.clone()
    torch.manual_seed(11)
    y = pyops.functional.dropout(x, 0.4, inplace=True)
    assert y is x
    torch.manual_seed(11)
    expected = pyops.functional.dropout(before, 0.4)
    assert torch.equal(x, expected)


def test_inplace_on_non_contiguous_view(backend_device):
    base = torch.randn(8, 10, device=backend_device)
    keep = base.clone()
    view = base[:, ::2]
    torch.manual_seed(5)
    pyops.functional.dropout(view, 0.5, inplace=True)
    assert torch.equal(base[:, 1::2], keep[:, 1::2])  # untouched columns
    torch.manual_seed(5)
    expected = pyops.functional.dropout(keep[:, ::2], 0.5)
    assert torch.equal(base[:, ::2], expected)


def test_inplace_autograd_like_torch(backend_device):
    leaf = torch.randn(5, device=backend_device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        pyops.functional.dropout(leaf, 0.5, inplace=True)
    x = torch.randn(50, device=backend_device, requires_grad=True)
    h = x * 2
    y = pyops.functional.dropout(h, 0.5, inplace=True)
    y.sum().backward()
    kept = y != 0
    assert torch.equal(x.grad != 0, kept)
    assert_close(x.grad[kept], torch.full_like(x.grad[kept], 4.0))


def test_nan_propagates_like_torch(backend_device):
    """torch multiplies by the scaled mask, so NaN stays NaN even where dropped."""
    x = torch.full((64,), float("nan"), device=backend_device)
    assert torch.isnan(pyops.functional.dropout(x, 0.5)).all()
    assert torch.isnan(torch.nn.functional.dropout(x.cpu(), 0.5)).all()


def test_layouts_and_memory_format(backend_device):
    x = torch.randn(2, 3, 4, 5, device=backend_device).contiguous(memory_format=torch.channels_last)
    y = pyops.functional.dropout(x, 0.5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    t = torch.randn(6, 9, device=backend_device).t()
    yt = pyops.functional.dropout(t, 0.5)
    kept = yt != 0
    assert_close(yt[kept], t[kept] * 2)


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_gradcheck(backend_device, shape, p):
    x = torch.randn(shape, dtype=torch.float64, device=backend_device, requires_grad=True)
    so = _seed_offset(device=backend_device)
    assert torch.autograd.gradcheck(lambda t: DropoutFunction.apply(t, so, p, False), (x,),
                                    fast_mode=interpreting(backend_device))


def test_zero_dim_and_empty(backend_device):
    e = torch.empty(0, 3, device=backend_device)
    assert pyops.functional.dropout(e, 0.5).shape == (0, 3)
    s = torch.tensor(2.0, device=backend_device)
    y = pyops.functional.dropout(s, 0.5)
    assert y.shape == () and y.item() in (0.0, 4.0)


@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (65,), (4099,), (3, 5, 7, 11)], ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_cpu_saves_keep_bits_and_backward_applies_them(shape, inplace):
    """On the C++ backend the forward saves its keep decisions as bits (bit i % 64 of word
    i // 64 for element i of the dense storage: 1/32 of a float32 input) and the backward
    applies them: the bits match the forward's zeros, the gradient (and the gradient of the
    gradient) keeps the same elements, for channels_last input and in place."""
    with pyops.backend("cpp"):
        base = torch.rand(shape, dtype=torch.float64) + 0.5
        if len(shape) == 4:
            base = base.contiguous(memory_format=torch.channels_last)
        x = base.clone().requires_grad_()
        h = x * 1.0
        y = pyops.functional.dropout(h, 0.5, inplace=inplace)
        seed_offset, bits = y.grad_fn.saved_tensors
        n = y.numel()
        assert bits.dtype == torch.int64 and bits.numel() == (n + 63) // 64
        flat = y.detach().permute(0, 2, 3, 1).reshape(-1) if len(shape) == 4 else y.detach().reshape(-1)
        words = bits.repeat_interleave(64)[:n]
        from_bits = ((words >> (torch.arange(n) % 64)) & 1).bool()
        assert torch.equal(from_bits, flat != 0)
        g = torch.randn_like(y).requires_grad_()
        (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
        kept = y.detach() != 0
        assert torch.equal(gx.detach() != 0, kept & (g.detach() != 0))
        assert_close(gx.detach()[kept], g.detach()[kept] * 2)
        (ggx,) = torch.autograd.grad(gx, g, torch.ones_like(gx))
        assert torch.equal(ggx, kept.to(ggx.dtype) * 2)
