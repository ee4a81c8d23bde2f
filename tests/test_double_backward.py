"""Double (and higher) backward: gradients taken with ``create_graph=True`` differentiate again.

conv2d, conv_transpose2d, avg_pool2d, max_pool2d, sigmoid and dropout build their
backwards from pyops' own differentiable Functions (and, on the CPU, the C++ nodes), to
any order; batch_norm's backward is a Function whose gradient (the second derivative)
is once-differentiable: a third derivative raises a clear error instead of returning a
silently wrong one. ``gradgradcheck`` passes in float64 for all seven on both backends.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import pyops
import pyops.ops.batch_norm
import pyops.ops.conv
import pyops.ops.pooling
import pyops.ops.sigmoid
from conftest import BACKEND_CASES
from pyops._dispatch import triton_interpreted


def _batch_norm(training):
    def f(x, w, b):
        torch.manual_seed(0)
        rm, rv = torch.randn(x.shape[1], dtype=x.dtype), torch.rand(x.shape[1], dtype=x.dtype) + 0.5
        return pyops.functional.batch_norm(x, rm.to(x.device), rv.to(x.device), w, b, training, 0.1, 1e-5)
    return f


def _dropout(x):
    torch.manual_seed(0)  # the same mask on every call gradgradcheck makes
    return pyops.functional.dropout(x, 0.4)


# name -> (function of its tensor arguments, argument shapes); small: the interpreter runs these too
CASES = {
    "sigmoid": (pyops.functional.sigmoid, [(2, 3, 4)]),
    "dropout": (_dropout, [(3, 7)]),
    "max_pool2d": (lambda x: pyops.functional.max_pool2d(x, 3, 2, padding=1, ceil_mode=True), [(1, 2, 6, 5)]),
    "max_pool2d_dilated": (lambda x: pyops.functional.max_pool2d(x, 2, 1, dilation=2), [(1, 2, 5, 5)]),
    "avg_pool2d": (lambda x: pyops.functional.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True,
                                                         count_include_pad=False), [(1, 2, 6, 5)]),
    "avg_pool2d_divisor": (lambda x: pyops.functional.avg_pool2d(x, 2, 1, divisor_override=3), [(2, 1, 4, 4)]),
    "batch_norm": (_batch_norm(True), [(3, 2, 2, 3), (2,), (2,)]),
    "batch_norm_eval": (_batch_norm(False), [(2, 3, 5), (3,), (3,)]),
    "batch_norm_channels_last": (_batch_norm(True), [(2, 3, 2, 2), (3,), (3,)]),
    "conv2d": (lambda x, w, b: pyops.functional.conv2d(x, w, b, stride=2, padding=1, groups=2),
               [(1, 4, 5, 5), (2, 2, 3, 3), (2,)]),
    "conv2d_dilated": (lambda x, w: pyops.functional.conv2d(x, w, padding="same", dilation=2),
                       [(2, 2, 4, 5), (3, 2, 2, 3)]),
    "conv_transpose2d": (lambda x, w, b: pyops.functional.conv_transpose2d(x, w, b, stride=2, padding=1,
                                                                          output_padding=1, groups=2),
                         [(1, 4, 3, 3), (4, 1, 3, 3), (2,)]),
}
# Through the Triton interpreter (a launch costs milliseconds to seconds): one case per op.
TRITON_CASES = {"sigmoid", "dropout", "max_pool2d", "avg_pool2d", "conv2d", "conv_transpose2d", "batch_norm"}


def _inputs(shapes, device, channels_last=False):
    torch.manual_seed(1)
    out = []
    for shape in shapes:
        t = torch.randn(shape, dtype=torch.float64, device=device)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_())
    return out


def _force_functions(monkeypatch):
    """CPU convs, batch norms, poolings and sigmoids that need gradients record the C++ nodes;
    this makes them take the Python Functions."""
    for module in (pyops.ops.conv, pyops.ops.batch_norm, pyops.ops.pooling, pyops.ops.sigmoid):
        monkeypatch.setattr(module, "runs_cpp_eagerly", lambda *a: False)


# (backend, device, conv path): the C++ node or the Python Functions (both exist on the cpp backend)
PATHS = [("cpp", "cpu", "cpp_node"), ("cpp", "cpu", "function")]
PATHS += [(b, d, "function") for b, d in BACKEND_CASES if b == "triton"]


def _gradgradcheck_params():
    for backend, device, path in PATHS:
        for name in sorted(TRITON_CASES if triton_interpreted() and backend == "triton" else CASES):
            if path == "function" and backend == "cpp" and name.startswith("dropout"):
                continue  # dropout has no C++ node: one path
            yield pytest.param(backend, device, path, name, id=f"{backend}-{device}-{path}-{name}")


@pytest.mark.parametrize("backend,device,path,name", list(_gradgradcheck_params()))
def test_gradgradcheck(backend, device, path, name, monkeypatch):
    if path == "function":
        _force_functions(monkeypatch)
    interpreted = triton_interpreted() and backend == "triton"
    fn, shapes = CASES[name]
    args = _inputs(shapes, device, channels_last=name in ("conv2d_dilated", "batch_norm_channels_last"))
    with pyops.backend(backend):
        # The interpreter: fast mode (random projections of the Jacobians) keeps it to a few
        # launches, and the undefined-gradient pass (half of conv's launches) is left to the
        # cpp backend's function path, which runs the same Python Functions.
        assert gradcheck(fn, args, fast_mode=interpreted)
        assert gradgradcheck(fn, args, fast_mode=interpreted, check_undefined_grad=not interpreted)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend,device,path", PATHS, ids=["-".join(p) for p in PATHS])
def test_gradient_penalty_matches_torch(backend, device, path, channels_last, monkeypatch):
    """A WGAN-GP style loss (the gradient's norm with respect to the input, backpropagated
    into the weights) through a swapped model: pyops' second derivatives equal torch's."""
    if path == "function":
        _force_functions(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Sigmoid(),
        torch.nn.MaxPool2d(2, 1),
        torch.nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(2, 1, 1, bias=False)).double().to(device)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def penalty_grads():
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), list(model.parameters()))

    expected = penalty_grads()
    pyops.swap(model)
    with pyops.backend(backend):
        actual = penalty_grads()
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("path", ["cpp_node", "function"])
def test_conv_third_derivative_matches_torch(path, transposed, monkeypatch):
    """The conv family is closed under differentiation: a third derivative equals torch's."""
    if path == "function":
        _force_functions(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    kwargs = dict(stride=2, padding=1)
    ours = pyops.functional.conv_transpose2d if transposed else pyops.functional.conv2d
    theirs = F.conv_transpose2d if transposed else F.conv2d

    def third(conv):
        y = conv(x, w, **kwargs)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad(gw.sin().sum(), (x, w))

    with pyops.backend("cpp"):
        actual = third(ours)
    for a, e in zip(actual, third(theirs)):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)  # values ~1e3: summation order


THIRD_ORDER = {
    "sigmoid": (pyops.functional.sigmoid, torch.sigmoid),
    "avg_pool2d": (lambda t: pyops.functional.avg_pool2d(t, 3, 2, padding=1, count_include_pad=False),
                   lambda t: F.avg_pool2d(t, 3, 2, padding=1, count_include_pad=False)),
    "max_pool2d": (lambda t: pyops.functional.max_pool2d(t, 3, 1, padding=1),
                   lambda t: F.max_pool2d(t, 3, 1, padding=1)),
}


@pytest.mark.parametrize("name", sorted(THIRD_ORDER))
@pytest.mark.parametrize("path", ["cpp_node", "function"])
def test_elementwise_and_pooling_third_derivative_matches_torch(path, name, monkeypatch):
    """Sigmoid and pooling backwards differentiate to any order (C++ nodes and Functions alike):
    a third derivative, through a nonlinearity after the op so that each order is non-zero,
    equals torch's."""
    if path == "function":
        _force_functions(monkeypatch)
    ours, theirs = THIRD_ORDER[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def third(op):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(op(xi).pow(3).sum(), xi, create_graph=True)
        (gg,) = torch.autograd.grad(op(g).pow(3).sum(), xi, create_graph=True)
        return torch.autograd.grad(op(gg).sin().sum(), xi)[0]

    with pyops.backend("cpp"):
        actual = third(ours)
    torch.testing.assert_close(actual, third(theirs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ["cpp_node", "function"])
def test_batch_norm_third_derivative_raises(backend_device, path, monkeypatch):
    if path == "function":
        _force_functions(monkeypatch)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=backend_device, requires_grad=True)
    y = pyops.functional.batch_norm(x, None, None, training=True)
    (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gg.sum().backward()
