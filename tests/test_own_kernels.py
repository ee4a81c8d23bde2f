"""Forward and backward run pyops' own operators and never the torch op they replace."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyops

FORBIDDEN = ("sigmoid", "bernoulli", "dropout", "rand", "uniform", "batch_norm", "aten::var", "aten::mean",
             "sqrt")


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket._qualified_op_name if hasattr(func, "overloadpacket") else func))
        return func(*args, **(kwargs or {}))


def _run(fn, x):
    fwd, bwd = OpLog(), OpLog()
    with fwd:
        y = fn(x)
    g = torch.ones_like(y)
    with bwd:
        y.backward(g)
    return fwd.ops, bwd.ops


@pytest.mark.parametrize("name,fn,fwd_op,bwd_op", [
    ("sigmoid", pyops.functional.sigmoid, "pyops::sigmoid_forward", "pyops::sigmoid_backward"),
    ("dropout", lambda x: pyops.functional.dropout(x, 0.3), "pyops::dropout", "pyops::dropout"),
    ("batch_norm", lambda x: pyops.functional.batch_norm(x.view(2, 2, 5), torch.zeros(2, device=x.device),
                                                         torch.ones(2, device=x.device), training=True),
     "pyops::batch_norm_train", "pyops::batch_norm_backward"),
    ("batch_norm_eval", lambda x: pyops.functional.batch_norm(x.view(2, 2, 5), torch.zeros(2, device=x.device),
                                                              torch.ones(2, device=x.device)),
     "pyops::batch_norm_apply", "pyops::batch_norm_backward"),
])
def test_own_ops_forward_and_backward(backend_device, name, fn, fwd_op, bwd_op):
    x = torch.randn(4, 5, device=backend_device, requires_grad=True)
    fwd, bwd = _run(fn, x)
    assert fwd_op in fwd, fwd
    assert bwd_op in bwd, bwd
    # Drawing the (seed, offset) pair is the one random aten op dropout may call.
    aten = [op for op in fwd + bwd if op.startswith("aten::") and op != "aten::randint"]
    assert not [op for op in aten if any(f in op for f in FORBIDDEN)], aten


def test_dropout_saves_no_mask():
    x = torch.randn(64, 64, requires_grad=True)
    y = pyops.functional.dropout(x, 0.5)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.int64 and saved[0].numel() == 2
