"""torch.compile(fullgraph=True) traces through pyops (custom operators inside
autograd Functions) without graph breaks, forward and backward."""
import pytest
import torch

import pyops
from conftest import assert_close


def _model(x):
    h = pyops.functional.sigmoid(x * 2.0)
    return pyops.functional.dropout(h, 0.25) + h


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_forward_backward(backend_device, compiler):
    torch._dynamo.reset()
    compiled = torch.compile(_model, fullgraph=True, backend=compiler)
    x = torch.randn(33, 17, device=backend_device, requires_grad=True)
    y = compiled(x)
    g = torch.randn_like(y)
    y.backward(g)
    # The compiled graph draws its own (seed, offset), so check it against the
    # algebra of its own mask rather than against an eager run.
    h = torch.sigmoid(2.0 * x.detach())
    d = y.detach() - h
    kept = d.abs() > 1e-4  # a dropped element leaves only rounding noise
    assert 0 < kept.float().mean() < 1
    assert_close(d[kept], (h / 0.75)[kept])
    dh = g * torch.where(kept, 1.0 + 1.0 / 0.75, 1.0)
    assert_close(x.grad, dh * h * (1 - h) * 2.0)


def test_compiled_module_matches_eager(backend_device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), pyops.nn.Sigmoid(), pyops.nn.Dropout(0.5)).to(backend_device)
    model.eval()  # dropout is the identity: compiled and eager must agree exactly in value
    x = torch.randn(4, 5, device=backend_device, requires_grad=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager)
    gc, = torch.autograd.grad(compiled.sum(), x)
    ge, = torch.autograd.grad(eager.sum(), x)
    assert_close(gc, ge)


def test_compiled_batchnorm_training_matches_eager(backend_device):
    """Running statistics are updated in place by a custom operator: compiled training must do it too."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = pyops.nn.BatchNorm2d(3).to(backend_device)
    compiled_bn = pyops.nn.BatchNorm2d(3).to(backend_device)
    compiled = torch.compile(compiled_bn, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, device=backend_device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        assert_close(yb, ya)
        ya.pow(2).sum().backward()
        yb.pow(2).sum().backward()
        assert_close(xb.grad, xa.grad)
    assert_close(compiled_bn.running_mean, eager.running_mean)
    assert_close(compiled_bn.running_var, eager.running_var)
    assert compiled_bn.num_batches_tracked.item() == 2
