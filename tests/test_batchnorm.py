"""batch_norm, BatchNorm2d and SyncBatchNorm against torch, on both backends."""
import itertools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import pyops
from conftest import BACKEND_CASES, FLOAT_DTYPES, assert_close, interpreting

# (shape, channels_last): 4-D, odd channel counts, N=1 with H*W > 1, (N, C), (N, C, L), 5-D.
SHAPES = [
    ((4, 3, 5, 7), False),
    ((4, 3, 5, 7), True),
    ((1, 5, 4, 3), False),
    ((1, 5, 4, 3), True),
    ((6, 7), False),
    ((3, 4, 9), False),
    ((2, 3, 2, 3, 4), False),
    ((3, 1, 3, 3), True),
]
# (training, affine, running stats given, momentum)
MODES = [
    (True, True, True, 0.1),
    (True, False, True, 0.0),
    (True, True, False, 0.1),
    (True, True, True, 1.0),
    (False, True, True, 0.1),
    (False, False, True, 0.1),
]


def _params(C, dtype, device, affine):
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, dtype=pdtype) + 0.5).to(device).requires_grad_() if affine else None
    b = torch.randn(C, dtype=pdtype).to(device).requires_grad_() if affine else None
    rm = torch.randn(C, dtype=pdtype).to(device)
    rv = (torch.rand(C, dtype=pdtype) + 0.5).to(device)
    return w, b, rm, rv


def _run(fn, x, w, b, rm, rv, training, momentum, g):
    """fn's output, running stats after the call and gradients of x, w, b (float64 copies)."""
    x = x.detach().requires_grad_()
    y = fn(x, rm, rv, w, b, training, momentum, 1e-5)
    inputs = [x] + [t for t in (w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, g.to(y.dtype))
    return y, rm, rv, grads


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("training,affine,running,momentum", MODES)
def test_batch_norm_matches_torch(backend_device, dtype, shape, channels_last, training, affine, running, momentum):
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = _params(C, dtype, "cpu", affine)
    g = torch.randn(shape, dtype=torch.float64)
    # float64 reference on the input rounded to dtype
    xr = x.to(dtype).double()
    ref = _run(F.batch_norm, xr, *[t.detach().double().requires_grad_() if t is not None else None for t in (w, b)],
               rm.double().clone() if running else None, rv.double().clone() if running else None, training,
               momentum, g)
    dev = backend_device
    ours = _run(pyops.functional.batch_norm, x.to(dtype).to(dev),
                *[t.detach().to(dev).requires_grad_() if t is not None else None for t in (w, b)],
                rm.clone().to(dev) if running else None, rv.clone().to(dev) if running else None, training,
                momentum, g.to(dev))
    y, y_ref = ours[0], ref[0]
    assert y.dtype == dtype and y.shape == y_ref.shape
    if channels_last and shape[0] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y.cpu(), y_ref.to(dtype))
    if running:
        stat_dtype = ours[1].dtype
        for a, r in zip(ours[1:3], ref[1:3]):
            torch.testing.assert_close(a.cpu(), r.to(stat_dtype), atol=1e-5 if stat_dtype != torch.float64 else 1e-12,
                                       rtol=1e-5 if stat_dtype != torch.float64 else 1e-12)
    for a, r in zip(ours[3], ref[3]):
        # half-precision gradients: dx involves cancelling sums, allow a few roundings
        scale = 4 if dtype in (torch.float16, torch.bfloat16) else 1
        atol, rtol = {torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2), torch.float32: (1e-5, 1e-5),
                      torch.float64: (1e-10, 1e-10)}[dtype]
        torch.testing.assert_close(a.cpu().double(), r.to(a.dtype).double(), atol=atol * scale, rtol=rtol * scale)


# Input layouts: how batch norm picks its storage order (torch's suggest_memory_format rule)
# and what the output's strides are, as torch's. (shape, make the view from a contiguous x)
LAYOUTS = [
    ((3, 4, 5, 6), lambda x: x.contiguous(memory_format=torch.channels_last)),
    ((2, 3, 4, 3, 5), lambda x: x.contiguous(memory_format=torch.channels_last_3d)),
    ((3, 4, 5, 6), lambda x: x.transpose(2, 3)),                     # not dense in either order
    ((3, 4, 5, 12), lambda x: x[..., ::2]),                          # strided view
    ((3, 4, 5, 6), lambda x: x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)),  # C outermost
    ((3, 4, 1, 1), lambda x: x.contiguous(memory_format=torch.channels_last)),  # both orders at once
    ((2, 5, 7), lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)),    # (N, L, C) storage, 3-D
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,layout", LAYOUTS)
def test_input_layouts_match_torch(backend_device, shape, layout, training):
    torch.manual_seed(0)
    x = layout(torch.randn(shape, dtype=torch.float64))
    g = layout(torch.randn(shape, dtype=torch.float64))
    C = x.shape[1]
    params = _params(C, torch.float64, "cpu", True)
    results = []
    for fn, dev in ((F.batch_norm, "cpu"), (pyops.functional.batch_norm, backend_device)):
        w, b, rm, rv = [t.detach().clone().to(dev) for t in params]
        w.requires_grad_(), b.requires_grad_()
        xi = x.to(dev).requires_grad_()
        y = fn(xi, rm, rv, w, b, training, 0.1, 1e-5)
        results.append((y, rm, rv, *torch.autograd.grad(y, (xi, w, b), g.to(dev))))
    ref, ours = results
    assert ours[0].stride() == ref[0].stride()
    assert ours[3].stride() == ref[3].stride()
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.cpu(), r, atol=1e-10, rtol=1e-10)


def test_large_mean_float32_keeps_the_variance(backend_device):
    """Mean 1e4, std 1 in float32: a one-pass E[x^2] - E[x]^2 would lose the variance entirely."""
    torch.manual_seed(0)
    x64 = torch.randn(8, 3, 16, 16, dtype=torch.float64) + 1e4
    x = x64.float()
    rm, rv = torch.zeros(3, device=backend_device), torch.ones(3, device=backend_device)
    y = pyops.functional.batch_norm(x.to(backend_device), rm, rv, training=True, momentum=1.0)
    ref = F.batch_norm(x.double(), None, None, training=True)
    # x itself carries float32's 1e4 * 2^-24 ~ 6e-4 rounding; the output may not be better than that
    torch.testing.assert_close(y.cpu().double(), ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(rv.cpu().double(), x.double().var(dim=(0, 2, 3)), atol=0, rtol=1e-4)


@pytest.mark.parametrize("shape", [(300, 70, 4, 4), (1400, 3, 7, 7)])
def test_cpp_small_planes_match_float64(shape):
    """C++ planes under 64 elements are reduced across images, per block of channels and tile of
    images: (300, 70, 4, 4) has two channel blocks and two image tiles, (1400, 3, 7, 7) two image
    splits of many tiles. Float32 against torch in float64, forward, running stats and gradients."""
    torch.manual_seed(0)
    C = shape[1]
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 100
    x64 = x64.float().double()
    g = torch.randn(shape, dtype=torch.float64)
    w64, b64 = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    rm, rv = torch.zeros(C), torch.ones(C)
    with pyops.backend("cpp"):
        ours = _run(pyops.functional.batch_norm, x64.float(), w64.float().requires_grad_(),
                    b64.float().requires_grad_(), rm.clone(), rv.clone(), True, 0.5, g)
    ref = _run(F.batch_norm, x64, w64.clone().requires_grad_(), b64.clone().requires_grad_(), rm.double(),
               rv.double(), True, 0.5, g)
    torch.testing.assert_close(ours[0].double(), ref[0], atol=2e-5, rtol=1e-5)
    for a, r in zip(ours[1:3], ref[1:3]):
        torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)
    for a, r in zip(ours[3], ref[3]):
        torch.testing.assert_close(a.double(), r, atol=1e-4 * r.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 70, 5, 6), (2, 40, 3, 5), (5, 130, 4, 4), (2, 96, 64, 48), (2, 1100, 7, 7),
                                   (4, 520, 7, 7), (64, 1100, 1, 1)])
def test_cpp_channels_last_blocks_match_float64(shape, training, dtype):
    """C++ channels_last float/double kernels hold blocks of 4 vectors of channels in registers
    (64 float or 32 double channels): 70 and 130 channels are whole blocks plus a partial one,
    40 a partial block whose last vector is itself partial; 90 and 80 rows span several row
    tiles, 2x96x64x48's 6144 rows many reduction tiles. 2x1100x7x7 and 64x1100x1x1 are reduced
    by groups of channels (the last one partial) and take the backward by group, 4x520x7x7
    is reduced by groups but its backward makes two passes; (N, C, 1, 1) is channel-minor in
    both layouts. Forward, running stats and all gradients against torch in float64."""
    torch.manual_seed(0)
    C = shape[1]
    x64 = (torch.randn(shape, dtype=torch.float64) * 3 + 50).to(dtype).double()
    x64 = x64.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w64, b64 = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    with pyops.backend("cpp"):
        ours = _run(pyops.functional.batch_norm, x64.to(dtype), w64.to(dtype, copy=True).requires_grad_(),
                    b64.to(dtype, copy=True).requires_grad_(), rm.to(dtype, copy=True), rv.to(dtype, copy=True), training,
                    0.5, g.to(dtype))
    ref = _run(F.batch_norm, x64, w64.clone().requires_grad_(), b64.clone().requires_grad_(), rm.clone(),
               rv.clone(), training, 0.5, g)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours[0].double(), ref[0], atol=tol, rtol=tol)
    for a, r in zip(ours[1:3], ref[1:3]):
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol)
    for a, r in zip(ours[3], ref[3]):
        torch.testing.assert_close(a.double(), r, atol=10 * tol * r.abs().max().item(), rtol=10 * tol)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,channels_last", [((2, 3, 5, 7), False), ((2, 3, 5, 7), True), ((2, 5, 9, 9), False)])
def test_int64_index_path_matches(monkeypatch, shape, channels_last, training):
    """The Triton kernels' int64 index variant (taken past 2^31 offsets: native division, 64-bit
    rows and columns) gives the int32 one's results bit for bit, forward, running stats and gradients."""
    import pyops.ops.batch_norm as bn_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float32) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, g = torch.rand(shape[1]) + 0.5, torch.randn(shape[1]), torch.randn(shape)
    results = []
    for force in (False, True):
        monkeypatch.setattr(bn_ops, "needs_int64", lambda *t, force=force: force)
        xi, wi, bi = (t.to(device).requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        with pyops.backend("triton"):
            y = pyops.functional.batch_norm(xi, rm, rv, wi, bi, training, 0.1, 1e-5)
            grads = torch.autograd.grad(y, (xi, wi, bi), g.to(device))
        results.append((y.detach(), rm, rv, *grads))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def _permuted_empty(shape, perm):
    """An uninitialised tensor of ``shape`` whose dims are stored in the order ``perm`` (outermost first)."""
    return torch.empty([shape[d] for d in perm]).permute(*[perm.index(d) for d in range(len(shape))])


def test_empty_input_like_torch(backend_device):
    """An empty input is ATen's special case: the input's copy times weight[0] plus bias[0], with
    those ops' strides and dtype for every storage order of the input (an odd one with
    affine parameters gives other strides than the input's), zero gradients for weight and
    bias, no statistics."""
    for shape, perm, params, training in itertools.product(
            [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)], itertools.permutations(range(4)), ["", "w", "b", "wb"],
            [True, False]):
        results = []
        for f in (F.batch_norm, pyops.functional.batch_norm):
            x = _permuted_empty(shape, perm).to(backend_device).requires_grad_()
            w = torch.rand(3, device=backend_device, requires_grad=True) if "w" in params else None
            b = torch.rand(3, device=backend_device, requires_grad=True) if "b" in params else None
            rm, rv = torch.zeros(3, device=backend_device), torch.ones(3, device=backend_device)
            y = f(x, rm, rv, w, b, training)
            g = _permuted_empty(shape, perm[::-1]).to(backend_device)
            inputs = [t for t in (x, w, b) if t is not None]
            grads = torch.autograd.grad(y, inputs, g)
            results.append([(y.shape, y.stride(), y.dtype), rm.tolist(), rv.tolist(),
                            [(t.shape, t.stride(), t.tolist() if t.numel() else None) for t in grads]])
        assert results[0] == results[1], (shape, perm, params, training)


LENIENT_EMPTY_ARGS = [  # torch checks nothing else of an empty input's batch norm
    ((torch.empty(0, 3, 2), torch.zeros(5), torch.ones(5)), {"training": True}),
    ((torch.empty(0, 3, 2), None, None), {"weight": torch.ones(5), "bias": torch.ones(2, 2)}),
    ((torch.empty(0), None, None), {"training": True}),                       # 1-D
    ((torch.empty(0, 3, dtype=torch.int64), None, None), {"weight": torch.ones(3)}),  # promoted by weight[0]
    ((torch.empty(0, 3, dtype=torch.float16), None, None), {"weight": torch.ones(3, dtype=torch.float64)}),
]


@pytest.mark.parametrize("args,kwargs", LENIENT_EMPTY_ARGS, ids=[str(i) for i in range(len(LENIENT_EMPTY_ARGS))])
def test_empty_input_takes_what_torch_takes(args, kwargs):
    ref = F.batch_norm(*args, **kwargs)
    y = pyops.functional.batch_norm(*args, **kwargs)
    assert (y.shape, y.stride(), y.dtype) == (ref.shape, ref.stride(), ref.dtype)


def _ncl_view(shape, nlc: bool, gen, dtype, scale=1.0, shift=0.0):
    """A random (N, C, L) tensor stored channel-major, or channel-minor (an (N, L, C) tensor's view)."""
    N, C, L = shape
    t = torch.randn((N, L, C) if nlc else shape, generator=gen, dtype=torch.float64) * scale + shift
    return (t.permute(0, 2, 1) if nlc else t).to(dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,nlc", [
    ((2, 64, 49), False), ((4, 3, 63), False), ((2, 16, 3136), False), ((1, 8, 100), False), ((8, 6, 9), False),
    ((2, 1, 5000), False), ((8, 16, 49), False), ((16, 4, 36), False), ((16, 300, 1), False),
    ((2, 64, 49), True), ((1, 1100, 100), True), ((2, 2048, 49), True), ((4, 200, 130), True), ((3, 5, 7), True)])
def test_backward_in_one_call_equals_its_parts(shape, nlc, dtype, training):
    """The C++ backward with both parts in one call (training, or eval with the weight's
    gradient: one channel, or one group of channels, at a time, its rows re-read from cache:
    csrc/batchnorm.cpp backward_by_channel / backward_by_group, where they apply) gives the
    separate operators' (gradient sums, then input gradient) results bit for bit."""
    from pyops.ops import batch_norm as B

    gen = torch.Generator().manual_seed(0)
    x3 = _ncl_view(shape, nlc, gen, dtype, 3, 2)
    g3 = _ncl_view(shape, nlc, gen, dtype)
    C = shape[1]
    w = torch.rand(C, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    cpp = B.cpp_extension()
    if training:
        with pyops.backend("cpp"):
            _, stats = B.batch_norm_train(x3, None, None, w, None, 0.1, 1e-5)
        count, mean, var = stats.unbind(0)
    else:
        count, mean, var = None, torch.randn(C, generator=gen).to(dtype), torch.rand(C, generator=gen).to(dtype) + 0.5
    dx, red = cpp.batch_norm_backward(g3, x3, mean, var, w, count, 1e-5, True, True, nlc)
    sums = cpp.batch_norm_backward_reduce(g3, x3, mean, var, 1e-5, nlc)  # float64, as the one call keeps them
    dx_parts = torch.empty_strided(x3.shape, x3.stride(), dtype=dtype)
    cpp.batch_norm_backward_input(g3, x3, dx_parts, mean, var, w, sums if training else var,
                                  count if training else var, 1e-5, training, nlc)
    assert dx.stride() == x3.stride()
    assert torch.equal(dx, dx_parts) and torch.equal(red, sums.to(red.dtype))


def test_running_stats_untouched_by_an_empty_batch(backend_device):
    rm, rv = torch.zeros(3, device=backend_device), torch.ones(3, device=backend_device)
    x = torch.randn(0, 3, 4, 4, device=backend_device, requires_grad=True)
    y = pyops.functional.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert (rm == 0).all() and (rv == 1).all() and x.grad.shape == x.shape


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend_device, training):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64, device=backend_device, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64, device=backend_device) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=backend_device, requires_grad=True)
    rm = torch.randn(2, dtype=torch.float64, device=backend_device)
    rv = torch.rand(2, dtype=torch.float64, device=backend_device) + 0.5

    def f(x, w, b):
        return pyops.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=interpreting(backend_device))


def test_repeated_runs_are_bitwise_equal(backend_device):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 9, 7, device=backend_device, requires_grad=True)
    w = torch.rand(4, device=backend_device, requires_grad=True)
    outs = []
    for _ in range(2):
        y = pyops.functional.batch_norm(x, None, None, w, None, training=True)
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y).cumsum(-1))
        outs.append((y, gx, gw))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input, like torch

_x = torch.randn(2, 3, 4, 4)
BAD_BN_ARGS = [
    ((torch.randn(3), None, None), {"training": True}),                     # 1-D
    ((torch.randn(1, 3), None, None), {"training": True}),                  # one value per channel
    ((torch.randn(1, 3, 1), None, None), {"training": True}),
    ((_x, torch.zeros(4), torch.ones(3)), {"training": True}),              # running_mean length
    ((_x, torch.zeros(3), torch.ones(5)), {"training": False}),             # running_var length
    ((_x, torch.zeros(3), torch.ones(3)), {"weight": torch.ones(4)}),       # weight length
    ((_x, torch.zeros(3), torch.ones(3)), {"bias": torch.ones(2)}),         # bias length
    ((_x, None, None), {"training": False}),                                # eval without running stats
    ((_x.int(), None, None), {"training": True}),                           # integer input
    ((_x.double(), torch.zeros(3), torch.ones(3)), {"training": True}),     # mixed dtypes
    ((torch.randn(1), None, None), {"training": True}),                     # 1-D, one value
    ((_x, None, None), {"training": True, "momentum": None}),               # momentum must be a float
    ((_x, None, None), {"training": True, "eps": 0.0}),
    ((torch.empty(0, 3, 2), None, None), {"training": True, "eps": -1.0}),   # checked on empty input too
    ((torch.empty(0, 0, 2), None, None), {"weight": torch.ones(0), "training": True}),  # weight[0]
    ((torch.empty(0, 0, 2), None, None), {"bias": torch.ones(0), "training": True}),
    ((torch.empty(0, 3, 2), None, None), {"weight": torch.tensor(1.0), "training": True}),
    ((_x, torch.zeros(3, requires_grad=True), torch.ones(3)), {"training": True}),  # not differentiable
    ((_x, torch.zeros(3), torch.ones(3, requires_grad=True)), {"training": False}),
]


@pytest.mark.parametrize("training", [True, False])
def test_strided_running_stats_like_torch(backend_device, training):
    """Running statistics that are views with a stride are read, and updated in place, as torch does."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    results = []
    for f, device in ((F.batch_norm, "cpu"), (pyops.functional.batch_norm, backend_device)):
        stats = torch.arange(12, dtype=torch.float64).view(2, 6).to(device) + 1
        rm, rv = stats[0, ::2], stats[1, 1::2]
        y = f(x.to(device), rm, rv, None, None, training, 0.3)
        results.append((y.cpu(), stats.cpu()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_negative_eps_in_eval_is_a_value_error():
    """torch 2.13 raises it (older releases returned NaN for a variance below -eps: silently wrong)."""
    with pytest.raises(ValueError, match="non-negative"):
        pyops.functional.batch_norm(_x, torch.zeros(3), torch.ones(3), eps=-1e-5)


@pytest.mark.parametrize("args,kwargs", BAD_BN_ARGS, ids=[str(i) for i in range(len(BAD_BN_ARGS))])
def test_bad_arguments_raise_like_torch(args, kwargs):
    with pytest.raises(Exception) as theirs:
        F.batch_norm(*args, **kwargs)
    with pytest.raises(theirs.type):
        pyops.functional.batch_norm(*args, **kwargs)


def test_non_tensor_input_is_a_type_error():
    # torch fails here with AttributeError ('str' object has no attribute 'size'); a TypeError naming
    # the argument is what its other functionals raise
    with pytest.raises(TypeError, match="input"):
        pyops.functional.batch_norm("x", None, None, training=True)
    with pytest.raises(TypeError, match="weight"):
        pyops.functional.batch_norm(_x, None, None, weight=[1.0, 2.0, 3.0], training=True)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
                                    {"momentum": 0.0, "eps": 1e-3}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm2d_module_matches_torch(backend_device, kwargs, channels_last):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(5, **kwargs)
    ours = pyops.nn.BatchNorm2d(5, **kwargs).to(backend_device)
    assert repr(ours) == repr(theirs) and ours.state_dict().keys() == theirs.state_dict().keys()
    if kwargs.get("affine", True):
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(3, 5, 4, 6) * (step + 1)).contiguous(memory_format=fmt)
        g = torch.randn(x.shape)
        xo = x.to(backend_device).requires_grad_()
        xt = x.detach().clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        assert_close(yo.cpu(), yt)
        assert yo.is_contiguous(memory_format=fmt)
        yo.backward(g.to(backend_device))
        yt.backward(g)
        assert_close(xo.grad.cpu(), xt.grad, torch.float32)
    if ours.weight is not None:  # gradients accumulated over the three steps
        assert_close(ours.weight.grad.cpu(), theirs.weight.grad, torch.float32)
        assert_close(ours.bias.grad.cpu(), theirs.bias.grad, torch.float32)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5, msg=name)
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 5, 3, 3)
    assert_close(ours(x.to(backend_device)).cpu(), theirs(x))


def test_batchnorm2d_rejects_non_4d_like_torch():
    for x in (torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4, 4)):
        with pytest.raises(ValueError, match="expected 4D input"):
            pyops.nn.BatchNorm2d(3)(x)


def test_sync_batchnorm_without_process_group_is_batchnorm(backend_device):
    torch.manual_seed(0)
    ours, theirs = pyops.nn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    assert repr(ours) == repr(torch.nn.SyncBatchNorm(4))
    x = torch.randn(3, 4, 5, 5)
    assert_close(ours.to(backend_device)(x.to(backend_device)).cpu(), theirs(x))
    assert_close(ours.running_var.cpu(), theirs.running_var)


def test_convert_sync_batchnorm_shares_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3),
                                torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=None)))
    bn = model[1]
    out = pyops.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    assert type(model[1]) is pyops.nn.SyncBatchNorm and type(model[2][0]) is pyops.nn.SyncBatchNorm
    assert model[1].weight is bn.weight and model[1].running_mean is bn.running_mean
    assert model[2][0].momentum is None


# ---------------------------------------------------------------- SyncBatchNorm over 2 processes


def _sync_worker(rank: int, world: int, init_file: str, backend: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # every rank draws the same full batch, then keeps its half
        x = torch.randn(6, 5, 4, 3, dtype=torch.float64)
        g = torch.randn(6, 5, 4, 3, dtype=torch.float64)
        half = slice(rank * 3, rank * 3 + 3)
        m = pyops.nn.SyncBatchNorm(5, momentum=0.3).double()
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        xs = x[half].clone().requires_grad_()
        with pyops.backend(backend):
            y = m(xs)
            y.backward(g[half])
        torch.save({"y": y.detach(), "gx": xs.grad, "gw": m.weight.grad, "gb": m.bias.grad,
                    "rm": m.running_mean, "rv": m.running_var, "nbt": m.num_batches_tracked},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", sorted({b for b, d in BACKEND_CASES if d == "cpu"}))
def test_sync_batchnorm_two_processes_equal_one_batchnorm(backend):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.fail("torch.distributed is not available in this torch build")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sync_worker, args=(2, os.path.join(tmp, "init"), backend, tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, 4, 3, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(5, momentum=0.3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    y = ref(x)
    y.backward(g)
    tol = {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["gx"] for r in results]), x.grad, **tol)
    # weight and bias gradients stay per process (DDP averages them), so they sum to the whole batch's
    torch.testing.assert_close(results[0]["gw"] + results[1]["gw"], ref.weight.grad, **tol)
    torch.testing.assert_close(results[0]["gb"] + results[1]["gb"], ref.bias.grad, **tol)
    for r in results:
        torch.testing.assert_close(r["rm"], ref.running_mean, **tol)
        torch.testing.assert_close(r["rv"], ref.running_var, **tol)
        assert r["nbt"].item() == 1
