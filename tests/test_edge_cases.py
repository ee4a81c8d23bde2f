"""Edge cases against torch on both backends, and one table of bad input across every op.

Empty batches, 1x1 and single-row/column planes, kernels as large as the input, extreme
values, NaN/inf propagation, float16 overflow, in-place dropout on a view, an int64-index
path on the CPU; and bad arguments: each raises the exception type torch raises, naming
the argument, on both backends (never a crash).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyops
from conftest import BACKEND_CASES, assert_close

P = pyops.functional
# Fixed weights, exactly representable in float16: the float16 cases compare with torch in
# float32 on the same weights (rounding them would move sums across float16's overflow
# threshold, 65520, and the result would depend on the draw).
_gen = torch.Generator().manual_seed(0)
W = torch.randn(4, 3, 3, 3, generator=_gen).half().float()
WT = torch.randn(3, 2, 3, 3, generator=_gen).half().float()

# name -> (ours, theirs), functions of an (N, 3, H, W) input
OPS = {
    "conv2d": (lambda x: P.conv2d(x, W.to(x), padding=1), lambda x: F.conv2d(x, W.to(x), padding=1)),
    "conv_transpose2d": (lambda x: P.conv_transpose2d(x, WT.to(x), stride=2),
                         lambda x: F.conv_transpose2d(x, WT.to(x), stride=2)),
    "max_pool2d": (lambda x: P.max_pool2d(x, 2, ceil_mode=True), lambda x: F.max_pool2d(x, 2, ceil_mode=True)),
    "avg_pool2d": (lambda x: P.avg_pool2d(x, 2, ceil_mode=True), lambda x: F.avg_pool2d(x, 2, ceil_mode=True)),
    "batch_norm": (lambda x: P.batch_norm(x, None, None, training=True),
                   lambda x: F.batch_norm(x, None, None, training=True)),
    "sigmoid": (P.sigmoid, torch.sigmoid),
}


def _both(name, x, device):
    ours, theirs = OPS[name]
    return ours(x.to(device)), theirs(x)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 1, 1), (2, 3, 1, 5), (2, 3, 6, 1), (1, 3, 2, 2)])
def test_small_and_empty_shapes(backend_device, name, shape):
    if name == "batch_norm" and shape == (2, 3, 1, 1):
        shape = (3, 3, 1, 1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    xo = x.detach().to(backend_device).requires_grad_()
    ours, theirs = OPS[name]
    y, ref = ours(xo), theirs(x)
    assert y.shape == ref.shape
    assert_close(y.cpu(), ref.detach())
    if ref.numel():
        g = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(y, xo, g.to(backend_device))
        (gr,) = torch.autograd.grad(ref, x, g)
        assert_close(gx.cpu(), gr)


def _channels_last(*shape):
    return torch.randn(shape, dtype=torch.float64).to(memory_format=torch.channels_last)


# empty inputs stored other than contiguously
EMPTY_LAYOUTS = {
    "no images, channels_last": lambda: _channels_last(0, 3, 4, 4),
    "no images, permuted": lambda: torch.randn(4, 3, 0, 4).permute(2, 1, 0, 3),
    "empty plane, channels_last": lambda: _channels_last(2, 3, 0, 4),
}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("layout", sorted(EMPTY_LAYOUTS))
def test_empty_inputs_like_torch(backend_device, name, layout):
    """The output of an empty input has torch's shape and strides (batch norm keeps the
    input's, sigmoid's is contiguous), or pyops raises what torch raises (a convolution of
    an empty plane with images and channels)."""
    x = EMPTY_LAYOUTS[layout]()
    ours, theirs = OPS[name]
    try:
        ref = theirs(x)
    except Exception as error:  # noqa: BLE001 - whatever torch raises, pyops must raise too
        with pytest.raises(type(error)):
            ours(x.to(backend_device))
        return
    y = ours(x.to(backend_device))
    assert (y.shape, y.stride()) == (ref.shape, ref.stride())


# inputs whose layout torch decides by strides alone (suggest_memory_format): contiguous
# and channels_last at once, or channels_last but sliced
STRIDE_LAYOUTS = {
    "N x C x 1 x 1, channels_last strides": lambda: _channels_last(2, 3, 1, 1),
    "N x 1 x H x W, channels_last strides": lambda: _channels_last(2, 1, 5, 4),
    "N x C x 1 x 1, contiguous": lambda: torch.randn(2, 3, 1, 1, dtype=torch.float64),
    "channels_last, channels sliced": lambda: _channels_last(2, 5, 5, 4)[:, 1:4],
    "channels_last, width sliced": lambda: _channels_last(2, 3, 5, 6)[..., :4],
}
_g = torch.Generator().manual_seed(0)
LAYOUT_OPS = {  # (functional module: torch.nn.functional or pyops.functional, input) -> output
    "conv2d": lambda f, x: f.conv2d(x, torch.randn(4, x.shape[1], 1, 1, generator=_g.manual_seed(1)).to(x)),
    "conv2d, channels_last weight": lambda f, x: f.conv2d(
        x, torch.randn(4, x.shape[1], 1, 1, generator=_g.manual_seed(1)).to(x, memory_format=torch.channels_last)),
    "conv_transpose2d": lambda f, x: f.conv_transpose2d(
        x, torch.randn(x.shape[1], 2, 1, 1, generator=_g.manual_seed(2)).to(x), stride=2),
    "max_pool2d": lambda f, x: f.max_pool2d(x, 1),
    "avg_pool2d": lambda f, x: f.avg_pool2d(x, (1, 2), ceil_mode=True),
    "batch_norm": lambda f, x: f.batch_norm(x, None, None, training=True),
    "batch_norm, eval, affine": lambda f, x: f.batch_norm(
        x, *(torch.rand(x.shape[1], generator=_g.manual_seed(3 + i)).to(x) + i for i in range(4))),
}


@pytest.mark.parametrize("op", sorted(LAYOUT_OPS))
@pytest.mark.parametrize("layout", sorted(STRIDE_LAYOUTS))
def test_layout_chosen_by_strides_like_torch(backend_device, op, layout):
    """Convolution, pooling and batch norm choose their output's layout as torch does, by
    strides (channels_last strides on a tensor that is also contiguous, a sliced channels_last
    view): the output's and the input gradient's strides are torch's, size-1 dims included."""
    x = STRIDE_LAYOUTS[layout]().requires_grad_()
    xo = x.detach().to(backend_device).requires_grad_()
    ref, out = LAYOUT_OPS[op](F, x), LAYOUT_OPS[op](P, xo)
    assert_close(out.cpu(), ref.detach())
    assert out.stride() == ref.stride()
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, xo, g.to(backend_device))
    (gr,) = torch.autograd.grad(ref, x, g)
    assert_close(gx.cpu(), gr)
    assert gx.stride() == gr.stride()


# non-dense views: elementwise ops write a dense output in the view's dim order, as torch
NON_DENSE_VIEWS = {
    "channels_last, channels sliced": lambda: _channels_last(2, 5, 4, 4)[:, 1:4],
    "permuted, stepped": lambda: torch.randn(4, 5, 6, dtype=torch.float64).permute(2, 0, 1)[::2],
    "transposed, columns stepped": lambda: torch.randn(6, 8, dtype=torch.float64).t()[:, ::2],
}
# and dense tensors that are contiguous and channels_last at once: torch's output is contiguous
ELEMENTWISE_LAYOUTS = {**NON_DENSE_VIEWS, **{name: STRIDE_LAYOUTS[name] for name in (
    "N x C x 1 x 1, channels_last strides", "N x 1 x H x W, channels_last strides")}}
ELEMENTWISE = {"sigmoid": (P.sigmoid, torch.sigmoid),
               "dropout": (lambda x: P.dropout(x, 0.5), lambda x: F.dropout(x, 0.5))}


@pytest.mark.parametrize("op", sorted(ELEMENTWISE))
@pytest.mark.parametrize("view", sorted(ELEMENTWISE_LAYOUTS))
def test_elementwise_layout_of_views_like_torch(backend_device, op, view):
    """Sigmoid and dropout of a non-dense view or of a tensor both contiguous and channels_last:
    the output's and the input gradient's strides are torch's (a sliced channels_last view
    stays channels_last, the others become contiguous)."""
    x = ELEMENTWISE_LAYOUTS[view]().requires_grad_()
    xo = x.detach().to(backend_device).requires_grad_()
    ours, theirs = ELEMENTWISE[op]
    out, ref = ours(xo), theirs(x)
    assert out.stride() == ref.stride()
    if op == "sigmoid":
        assert_close(out.cpu(), ref.detach())
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(out, xo, g.to(backend_device))
    (gr,) = torch.autograd.grad(ref, x, g)
    assert gx.stride() == gr.stride()


GRAD_LAYOUTS = {  # an incoming gradient laid out otherwise than the forward's output
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: torch.cat([t, t], 3)[..., ::2],
    "H and W swapped": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
    "expanded": lambda t: t[:1, :1, :1, :1].expand(t.shape),
}
INPUT_LAYOUTS = {"contiguous": lambda t: t, "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
                 "N x C x 1 x 1, channels_last": None}


@pytest.mark.parametrize("grad_layout", sorted(GRAD_LAYOUTS))
@pytest.mark.parametrize("input_layout", sorted(INPUT_LAYOUTS))
def test_sigmoid_gradient_layout_like_torch(backend_device, input_layout, grad_layout):
    """torch's sigmoid_backward(dy, y) lays dx out as TensorIterator does: by dy's strides,
    then y's (an expanded dy's strides are all 0)."""
    shape = (2, 3, 1, 1) if input_layout.startswith("N x C") else (2, 3, 4, 5)
    base = torch.randn(shape, dtype=torch.float64)
    x = (base.contiguous(memory_format=torch.channels_last) if input_layout.startswith("N x C")
         else INPUT_LAYOUTS[input_layout](base)).requires_grad_()
    xo = x.detach().to(backend_device).requires_grad_()
    y, ref = P.sigmoid(xo), torch.sigmoid(x)
    g = GRAD_LAYOUTS[grad_layout](torch.randn(shape, dtype=torch.float64))
    (gx,) = torch.autograd.grad(y, xo, g.to(backend_device))
    (gr,) = torch.autograd.grad(ref, x, g)
    assert gx.stride() == gr.stride()
    assert_close(gx.cpu(), gr)


def test_kernel_as_large_as_the_input(backend_device):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    w = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    assert_close(P.conv2d(x.to(backend_device), w.to(backend_device)).cpu(), F.conv2d(x, w))
    assert_close(P.max_pool2d(x.to(backend_device), (5, 4)).cpu(), F.max_pool2d(x, (5, 4)))
    assert_close(P.avg_pool2d(x.to(backend_device), (5, 4)).cpu(), F.avg_pool2d(x, (5, 4)))


@pytest.mark.parametrize("name", sorted(OPS))
def test_nan_and_inf_propagate_like_torch(backend_device, name):
    x = torch.randn(2, 3, 6, 6)
    x[0, 0, 1, 1] = float("nan")
    x[1, 1, 2, 3] = float("inf")
    x[1, 2, 4, 4] = float("-inf")
    y, ref = _both(name, x, backend_device)
    y = y.cpu()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), name
    assert torch.equal(torch.isinf(y), torch.isinf(ref)), name
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite], torch.float32)


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "sigmoid", "max_pool2d", "avg_pool2d"])
def test_extreme_values_and_float16_overflow(backend_device, name):
    # float16 overflow: sums accumulate in float32 and overflow to inf only on the final cast, as
    # torch's CUDA kernels do (its CPU conv_transpose2d overflows in float16 intermediates: NaN)
    x = torch.full((1, 3, 4, 4), 60000.0).half()
    y = OPS[name][0](x.to(backend_device)).cpu()
    ref = OPS[name][1](x.float()).half()
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and not torch.isnan(y).any(), name
    tiny = torch.full((1, 3, 4, 4), 1e-30)
    y, ref = _both(name, tiny, backend_device)
    assert_close(y.cpu(), ref)


def test_batch_norm_of_huge_and_constant_channels(backend_device):
    x = torch.randn(4, 3, 5, 5) * 1e15
    x[:, 1] = 7.0  # zero variance: output is 0 * invstd(eps) + bias, as torch
    y = P.batch_norm(x.to(backend_device), None, None, training=True)
    ref = F.batch_norm(x.double(), None, None, training=True).float()
    assert_close(y.cpu(), ref, torch.float32)


def test_inplace_dropout_on_a_view(backend_device):
    base = torch.ones(4, 10, device=backend_device)
    view = base[:, 2:6]
    out = P.dropout(view, 0.5, training=True, inplace=True)
    assert out is view
    assert ((base[:, 2:6] == 0) | (base[:, 2:6] == 2)).all() and (base[:, 2:6] == 0).any()
    assert (base[:, :2] == 1).all() and (base[:, 6:] == 1).all()  # outside the view untouched


def test_int64_indexing_on_the_cpu():
    """More than 2^31 elements on the C++ backend: pools over a 46341 x 46341 float16 plane
    (2^31 + 46341 elements, 4 GiB) whose windows (stride h - 3) read its first and last
    three rows only, so only those pages are ever touched. An offset that wraps at 2^31
    reads the wrong row (or faults); max pool's indices pass 2^31 themselves."""
    import os

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if free < 6 * 2**30:
        pytest.skip(f"needs ~6 GiB of free memory, this machine has {free / 2**30:.1f} GiB")
    h, w = 46341, 46341  # h * w > 2^31
    x = torch.empty(1, 1, h, w, dtype=torch.float16)  # untouched rows stay unmapped
    x[0, 0, :3] = 0.0
    x[0, 0, -3:] = 0.0
    x[0, 0, -1, -3:] = 6.0  # past the int32 boundary: lost if an offset wraps
    kernel, stride = (3, 1), (h - 3, 1)
    with pyops.backend("cpp"):
        y = P.avg_pool2d(x, kernel, stride)
        m, idx = P.max_pool2d(x, kernel, stride, return_indices=True)
    assert y.shape == m.shape == (1, 1, 2, w)
    assert torch.equal(y[0, 0, 1, -3:], torch.full((3,), 2.0, dtype=torch.float16))
    assert y[0, 0, :, :-3].abs().sum() == 0 and y[0, 0, 0].abs().sum() == 0
    assert torch.equal(m[0, 0, 1, -3:], torch.full((3,), 6.0, dtype=torch.float16))
    last = (h - 1) * w + w - 3  # > 2^31
    assert torch.equal(idx[0, 0, 1, -3:], torch.arange(last, last + 3))
    assert idx[0, 0, 0, 0] == 0 and idx[0, 0, 1, 0] == (h - 3) * w  # ties: the window's first
    for ours, theirs in ((y, F.avg_pool2d(x, kernel, stride)), ((m, idx), F.max_pool2d(x, kernel, stride,
                                                                                 return_indices=True))):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input, every op

_x = torch.randn(2, 3, 6, 6)
_rm = torch.zeros(3)
BAD = [
    # (case, ours, theirs, word the message must contain)
    ("conv ndim", lambda f: f.conv2d(torch.randn(3, 6), W), "input"),
    ("conv channels", lambda f: f.conv2d(torch.randn(2, 5, 6, 6), W), "channels"),
    ("conv groups", lambda f: f.conv2d(_x, W, groups=2), "groups"),
    ("conv kernel > padded input", lambda f: f.conv2d(torch.randn(1, 3, 2, 2), W), "kernel"),
    ("conv negative padding", lambda f: f.conv2d(_x, W, padding=-1), "padding"),
    ("conv zero stride", lambda f: f.conv2d(_x, W, stride=0), "stride"),
    ("conv mixed dtypes", lambda f: f.conv2d(_x.double(), W), "type"),
    ("conv bias not tensor", lambda f: f.conv2d(_x, W, [1.0]), "bias"),
    ("conv_transpose output_padding", lambda f: f.conv_transpose2d(_x, WT, stride=2, output_padding=2),
     "output padding"),
    ("max_pool padding > k/2", lambda f: f.max_pool2d(_x, 2, padding=2), "pad"),
    ("max_pool zero kernel", lambda f: f.max_pool2d(_x, 0), "kernel"),
    ("max_pool 2-D input", lambda f: f.max_pool2d(torch.randn(6, 6), 2), ""),
    ("avg_pool 2-D input", lambda f: f.avg_pool2d(torch.randn(6, 6), 2), "dimension"),
    ("avg_pool 0-D input", lambda f: f.avg_pool2d(torch.tensor(1.0), 2), "dimension"),
    ("max_pool bool input", lambda f: f.max_pool2d(_x.bool(), 2), ""),
    ("avg_pool zero divisor", lambda f: f.avg_pool2d(_x, 2, divisor_override=0), "divisor"),
    ("avg_pool output empty", lambda f: f.avg_pool2d(torch.randn(1, 1, 1, 1), 2), "size"),
    ("avg_pool complex", lambda f: f.avg_pool2d(_x.to(torch.complex64), 2), ""),
    ("batch_norm running_mean length", lambda f: f.batch_norm(_x, torch.zeros(4), torch.ones(3)), "running_mean"),
    ("batch_norm one value per channel", lambda f: f.batch_norm(torch.randn(1, 3), None, None, training=True),
     "value per channel"),
    ("batch_norm eval without stats", lambda f: f.batch_norm(_x, None, None), "running_mean"),
    ("batch_norm int input", lambda f: f.batch_norm(_x.long(), None, None, training=True), ""),
    ("dropout p > 1", lambda f: f.dropout(_x, 1.5), "probability"),
    ("dropout p < 0", lambda f: f.dropout(_x, -0.1), "probability"),
    ("dropout int input", lambda f: f.dropout(_x.int(), 0.5), ""),
    ("sigmoid not a tensor", lambda f: f.sigmoid([1.0, 2.0]), ""),
    # argument types: torch's parser takes a bool only for a bool, an int-like (no bool or float) for an int
    ("max_pool ceil_mode=1", lambda f: f.max_pool2d(_x, 2, ceil_mode=1), "ceil_mode"),
    ("max_pool ceil_mode=None", lambda f: f.max_pool2d(_x, 2, ceil_mode=None), "ceil_mode"),
    ("avg_pool ceil_mode numpy bool", lambda f: f.avg_pool2d(_x, 2, ceil_mode=np.bool_(True)), "ceil_mode"),
    ("avg_pool count_include_pad=0", lambda f: f.avg_pool2d(_x, 2, count_include_pad=0), "count_include_pad"),
    ("avg_pool divisor float", lambda f: f.avg_pool2d(_x, 2, divisor_override=2.0), "divisor_override"),
    ("avg_pool divisor bool", lambda f: f.avg_pool2d(_x, 2, divisor_override=True), "divisor_override"),
    ("avg_pool divisor float tensor", lambda f: f.avg_pool2d(_x, 2, divisor_override=torch.tensor(2.0)),
     "divisor_override"),
    ("dropout training=None", lambda f: f.dropout(_x, 0.5, training=None), "train"),
    ("dropout training=1, p=0", lambda f: f.dropout(_x, 0.0, training=1), "train"),
    ("batch_norm training=1", lambda f: f.batch_norm(_x, None, None, training=1), "training"),
    ("batch_norm momentum=None", lambda f: f.batch_norm(_x, None, None, training=True, momentum=None), "momentum"),
    ("conv groups float", lambda f: f.conv2d(_x, W, groups=1.0), ""),
    ("conv stride numpy float", lambda f: f.conv2d(_x, W, stride=np.float64(1)), ""),
    ("conv stride of 3", lambda f: f.conv2d(_x, W, stride=(1, 1, 1)), "stride"),
    ("conv_transpose output_padding of 3", lambda f: f.conv_transpose2d(_x, WT, stride=2, output_padding=(1, 1, 1)),
     "output_padding"),
    ("max_pool kernel of 2 in a tensor", lambda f: f.max_pool2d(_x, torch.tensor([2, 2])), "kernel_size"),
]

@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_of_everything_is_zeros_of_any_dtype(dtype, inplace):
    """p = 1 is torch's product with a zero of the input's dtype, for inputs pyops has no kernel for too
    (any other p raises for them, as torch)."""
    x = torch.randn(2, 3, 4).to(dtype)
    y, ref = P.dropout(x.clone(), 1.0, inplace=inplace), F.dropout(x.clone(), 1.0, inplace=inplace)
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    with pytest.raises(RuntimeError):
        P.dropout(x, 0.5)


INT_LIKE = {  # torch's parser takes these for ints: numpy integers and integer tensors of one element
    "conv2d stride, groups": lambda f: f.conv2d(_x, W[:3, :1], stride=np.int64(2), groups=torch.tensor(3)),
    "conv2d padding pair": lambda f: f.conv2d(_x, W, padding=(np.int32(1), torch.tensor(2))),
    "conv_transpose2d": lambda f: f.conv_transpose2d(_x, WT, stride=torch.tensor(2), output_padding=np.int64(1),
                                                     groups=np.int8(1)),
    "max_pool2d": lambda f: f.max_pool2d(_x, np.int64(3), torch.tensor([2]), padding=np.int16(1)),
    "avg_pool2d": lambda f: f.avg_pool2d(_x, (torch.tensor(2), 3), divisor_override=np.int64(5)),
}


@pytest.mark.parametrize("case", sorted(INT_LIKE))
def test_int_like_arguments_are_taken_like_torch(case):
    torch.testing.assert_close(INT_LIKE[case](P), INT_LIKE[case](F))


@pytest.mark.parametrize("backend", sorted({b for b, d in BACKEND_CASES if d == "cpu"}))
@pytest.mark.parametrize("case,call,word", BAD, ids=[c for c, *_ in BAD])
def test_bad_input_raises_like_torch_and_names_it(backend, case, call, word):
    with pytest.raises(Exception) as theirs:
        call(F) if case != "sigmoid not a tensor" else torch.sigmoid([1.0, 2.0])
    with pytest.raises(theirs.type) as ours, pyops.backend(backend):
        call(P)
    assert word.lower() in str(ours.value).lower(), (case, str(ours.value))


def test_integer_conv_is_not_implemented():
    # torch's CPU conv computes integer convolutions; pyops has floating-point kernels only
    with pytest.raises(NotImplementedError, match="floating-point"):
        P.conv2d(_x.int(), W.int())


def test_mixed_devices_are_a_clear_error():
    if not torch.cuda.is_available():
        # two "devices" on a CPU-only machine: the meta device stands in for the second one
        with pytest.raises((RuntimeError, NotImplementedError)):
            P.conv2d(_x, W.to("meta"))
        return
    with pytest.raises(RuntimeError, match="device"):
        P.conv2d(_x.cuda(), W)
