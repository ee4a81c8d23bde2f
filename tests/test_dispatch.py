"""The one dispatch point: auto picks by device; PYOPS_BACKEND and pyops.backend() override;
impossible requests fail with a RuntimeError that names the fix."""
import os
import subprocess
import sys

import pytest
import torch

import pyops
from pyops._dispatch import requested_backend, select, triton_interpreted


def test_auto_picks_by_device(monkeypatch):
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
    assert requested_backend() == "auto"
    assert select(torch.empty(1)) == "cpp"
    if torch.cuda.is_available():
        assert select(torch.empty(1, device="cuda")) == "triton"


def test_environment_variable_overrides(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND", "cpp")
    assert requested_backend() == "cpp"
    monkeypatch.setenv("PYOPS_BACKEND", "TRITON")
    assert requested_backend() == "triton"
    monkeypatch.setenv("PYOPS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PYOPS_BACKEND"):
        requested_backend()


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND", "triton")
    with pyops.backend("cpp"):
        assert requested_backend() == "cpp"
        with pyops.backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "cpp"
    assert requested_backend() == "triton"
    with pytest.raises(ValueError, match="pyops.backend"):
        with pyops.backend("gpu"):
            pass


@pytest.mark.skipif(not triton_interpreted(), reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
def test_triton_backend_runs_cpu_tensors_in_interpreter(monkeypatch):
    monkeypatch.setenv("PYOPS_BACKEND", "triton")
    x = torch.randn(10)
    assert select(x) == "triton"
    torch.testing.assert_close(pyops.functional.sigmoid(x), torch.sigmoid(x))


def test_cpp_backend_rejects_non_cpu_tensors():
    meta = torch.empty(3, device="meta")
    with pyops.backend("cpp"):
        with pytest.raises(RuntimeError, match="C\\+\\+ backend runs CPU tensors only.*PYOPS_BACKEND=auto"):
            select(meta)
    if torch.cuda.is_available():
        with pyops.backend("cpp"), pytest.raises(RuntimeError, match="CPU tensors only"):
            pyops.functional.sigmoid(torch.randn(3, device="cuda"))


def test_mixed_devices_rejected():
    with pytest.raises(RuntimeError, match="same device.*\\.to\\(device\\)"):
        select(torch.empty(1), torch.empty(1, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="same device"):
            torch.ops.pyops.dropout(torch.randn(4, device="cuda"), torch.zeros(2, dtype=torch.int64), 0.5)


def test_no_backend_for_other_devices():
    with pytest.raises(RuntimeError, match="no backend for meta"):
        select(torch.empty(1, device="meta"))


def test_triton_on_cpu_without_interpreter_names_the_fix():
    """In a fresh process without TRITON_INTERPRET, triton + CPU tensor is a clear error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYOPS_BACKEND"] = "triton"
    code = (
        "import torch, pyops\n"
        "try:\n"
        "    pyops.functional.sigmoid(torch.randn(3))\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout and "PYOPS_BACKEND=cpp" in out.stdout


def test_interpreter_that_cannot_run_names_the_fix(monkeypatch):
    """Triton 3.6's interpreter fails with numpy >= 2.4 (int() of 1-element arrays); pyops says so
    and what to install, instead of failing inside the kernels."""
    import numpy
    import triton

    from pyops import _dispatch

    def problem(triton_version, numpy_version):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        _dispatch.interpreter_problem.cache_clear()
        return _dispatch.interpreter_problem()

    try:
        assert "numpy<2.4 or triton>=3.7" in problem("3.6.0", "2.4.1")
        assert problem("3.6.0+git1234", "2.3.5") is None
        assert problem("3.7.1", "2.4.1") is None
        assert problem("3.10.0", "3.0.0") is None
        if triton_interpreted():
            problem("3.6.0", "2.4.1")
            with pyops.backend("triton"), pytest.raises(RuntimeError, match="numpy<2.4"):
                pyops.functional.sigmoid(torch.randn(3))
    finally:
        monkeypatch.undo()
        _dispatch.interpreter_problem.cache_clear()


def _ops_seen_by_a_dispatch_mode(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        fn()
    return seen


@pytest.mark.parametrize("name", ["avg_pool2d", "max_pool2d", "sigmoid", "batch_norm", "conv2d", "conv_transpose2d"])
def test_eager_shortcut_keeps_operators_visible_to_modes(name):
    """In plain eager mode the Functions call the implementations directly (no dispatcher
    round trip); under a dispatch mode the same calls go through torch.ops.pyops, and
    both give the same result."""
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    calls = {
        "avg_pool2d": lambda: pyops.functional.avg_pool2d(x, 2),
        "max_pool2d": lambda: pyops.functional.max_pool2d(x, 2),
        "sigmoid": lambda: pyops.functional.sigmoid(x),
        "batch_norm": lambda: pyops.functional.batch_norm(x, None, None, training=True),
        "conv2d": lambda: pyops.functional.conv2d(x, w),
        "conv_transpose2d": lambda: pyops.functional.conv_transpose2d(x, w.transpose(0, 1), stride=2),
    }
    eager = calls[name]()
    eager.backward(torch.ones_like(eager))
    grad, x.grad = x.grad, None
    moded = []
    seen = _ops_seen_by_a_dispatch_mode(lambda: moded.append(calls[name]()))
    seen += _ops_seen_by_a_dispatch_mode(lambda: moded[0].backward(torch.ones_like(moded[0])))
    assert any(s.startswith("pyops.") and "forward" in s or s.startswith("pyops.batch_norm_train") for s in seen), seen
    assert any(s.startswith("pyops.") and ("backward" in s or "grad" in s) for s in seen), seen
    assert torch.equal(moded[0], eager) and torch.equal(x.grad, grad)


@pytest.mark.parametrize("name,node", [("batch_norm", "BatchNormNode"), ("conv2d", "ConvNode"),
                                       ("conv_transpose2d", "ConvNode"), ("max_pool2d", "MaxPoolNode"),
                                       ("avg_pool2d", "AvgPoolNode"), ("sigmoid", "SigmoidNode")])
def test_cpu_calls_needing_gradients_build_the_cpp_node(name, node):
    """Plain eager CPU calls that need a gradient record one C++ autograd node (csrc/autograd.h),
    not the Python Function; an empty conv input still takes the Function, and under a
    dispatch mode the Function runs (test_eager_shortcut_keeps_operators_visible_to_modes
    checks that both give the same values and gradients)."""
    w = torch.randn(3, 3, 3, 3)
    calls = {
        "batch_norm": lambda t, train: pyops.functional.batch_norm(t, torch.zeros(3), torch.ones(3), training=train),
        "conv2d": lambda t, train: pyops.functional.conv2d(t, w, torch.zeros(3) if train else None),
        "conv_transpose2d": lambda t, train: pyops.functional.conv_transpose2d(t, w, stride=2),
        "max_pool2d": lambda t, train: pyops.functional.max_pool2d(t, 3, 2 if train else 1, padding=1),
        "avg_pool2d": lambda t, train: pyops.functional.avg_pool2d(t, 3, 2, padding=1, count_include_pad=train),
        "sigmoid": lambda t, train: pyops.functional.sigmoid(t if train else t.transpose(1, 3)),
    }
    for train in (True, False):
        y = calls[name](torch.randn(2, 3, 6, 6, requires_grad=True), train)
        assert node in y.grad_fn.name(), y.grad_fn.name()
    if triton_interpreted():
        with pyops.backend("triton"):  # CPU tensors on the Triton backend (interpreter): the Function
            y = calls[name](torch.randn(2, 3, 6, 6, requires_grad=True), True)
            assert node not in y.grad_fn.name(), y.grad_fn.name()
    if name in ("conv2d", "conv_transpose2d"):
        y = calls[name](torch.randn(0, 3, 6, 6, requires_grad=True), True)
        assert "Function" in y.grad_fn.name() and node not in y.grad_fn.name(), y.grad_fn.name()


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "batch_norm"])
def test_cpp_node_when_only_a_parameter_needs_a_gradient(name):
    """The C++ entries record their node when the weight (or bias) needs a gradient and the
    input does not, as for a network's first layer, and the parameter's gradient matches
    torch's; with no gradient needed anywhere no node is recorded."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(3, 3, 3, 3)
    b = torch.randn(3)
    ours = {"conv2d": pyops.functional.conv2d, "conv_transpose2d": pyops.functional.conv_transpose2d,
            "batch_norm": lambda t, w_, b_: pyops.functional.batch_norm(t, None, None, w_, b_, training=True)}[name]
    theirs = {"conv2d": torch.nn.functional.conv2d, "conv_transpose2d": torch.nn.functional.conv_transpose2d,
              "batch_norm": lambda t, w_, b_: torch.nn.functional.batch_norm(t, None, None, w_, b_, training=True)
              }[name]
    if name == "batch_norm":
        w = torch.rand(3) + 0.5
    for needs in ("weight", "bias"):
        wo, bo = w.clone().requires_grad_(needs == "weight"), b.clone().requires_grad_(needs == "bias")
        wt, bt = w.clone().requires_grad_(needs == "weight"), b.clone().requires_grad_(needs == "bias")
        y, ref = ours(x, wo, bo), theirs(x, wt, bt)
        assert y.grad_fn is not None and "Node" in y.grad_fn.name(), (needs, y.grad_fn)
        g = torch.randn_like(ref)
        (y * g).sum().backward()
        (ref * g).sum().backward()
        mine, want = (wo.grad, wt.grad) if needs == "weight" else (bo.grad, bt.grad)
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(y.detach(), ref.detach(), rtol=1e-4, atol=1e-4)
    assert ours(x, w, b).grad_fn is None


@pytest.mark.parametrize("name", ["avg_pool2d", "max_pool2d", "sigmoid", "batch_norm", "conv2d", "conv_transpose2d"])
def test_no_autograd_node_without_grad(name, monkeypatch):
    """With no argument needing a gradient (torch.no_grad, or none requires it) the
    functional calls run the Function's forward without Function.apply; with one that
    needs it they go through apply (or the C++ node, on the CPU). The two give the same result."""
    from pyops.ops import batch_norm, conv, pooling, sigmoid

    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(3, 3, 3, 3)
    classes = {"avg_pool2d": pooling.AvgPool2dFunction, "max_pool2d": pooling.MaxPool2dFunction,
               "sigmoid": sigmoid.SigmoidFunction, "batch_norm": batch_norm.BatchNormFunction,
               "conv2d": conv.Conv2dFunction, "conv_transpose2d": conv.ConvTranspose2dFunction}
    rm, rv = torch.zeros(3), torch.ones(3)
    calls = {
        "avg_pool2d": lambda t: pyops.functional.avg_pool2d(t, 2),
        "max_pool2d": lambda t: pyops.functional.max_pool2d(t, 2),
        "sigmoid": lambda t: pyops.functional.sigmoid(t),
        "batch_norm": lambda t: pyops.functional.batch_norm(t, rm, rv, training=True),
        "conv2d": lambda t: pyops.functional.conv2d(t, w),
        "conv_transpose2d": lambda t: pyops.functional.conv_transpose2d(t, w, stride=2),
    }
    with_graph = calls[name](x.clone().requires_grad_())
    assert with_graph.grad_fn is not None
    rm_graph = rm.clone()
    rm.zero_()

    def refuse(*args):
        raise AssertionError("Function.apply called without a gradient to track")

    monkeypatch.setattr(classes[name], "apply", refuse)
    plain = calls[name](x)
    with torch.no_grad():
        no_grad = calls[name](x.clone().requires_grad_())
    assert plain.grad_fn is None and no_grad.grad_fn is None
    assert torch.equal(plain, with_graph.detach()) and torch.equal(no_grad, plain)
    if name == "batch_norm":  # both calls moved the running mean as the first did: 0.1 m, then 0.9 * 0.1 m + 0.1 m
        assert torch.allclose(rm, rm_graph * 1.9, rtol=1e-6)


VMAP_CALLS = {
    "sigmoid": (pyops.functional.sigmoid, torch.sigmoid),
    "avg_pool2d": (lambda t: pyops.functional.avg_pool2d(t, 2, padding=1),
                   lambda t: torch.nn.functional.avg_pool2d(t, 2, padding=1)),
    "max_pool2d": (lambda t: pyops.functional.max_pool2d(t, 3, 2), lambda t: torch.nn.functional.max_pool2d(t, 3, 2)),
    "conv2d": (lambda t: pyops.functional.conv2d(t, torch.linspace(-1, 1, 54).view(3, 2, 3, 3)),
               lambda t: torch.nn.functional.conv2d(t, torch.linspace(-1, 1, 54).view(3, 2, 3, 3))),
}


@pytest.mark.parametrize("name", sorted(VMAP_CALLS))
def test_functorch_transforms_take_the_operators(name):
    """Under torch.func transforms the calls go through torch.ops.pyops (their wrapped tensors
    have no storage for a kernel): vmap runs the dispatcher's per-sample fallback and equals
    torch's; torch.func.grad, which needs setup_context Functions, raises a RuntimeError
    instead of reading a wrapped tensor's data."""
    ours, theirs = VMAP_CALLS[name]
    x = torch.randn(3, 2, 5, 6)
    with pyops.backend("cpp"):
        torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.grad(lambda t: ours(t).sum())(x)


def test_inference_mode_matches_torch(backend_device):
    """Under torch.inference_mode (no autograd, inference tensors) every op runs and matches
    torch, and a swapped module in eval mode gives torch's output."""
    from conftest import assert_close

    F, P = torch.nn.functional, pyops.functional
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9, device=backend_device)
    w = torch.randn(6, 4, 3, 3, device=backend_device)
    wt = torch.randn(4, 6, 3, 3, device=backend_device)
    rm, rv = torch.zeros(4, device=backend_device), torch.ones(4, device=backend_device)
    pairs = {
        "conv2d": (lambda t: P.conv2d(t, w, None, 2, 1), lambda t: F.conv2d(t, w, None, 2, 1)),
        "conv_transpose2d": (lambda t: P.conv_transpose2d(t, wt, None, 2, 1), lambda t: F.conv_transpose2d(t, wt, None, 2, 1)),
        "max_pool2d": (lambda t: P.max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1)),
        "avg_pool2d": (lambda t: P.avg_pool2d(t, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1)),
        "sigmoid": (P.sigmoid, torch.sigmoid),
        "batch_norm": (lambda t: P.batch_norm(t, rm.clone(), rv.clone(), training=True),
                       lambda t: F.batch_norm(t, rm.clone(), rv.clone(), training=True)),
    }
    with torch.inference_mode():
        for name, (ours, theirs) in pairs.items():
            out = ours(x)
            assert torch.is_inference(out), name
            assert_close(out, theirs(x))
        y = P.dropout(x, 0.5)
        kept = y != 0
        assert_close(y[kept], x[kept] * 2)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.MaxPool2d(2),
                                    torch.nn.Sigmoid()).to(backend_device).eval()
        expected = model(x)
        assert_close(pyops.swap(model)(x), expected)
