"""With torch.use_deterministic_algorithms(True), every op runs and repeats bitwise (both backends).

No pyops kernel uses atomics: reductions (conv weight gradient, batch-norm statistics and
gradient sums, pooling backward) write per-program partials merged in a fixed order.
"""
import pytest
import torch

import pyops

F = pyops.functional

OPS = {
    "conv2d": lambda x, w: F.conv2d(x, w, padding=1, groups=2),
    "conv_transpose2d": lambda x, w: F.conv_transpose2d(x, w, stride=2),  # w as (in 4, out 2, 3, 3)
    "max_pool2d": lambda x, w: F.max_pool2d(x, 3, 1, 1),  # overlapping windows: scattered gradients
    "avg_pool2d": lambda x, w: F.avg_pool2d(x, 3, 1, 1, ceil_mode=True),
    "batch_norm": lambda x, w: F.batch_norm(x, None, None, training=True),
    "sigmoid": lambda x, w: F.sigmoid(x),
    "dropout": lambda x, w: F.dropout(x, 0.3),
}


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("name", sorted(OPS))
def test_repeated_runs_are_bitwise_equal(backend_device, deterministic, name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 7, generator=g).to(backend_device)
    w = torch.randn(4, 2, 3, 3, generator=g).to(backend_device)
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # dropout's mask comes from torch's generator
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = OPS[name](xi, wi)
        grads = torch.autograd.grad(y, [xi, wi], torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y),
                                    allow_unused=True)
        results.append([y, *grads])
    for a, b in zip(*results):
        assert (a is None and b is None) or torch.equal(a, b)
