"""pyops.nn modules are torch.nn subclasses: same constructor, repr, state_dict, modes."""
import pytest
import torch

import pyops
from conftest import assert_close


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (pyops.nn.Sigmoid, torch.nn.Sigmoid, {}),
    (pyops.nn.Dropout, torch.nn.Dropout, {}),
    (pyops.nn.Dropout, torch.nn.Dropout, {"p": 0.3, "inplace": True}),
])
def test_surface_matches_torch(ours, theirs, kwargs):
    a, b = ours(**kwargs), theirs(**kwargs)
    assert isinstance(a, theirs)
    assert repr(a) == repr(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    a.load_state_dict(b.state_dict())
    assert a.training and not a.eval().training


def test_sigmoid_module_matches_torch(backend_device):
    x = torch.randn(4, 6, device=backend_device)
    assert_close(pyops.nn.Sigmoid()(x), torch.nn.Sigmoid()(x))


def test_dropout_module_modes(backend_device):
    m = pyops.nn.Dropout(0.5)
    x = torch.ones(2000, device=backend_device)
    y = m(x)
    assert ((y == 0) | (y == 2)).all() and (y == 0).any() and (y == 2).any()
    m.eval()
    assert m(x) is x
    m.train()
    m.p = 0.0
    assert m(x) is x


def test_dropout_module_inplace(backend_device):
    m = pyops.nn.Dropout(0.5, inplace=True)
    x = torch.ones(100, device=backend_device)
    y = m(x)
    assert y is x and (x == 0).any()


def test_modules_in_a_model_train_step(backend_device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), pyops.nn.Sigmoid(), pyops.nn.Dropout(0.2),
                                torch.nn.Linear(16, 1)).to(backend_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 8, device=backend_device)
    loss = model(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
