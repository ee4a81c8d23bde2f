"""Forward and backward run pyops' own operators and never the torch op they replace."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyops
from pyops._dispatch import select

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
    # dropout's backward: the saved keep bits on the C++ backend, the regenerated mask on Triton's
    ("dropout", lambda x: pyops.functional.dropout(x, 0.3), "pyops::dropout_bits",
     ("pyops::dropout_apply_bits", "pyops::dropout_bits")),
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
    if isinstance(bwd_op, tuple):
        bwd_op = bwd_op[0] if select(x) == "cpp" else bwd_op[1]
    assert fwd_op in fwd, fwd
    assert bwd_op in bwd, bwd
    # Drawing the (seed, offset) pair is the one random aten op dropout may call.
    aten = [op for op in fwd + bwd if op.startswith("aten::") and op != "aten::randint"]
    assert not [op for op in aten if any(f in op for f in FORBIDDEN)], aten


def test_dropout_saves_seed_and_at_most_one_bit_per_element(backend_device):
    """Dropout saves its (seed, offset) pair and, on the C++ backend, one keep bit per
    element (64 int64 words for 4096 elements); on Triton's no mask at all."""
    x = torch.randn(64, 64, device=backend_device, requires_grad=True)
    y = pyops.functional.dropout(x, 0.5)
    seed_offset, bits = y.grad_fn.saved_tensors
    assert seed_offset.dtype == torch.int64 and seed_offset.numel() == 2
    assert bits.dtype == torch.int64 and bits.numel() == (64 if select(x) == "cpp" else 0)
