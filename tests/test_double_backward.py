"""Double backward is not implemented yet: it must raise, never return a wrong second derivative."""
import pytest
import torch

import pyops

OPS = {
    "sigmoid": lambda x: pyops.functional.sigmoid(x),
    "dropout": lambda x: pyops.functional.dropout(x, 0.5),
    "max_pool2d": lambda x: pyops.functional.max_pool2d(x, 2),
    "avg_pool2d": lambda x: pyops.functional.avg_pool2d(x, 2),
    "conv2d": lambda x: pyops.functional.conv2d(x, torch.ones(3, 2, 2, 2, dtype=x.dtype, device=x.device)),
    "conv_transpose2d": lambda x: pyops.functional.conv_transpose2d(
        x, torch.ones(2, 3, 2, 2, dtype=x.dtype, device=x.device), stride=2),
    "batch_norm": lambda x: pyops.functional.batch_norm(x, None, None, training=True),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_double_backward_raises(backend_device, name):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=backend_device, requires_grad=True)
    y = OPS[name](x)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
