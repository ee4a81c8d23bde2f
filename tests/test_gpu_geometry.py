"""The tile configs, split counts and grids the launchers choose for a GPU, run on the Triton backend.

On CUDA tensors the launchers take large tiles, split-K counts and grids sized by the
multiprocessor count; Triton's interpreter normally gets the smallest ones (fast on tiny
tensors). ``forced_gpu_geometry`` makes any device take the GPU's choices, so a bug that
depends on a config or a grid computation shows before a GPU run: with 1 multiprocessor
the launchers pick their largest tiles, with 132 (an H100) the grids and splits a real
launch gets. Compared with torch, forward and backward. (On a GPU these run on CUDA.)
"""
import pytest
import torch

import pyops
from conftest import BACKEND_CASES, assert_close
from pyops.ops import _launch
from pyops.ops._launch import forced_gpu_geometry
from test_conv import _compare as compare_conv

F = torch.nn.functional
TRITON = [d for b, d in BACKEND_CASES if b == "triton"]
SMS = [1, 132]


@pytest.fixture(params=TRITON)
def device(request):
    with pyops.backend("triton"):
        yield request.param


def test_forced_geometry_picks_the_gpu_configs():
    from pyops.ops import conv

    cpu = torch.device("cpu")
    configs = conv._configs(torch.float32)
    assert conv._heuristic(configs, cpu, 64, 64, 1) is configs[0]
    with forced_gpu_geometry(1):
        assert conv._heuristic(configs, cpu, 64, 64, 1) is configs[-1]   # largest tile that fills 1 SM
        assert conv.wgrad_splits(1, 1 << 16, 32, cpu) == 2                # 2 * SMs / tiles
    with forced_gpu_geometry(132):
        assert conv._heuristic(configs, cpu, 64, 64, 1) is configs[1]    # nothing fills 132 SMs
        assert conv.wgrad_splits(1, 1 << 16, 32, cpu) == 64               # capped
    assert not _launch.gpu_geometry(cpu)


# (input, weight, kwargs, transpose): enough pixels for split-K (>= 16 * BLOCK_K: the weight
# gradient's reduction splits in 2 at 132 SMs), strided transposes (dgrad's stride phases), groups
CONV_CASES = [
    ((2, 32, 16, 16), (48, 32, 3, 3), dict(padding=1), False),
    ((2, 32, 17, 15), (64, 16, 3, 3), dict(stride=2, padding=1, groups=2), False),
    ((2, 32, 9, 8), (32, 24, 4, 4), dict(stride=2, padding=1), True),
]


@pytest.mark.parametrize("dtype,sms", [(torch.bfloat16, 1), (torch.bfloat16, 132), (torch.float32, 1),
                                       (torch.float32, 132), (torch.float64, 1)], ids=str)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_with_gpu_tiles(device, case, dtype, sms):
    # (float64's split-K and grids are float32's; its 1-SM tile is its largest)
    xs, ws, kwargs, transpose = CONV_CASES[case]
    with forced_gpu_geometry(sms):
        compare_conv(device, dtype, xs, ws, kwargs, transpose, channels_last=case != 1)


# (shape, channels_last): long NCHW rows (L >= 512), short rows, channels_last; rows longer
# than the widest elementwise tile (NCHW L > 1024, channels_last C > 256)
BN_CASES = [((2, 3, 24, 24), False), ((4, 20, 5, 7), False), ((4, 70, 5, 6), True), ((2, 3, 33, 33), False),
            ((3, 300, 2, 3), True)]


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("shape,channels_last", BN_CASES)
def test_batch_norm_with_gpu_tiles(device, shape, channels_last, sms):
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    results = []
    for fn, dev, dtype in ((pyops.functional.batch_norm, device, torch.float32), (F.batch_norm, "cpu", torch.float64)):
        xi = x.to(dev, dtype).requires_grad_()
        wi, bi = (t.to(dev, torch.float32 if dtype == torch.float32 else dtype).requires_grad_() for t in (w, b))
        rm, rv = torch.zeros(C, device=dev, dtype=wi.dtype), torch.ones(C, device=dev, dtype=wi.dtype)
        with forced_gpu_geometry(sms):
            y = fn(xi, rm, rv, wi, bi, True, 0.1, 1e-5)
            grads = torch.autograd.grad(y, (xi, wi, bi), g.to(dev, dtype))
        results.append([t.detach().cpu().double() for t in (y, rm, rv, *grads)])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-4 * max(1.0, ref.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("op", ["sigmoid", "dropout", "max_pool2d", "avg_pool2d"])
def test_elementwise_big_blocks(device, op, monkeypatch):
    """The big-tensor block (the last config), taken here by small tensors."""
    monkeypatch.setattr(_launch, "BIG_ELEMENTWISE", 0)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 36, 30, dtype=torch.float64).to(device, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xr = x.detach().cpu().double().requires_grad_()
    if op == "dropout":
        with forced_gpu_geometry(132):
            y = pyops.functional.dropout(x, 0.3)
        kept = (y != 0).cpu()
        assert 0.6 < kept.double().mean().item() < 0.8
        torch.testing.assert_close(y.cpu()[kept], (x.detach().cpu() / 0.7)[kept])
        with forced_gpu_geometry(132):
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        torch.testing.assert_close(gx.cpu(), kept.float() / 0.7)
        return
    kwargs = {"sigmoid": {}, "max_pool2d": dict(kernel_size=3, stride=2, padding=1),
              "avg_pool2d": dict(kernel_size=3, stride=2, padding=1)}[op]
    with forced_gpu_geometry(132):
        y = getattr(pyops.functional, op)(x, **kwargs)
    ref = (torch.sigmoid if op == "sigmoid" else getattr(F, op))(xr, **kwargs)
    assert_close(y.cpu().double(), ref.detach(), torch.float32)
    g = torch.randn(ref.shape, dtype=torch.float64)
    with forced_gpu_geometry(132):
        (gx,) = torch.autograd.grad(y, x, g.to(y.device, y.dtype))
    (gr,) = torch.autograd.grad(ref, xr, g)
    assert_close(gx.cpu().double(), gr, torch.float32)
