"""Differential fuzzing against torch: random valid configurations of every op, forward and backward.

Hypothesis draws shapes (including 1 and primes), strides, paddings, dilations, groups,
ceil_mode, count_include_pad, divisor_override, momentum, dtypes, memory formats and
non-contiguous views; each example runs pyops and torch on the same input and compares
outputs and gradients in float64 (float32 examples against a float64 reference).

On the C++ backend the gradients of conv2d, conv_transpose2d, both poolings, batch norm and
sigmoid are differentiated again (double backward) and compared too.

Budgets: the C++ backend gets FUZZ_EXAMPLES examples per op, the Triton interpreter a
few (it is slow). ``pytest --long`` (or PYOPS_FUZZ=long) runs thousands. A failing
example found here is fixed and kept as an ``@example`` regression case.
"""
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (installed by scripts/setup_env.sh)")
from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pyops
from conftest import BACKEND_CASES

LONG = os.environ.get("PYOPS_FUZZ") == "long"
FUZZ_EXAMPLES = {"cpp": 400 if LONG else 40, "triton": 60 if LONG else 4}
BACKENDS = [(b, d) for b, d in BACKEND_CASES]


def fuzz_settings(backend):
    return settings(max_examples=FUZZ_EXAMPLES[backend], deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 11])
# Channel counts for the pooling kernels, whose channels_last paths work in blocks of 32
# channels plus a tail: below, at and across block edges.
CHANNELS = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 31, 32, 33, 64, 70])
DTYPES = st.sampled_from([torch.float32, torch.float64])


def _layout(x, draw_format):
    """x in one of: contiguous, channels_last, a non-contiguous slice view."""
    if draw_format == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if draw_format == "strided" and x.dim() > 0:
        big = torch.cat([x, x], dim=-1)
        return big[..., ::2]  # same values, every other column: non-contiguous
    return x


def _results(fn, inputs, dtype, device, second_order):
    """fn on (inputs in dtype, on device): [output, every grad, and with ``second_order`` the
    gradients of a fixed direction through the gradients (the incoming one's included)]."""
    xs = [t.to(dtype).to(device).requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    out = fn(*xs)
    results = [out]
    grads = [t for t in xs if t is not None and t.requires_grad]
    if not grads or out.numel() == 0:
        return results
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    g = g.to(dtype).to(device).requires_grad_(second_order)
    first = torch.autograd.grad(out, grads, g, allow_unused=True, create_graph=second_order)
    results += list(first)
    if second_order:
        total = sum((f * torch.linspace(1, 2, f.numel(), dtype=f.dtype, device=f.device).reshape(f.shape)).sum()
                    for f in first if f is not None)
        results += list(torch.autograd.grad(total, [*grads, g], allow_unused=True))
    return results


def _deviation(fn, inputs, dtype, second_order=False) -> float:
    """How far ``fn`` computed in dtype (CPU) lands from ``fn`` in float64 on the same rounded
    values, over everything _check compares: the format's own error for this input."""
    rounded = [t.to(dtype).double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    low = _results(fn, inputs, dtype, "cpu", second_order)
    ref = _results(fn, rounded, torch.float64, "cpu", second_order)
    return max(((a.detach().double() - b.detach()).abs().nan_to_num().max().item()
                for a, b in zip(low, ref) if a is not None and b is not None and a.numel()), default=0.0)


def _check(ours_fn, theirs_fn, inputs, dtype, device, atol=None, second_order=False):
    """Run ours on (inputs in dtype, on device) and theirs in float64 on the same (rounded)
    values; compare outputs and every grad (and second derivatives with ``second_order``)."""
    rounded = [t.to(dtype).double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    ours = _results(ours_fn, inputs, dtype, device, second_order)
    ref = _results(theirs_fn, rounded, torch.float64, "cpu", second_order)
    tol = {"atol": atol or (1e-4 if dtype == torch.float32 else 1e-10),
           "rtol": 1e-4 if dtype == torch.float32 else 1e-10}
    for a, b in zip(ours, ref):
        if a is None or b is None:  # unused on one side: the other's must be zero
            assert (a if b is None else b) is None or not (a if b is None else b).any()
            continue
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), **tol, equal_nan=True)


@st.composite
def conv_cases(draw, transpose=False):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if not transpose and stride == (1, 1) and draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pad = (0, 0) if isinstance(padding, str) else padding
    span = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    lo = [max(1, s - 2 * p) for s, p in zip(span, pad)] if not transpose else [1, 1]
    h, w = draw(st.integers(lo[0], lo[0] + 6)), draw(st.integers(lo[1], lo[1] + 6))
    out_pad = (0, 0)
    if transpose:
        out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        if any(op >= max(s, d) for op, s, d in zip(out_pad, stride, dilation)):
            out_pad = (0, 0)
    return {"n": draw(st.sampled_from([1, 2, 3])), "cin": cin, "cout": cout, "k": k, "stride": stride,
            "dilation": dilation, "padding": padding, "hw": (h, w), "groups": groups, "out_pad": out_pad,
            "bias": draw(st.booleans()), "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
            "dtype": draw(DTYPES), "unbatched": draw(st.booleans()) and not transpose}


def _conv_inputs(c, transpose):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c["n"], c["cin"], *c["hw"], generator=g, dtype=torch.float64)
    if transpose:
        w = torch.randn(c["cin"], c["cout"] // c["groups"], *c["k"], generator=g, dtype=torch.float64)
    else:
        w = torch.randn(c["cout"], c["cin"] // c["groups"], *c["k"], generator=g, dtype=torch.float64)
    b = torch.randn(c["cout"], generator=g, dtype=torch.float64) if c["bias"] else None
    x = _layout(x, c["layout"])
    if c["unbatched"]:
        x = x[0]
    return [x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if b is not None else None]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fuzz_conv2d(backend, device):
    @fuzz_settings(backend)
    @given(conv_cases())
    @example({"n": 1, "cin": 2, "cout": 2, "k": (2, 2), "stride": (1, 1), "dilation": (2, 1), "padding": "same",
              "hw": (3, 4), "groups": 2, "out_pad": (0, 0), "bias": True, "layout": "strided",
              "dtype": torch.float64, "unbatched": True})
    def run(c):
        kw = {"stride": c["stride"], "padding": c["padding"], "dilation": c["dilation"], "groups": c["groups"]}
        with pyops.backend(backend):
            _check(lambda x, w, b: pyops.functional.conv2d(x, w, b, **kw),
                   lambda x, w, b: F.conv2d(x, w, b, **kw), _conv_inputs(c, False), c["dtype"], device,
                   second_order=backend == "cpp")

    run()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fuzz_conv_transpose2d(backend, device):
    @fuzz_settings(backend)
    @given(conv_cases(transpose=True))
    def run(c):
        kw = {"stride": c["stride"], "padding": c["padding"], "dilation": c["dilation"], "groups": c["groups"],
              "output_padding": c["out_pad"]}
        # torch's own rule: the output must not be empty
        out = [(i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, s, p, d, k, op in
               zip(c["hw"], c["stride"], c["padding"], c["dilation"], c["k"], c["out_pad"])]
        if min(out) < 1:
            return
        with pyops.backend(backend):
            _check(lambda x, w, b: pyops.functional.conv_transpose2d(x, w, b, **kw),
                   lambda x, w, b: F.conv_transpose2d(x, w, b, **kw), _conv_inputs(c, True), c["dtype"], device,
                   second_order=backend == "cpp")

    run()


@st.composite
def direct_conv_cases(draw):
    """float32 NCHW convolutions sized for the C++ direct tap kernels (csrc/conv_taps.cpp):
    planes of 16-30 pixels a side, 8-13 channels per group, strides, dilations and
    paddings up to beyond the filter's span (negative input-gradient padding)."""
    groups = draw(st.sampled_from([1, 1, 2]))
    transpose = draw(st.booleans())
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    out_pad = (0, 0)
    if transpose:
        out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        padding = tuple(min(p, d * (kk - 1)) for p, d, kk in zip(padding, dilation, k))
    return {"n": draw(st.sampled_from([1, 2, 3])), "cin": groups * draw(st.integers(8, 13)),
            "cout": groups * draw(st.integers(8, 13)), "k": k, "stride": stride, "dilation": dilation,
            "padding": padding, "hw": (draw(st.integers(16, 30)), draw(st.integers(16, 30))), "groups": groups,
            "out_pad": out_pad, "bias": draw(st.booleans()), "layout": draw(st.sampled_from(["contiguous", "strided"])),
            "dtype": torch.float32, "unbatched": False, "transpose": transpose}


def test_fuzz_conv_direct_taps():
    @fuzz_settings("cpp")
    @given(direct_conv_cases())
    def run(c):
        kw = {"stride": c["stride"], "padding": c["padding"], "dilation": c["dilation"], "groups": c["groups"]}
        ours, theirs = pyops.functional.conv2d, F.conv2d
        if c["transpose"]:
            kw["output_padding"] = c["out_pad"]
            ours, theirs = pyops.functional.conv_transpose2d, F.conv_transpose2d
        # gradients here are float32 sums of up to 2700 terms of size ~1 (bias: of the
        # output gradient, whose sum cancels to ~0): rounding reaches ~1e-4 absolute
        with pyops.backend("cpp"):
            _check(lambda x, w, b: ours(x, w, b, **kw), lambda x, w, b: theirs(x, w, b, **kw),
                   _conv_inputs(c, c["transpose"]), c["dtype"], "cpu", atol=2e-3)

    run()


@st.composite
def pool_cases(draw, max_pool):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    pad = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if max_pool else (1, 1)
    span = [d * (kk - 1) + 1 for d, kk in zip(dilation, k)]
    h = draw(st.integers(max(1, span[0] - 2 * pad[0]), span[0] + 6))
    w = draw(st.integers(max(1, span[1] - 2 * pad[1]), span[1] + 6))
    shape = (draw(SIZES), draw(CHANNELS), h, w) if draw(st.booleans()) else (draw(CHANNELS), h, w)
    return {"shape": shape, "k": k, "stride": stride, "pad": pad, "dilation": dilation,
            "ceil": draw(st.booleans()), "cip": draw(st.booleans()),
            "div": draw(st.one_of(st.none(), st.integers(1, 5), st.integers(-3, -1))),
            "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided"])), "dtype": draw(DTYPES)}


def _distinct(shape):
    n = torch.Size(shape).numel()
    return (torch.randperm(n, generator=torch.Generator().manual_seed(0)).double().reshape(shape) / max(n, 1) - 0.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fuzz_max_pool2d(backend, device):
    @fuzz_settings(backend)
    @given(pool_cases(max_pool=True))
    def run(c):
        kw = {"kernel_size": c["k"], "stride": c["stride"], "padding": c["pad"], "dilation": c["dilation"],
              "ceil_mode": c["ceil"]}
        x = _layout(_distinct(c["shape"]), c["layout"]).requires_grad_()  # no ties: unambiguous gradients
        # A window wholly in the padding (dilation) gives -inf and an index outside the window,
        # where torch sends its gradient (even out of bounds): compared in test_pooling, not here.
        assume(not torch.isinf(F.max_pool2d(x.detach(), **kw)).any())
        with pyops.backend(backend):
            _check(lambda t: pyops.functional.max_pool2d(t, **kw), lambda t: F.max_pool2d(t, **kw), [x],
                   c["dtype"], device, second_order=backend == "cpp")
            ours = pyops.functional.max_pool2d(x.detach().to(device), return_indices=True, **kw)[1]
        assert torch.equal(ours.cpu(), F.max_pool2d(x.detach(), return_indices=True, **kw)[1])

    run()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fuzz_avg_pool2d(backend, device):
    @fuzz_settings(backend)
    @given(pool_cases(max_pool=False))
    def run(c):
        kw = {"kernel_size": c["k"], "stride": c["stride"], "padding": c["pad"], "ceil_mode": c["ceil"],
              "count_include_pad": c["cip"], "divisor_override": c["div"]}
        x = _layout(torch.randn(c["shape"], dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                    c["layout"]).requires_grad_()
        with pyops.backend(backend):
            _check(lambda t: pyops.functional.avg_pool2d(t, **kw), lambda t: F.avg_pool2d(t, **kw), [x],
                   c["dtype"], device, second_order=backend == "cpp")

    run()


@st.composite
def bn_cases(draw):
    rank = draw(st.integers(2, 5))
    shape = [draw(SIZES), draw(SIZES)] + [draw(SIZES) for _ in range(rank - 2)]
    training = draw(st.booleans())
    if training and shape[0] * torch.Size(shape[2:]).numel() == 1:
        shape[0] = 2
    return {"shape": tuple(shape), "training": training, "affine": draw(st.booleans()),
            "running": draw(st.booleans()) or not training,
            "momentum": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])), "eps": draw(st.sampled_from([1e-5, 1e-3])),
            "shift": draw(st.sampled_from([0.0, 100.0])),
            "layout": draw(st.sampled_from(["contiguous", "channels_last", "strided"])), "dtype": draw(DTYPES)}


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fuzz_batch_norm(backend, device):
    @fuzz_settings(backend)
    @given(bn_cases())
    # eval, float32, shift 100: a weight gradient of 1.3 summed from 770 terms of up to ~100
    @example({"shape": (2, 3, 5, 7, 11), "training": False, "affine": True, "running": True, "momentum": 0.0,
              "eps": 1e-05, "shift": 100.0, "layout": "contiguous", "dtype": torch.float32})
    # training, float32, shift 100, two values per channel, one pair 0.03 apart: centring ~100 in
    # float32 leaves ~1e-5 on a spread of 0.03, and the input gradient (exactly 0 for two values)
    # is off by 0.025 in torch's own float32 too (found by --long)
    @example({"shape": (1, 5, 2), "training": True, "affine": True, "running": False, "momentum": 0.0,
              "eps": 1e-05, "shift": 100.0, "layout": "contiguous", "dtype": torch.float32})
    def run(c):
        g = torch.Generator().manual_seed(2)
        C = c["shape"][1]
        x = _layout(torch.randn(c["shape"], dtype=torch.float64, generator=g) + c["shift"], c["layout"])
        x.requires_grad_()
        w = (torch.rand(C, dtype=torch.float64, generator=g) + 0.5).requires_grad_() if c["affine"] else None
        b = torch.randn(C, dtype=torch.float64, generator=g).requires_grad_() if c["affine"] else None
        rm = torch.randn(C, dtype=torch.float64, generator=g)
        rv = torch.rand(C, dtype=torch.float64, generator=g) + 0.5
        stats = {}

        def ours(x, w, b):
            rm_, rv_ = (rm.to(x.dtype, copy=True).to(x.device), rv.to(x.dtype, copy=True).to(x.device)) \
                if c["running"] else (None, None)
            stats["ours"] = (rm_, rv_)
            return pyops.functional.batch_norm(x, rm_, rv_, w, b, c["training"], c["momentum"], c["eps"])

        def theirs(x, w, b):
            rm_, rv_ = (rm.to(x.dtype, copy=True), rv.to(x.dtype, copy=True)) if c["running"] else (None, None)
            stats["theirs"] = (rm_, rv_)
            return F.batch_norm(x, rm_, rv_, w, b, c["training"], c["momentum"], c["eps"])

        with pyops.backend(backend):
            # the shifted input's float32 rounding (100 * 2^-24) bounds what float32 can match; summed
            # over a channel (grad_weight: hundreds of terms of ~100 that may cancel) it reaches ~1e-2
            atol = (1e-2 if c["shift"] else 2e-3) if c["dtype"] == torch.float32 else None
            if c["dtype"] == torch.float32:  # ill-conditioned inputs: up to 4x torch's own float32 error
                atol = max(atol, 4 * _deviation(theirs, [x, w, b], torch.float32, second_order=backend == "cpp"))
            _check(ours, theirs, [x, w, b], c["dtype"], device, atol=atol, second_order=backend == "cpp")
        if c["running"]:
            for a, r in zip(stats["ours"], stats["theirs"]):
                tol = 1e-4 if c["dtype"] == torch.float32 else 1e-10
                torch.testing.assert_close(a.cpu().double(), r, atol=tol, rtol=tol)

    run()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fuzz_sigmoid_and_dropout(backend, device):
    @fuzz_settings(backend)
    @given(st.lists(SIZES, min_size=0, max_size=4), st.floats(0.0, 1.0), DTYPES,
           st.sampled_from(["contiguous", "strided"]), st.floats(-30, 30))
    def run(shape, p, dtype, layout, scale):
        x = _layout(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * scale,
                    layout).requires_grad_()
        with pyops.backend(backend):
            _check(pyops.functional.sigmoid, torch.sigmoid, [x], dtype, device, second_order=backend == "cpp")
            xd = x.detach().to(dtype).to(device).requires_grad_()
            y = pyops.functional.dropout(xd, p, training=True)
            (gx,) = torch.autograd.grad(y, xd, torch.ones_like(y))
        # dropout's algebra: each element is 0 or x / (1 - p); the gradient is the same mask scaled
        scale_p = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        kept = gx != 0
        torch.testing.assert_close(y[kept], xd.detach()[kept] * scale_p, atol=1e-6, rtol=1e-6)
        assert (y[~kept] == 0).all()
        if scale_p:
            torch.testing.assert_close(gx[kept], torch.full_like(gx[kept], scale_p))

    run()
