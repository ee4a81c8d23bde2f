"""conv2d / conv_transpose2d against torch on every backend: forward, all gradients, gradcheck, modules, errors."""
import pytest
import torch

import pyops
from conftest import FLOAT_DTYPES, assert_close, interpreting

F = torch.nn.functional

# (input shape, weight shape, kwargs): stride, padding incl. 'same'/'valid', dilation, groups incl.
# depthwise, non-square everything, unbatched input
CONV_CASES = [
    ((2, 4, 7, 6), (6, 4, 3, 3), dict(padding=1)),
    ((2, 4, 7, 6), (6, 4, 3, 3), dict()),
    ((2, 4, 9, 8), (6, 2, 3, 2), dict(stride=2, padding=(1, 0), dilation=(1, 2), groups=2)),
    ((1, 3, 9, 9), (5, 3, 1, 1), dict()),
    ((2, 4, 7, 8), (4, 4, 1, 1), dict(stride=2)),
    ((2, 4, 7, 6), (8, 1, 3, 3), dict(groups=4, padding=1)),          # depthwise, multiplier 2
    ((1, 4, 8, 7), (4, 4, 4, 4), dict(padding="same")),                # even kernel: asymmetric
    ((1, 4, 8, 7), (4, 4, 3, 2), dict(padding="same", dilation=(2, 3))),
    ((2, 3, 6, 5), (4, 3, 3, 3), dict(padding="valid")),
    ((3, 7, 6), (5, 3, 2, 3), dict(stride=(1, 3), padding=(2, 1))),   # unbatched
    ((2, 2, 5, 5), (3, 2, 5, 5), dict()),                              # kernel = input
    ((2, 3, 11, 10), (4, 3, 3, 3), dict(stride=3, padding=2, dilation=2)),
    # >= 64 output pixels with N > 1: the C++ per-image GEMM path (smaller planes batch all images)
    ((2, 4, 12, 11), (6, 2, 3, 3), dict(padding=1, groups=2)),
    ((2, 3, 12, 10), (4, 3, 2, 3), dict(dilation=(2, 1))),
    # one input channel per group: the C++ direct kernels (depthwise; a single-channel input)
    ((2, 6, 9, 8), (6, 1, 3, 2), dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=6)),
    ((2, 1, 9, 8), (5, 1, 3, 3), dict(padding=1)),
    # stride 1, output as wide as the input: C++ patches move as whole-plane runs; here taps
    # reach a whole row or more outside the plane (kernel wider than the input)
    ((2, 3, 3, 2), (4, 3, 5, 5), dict(padding=2)),
]

# (input shape, weight shape, kwargs) of conv_transpose2d
TRANSPOSE_CASES = [
    ((2, 4, 5, 6), (4, 3, 4, 4), dict(stride=2, padding=1)),
    ((2, 4, 5, 6), (4, 3, 3, 3), dict(stride=2, padding=1, output_padding=1, dilation=2)),
    ((2, 4, 5, 4), (4, 2, 3, 3), dict(stride=3, padding=1, groups=2)),
    ((1, 3, 4, 5), (3, 2, 2, 3), dict(stride=(2, 1), output_padding=(1, 0))),
    ((3, 4, 4), (3, 5, 3, 3), dict(padding=1)),                        # unbatched
    ((2, 4, 5, 5), (4, 1, 3, 3), dict(groups=4, stride=2)),            # depthwise
    ((1, 2, 3, 4), (2, 3, 1, 1), dict(stride=2, output_padding=1)),
    ((2, 4, 9, 8), (4, 3, 3, 3), dict(stride=2)),                     # >= 64 input pixels, N > 1
]


def _bias_size(w, kwargs, transpose):
    return w[1] * kwargs.get("groups", 1) if transpose else w[0]


def _compare(backend_device, dtype, xs, ws, kwargs, transpose, bias=True, channels_last=False):
    """pyops vs torch (in float64, then rounded) on the same values: output, layout and the three gradients."""
    x = torch.randn(xs, dtype=torch.float64).to(dtype).to(backend_device)
    w = (torch.randn(ws, dtype=torch.float64) / (ws[1] * ws[2] * ws[3]) ** 0.5).to(dtype).to(backend_device)
    b = torch.randn(_bias_size(ws, kwargs, transpose), dtype=torch.float64).to(dtype).to(backend_device) \
        if bias else None
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
    if channels_last and x.dim() == 4:
        refs[0] = refs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ours = (pyops.functional.conv_transpose2d if transpose else pyops.functional.conv2d)(
        leaves[0], leaves[1], leaves[2] if bias else None, **kwargs)
    theirs = (F.conv_transpose2d if transpose else F.conv2d)(refs[0], refs[1], refs[2] if bias else None, **kwargs)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    assert_close(ours, theirs.to(dtype))
    if x.dim() == 4:  # the layout torch gives in this dtype (its float64 reference may differ on CUDA)
        with torch.no_grad():
            same_dtype = (F.conv_transpose2d if transpose else F.conv2d)(x, w, b, **kwargs)
        assert ours.stride() == same_dtype.stride()
    g = torch.randn(ours.shape, dtype=torch.float64).to(dtype).to(ours.device)
    ours.backward(g)
    theirs.backward(g.double())
    for mine, ref in zip(leaves, refs):
        # gradients sum many products: compare at the tolerance of a sum of that length
        scale = max(1.0, ref.grad.abs().max().item())
        atol = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(mine.grad, ref.grad.to(dtype), atol=atol * scale, rtol=atol * 4)


# Planes whose patch matrix passes the C++ kernels' cache tile (512 KiB): built and used
# in several tiles of output rows (the tile edge falls mid-image, in float32 and float64).
# (transpose, input shape, weight shape, kwargs)
TILED_CASES = [
    (False, (2, 64, 30, 9), (8, 64, 3, 3), dict(padding=1)),
    (False, (1, 256, 70, 8), (6, 128, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    (True, (2, 8, 30, 9), (8, 64, 3, 3), dict(padding=1)),  # its forward is the tiled input gradient
]


@pytest.mark.parametrize("case,dtype", [(0, torch.float32), (0, torch.float64), (1, torch.float64),
                                        (2, torch.float32), (2, torch.float64)], ids=str)
def test_cpp_patch_tiles(case, dtype):
    # (case 1 sums 768 products per output: float32 rounding exceeds the forward tolerance)
    transpose, xs, ws, kwargs = TILED_CASES[case]
    with pyops.backend("cpp"):
        _compare("cpu", dtype, xs, ws, kwargs, transpose)


# NCHW float32 planes that the C++ direct tap kernel (csrc/conv_taps.cpp) takes: at least
# 192 output pixels, 8 output channels and rows of 8, forward and (stride 1) input gradient.
TAP_CASES = [
    ((2, 9, 14, 20), (12, 9, 3, 3), dict(padding=1)),                 # channel blocks with tails
    ((2, 16, 30, 34), (16, 8, 3, 3), dict(stride=2, padding=(1, 2), dilation=(1, 2), groups=2)),
    ((1, 3, 40, 60), (8, 3, 7, 7), dict(stride=(2, 3), padding=3)),  # one image: blocks over threads
    ((2, 8, 16, 16), (8, 8, 3, 3), dict(padding=3)),                  # input gradient padding -1
    ((2, 8, 16, 17), (10, 8, 4, 4), dict(padding="same")),            # asymmetric padding
    ((2, 8, 30, 30), (16, 8, 1, 1), dict(stride=2)),                  # strided 1x1: one phase read
    # 14x14 planes: the channel-lane kernel (vectors over output channels), 124 of them: a
    # partial last block and vector; forward over images, then an input gradient of 124
    # channels for one image (its blocks over threads); 30 channels: two register chains
    ((2, 30, 14, 14), (124, 30, 3, 3), dict(padding=1)),
    ((1, 124, 14, 14), (30, 124, 3, 3), dict(padding=1)),
]

# conv_transpose2d whose forward is a strided input gradient the tap kernel runs phase by
# phase (each phase of the output >= 192 pixels, 8 channels).
TAP_TRANSPOSE_CASES = [
    ((2, 16, 14, 16), (16, 8, 4, 4), dict(stride=2, padding=1)),      # the decoder layer's shape class
    ((2, 16, 14, 16), (16, 8, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 16, 15, 17), (16, 8, 3, 3), dict(stride=(2, 3), padding=(1, 2), dilation=(2, 2), groups=2)),
    ((2, 16, 14, 14), (16, 124, 3, 3), dict(stride=2, padding=1, output_padding=1)),  # 14x14 phases: lanes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("transpose,case", [(False, c) for c in TAP_CASES] + [(True, c) for c in TAP_TRANSPOSE_CASES],
                         ids=str)
def test_cpp_direct_taps(transpose, case, dtype):
    xs, ws, kwargs = case
    with pyops.backend("cpp"):
        _compare("cpu", dtype, xs, ws, kwargs, transpose)


# channels_last float32 planes the tap kernels take (csrc/conv_taps.cpp, the channel-lane
# kernel over padded NHWC copies): at least 64 output pixels and a vector of output
# channels, forward and input gradient (per stride phase); the weight gradient from 512
# output pixels or with fewer than 128 x 128 channel pairs. Channel counts off the vector width (row strides padded past them), groups
# (an image's channels a slice of each pixel's), images over threads and one image.
TAP_NHWC_CASES = [
    (False, (2, 20, 12, 12), (24, 20, 3, 3), dict(padding=1)),           # partial channel block
    (False, (1, 9, 26, 24), (20, 9, 3, 3), dict(padding=1)),             # weight gradient, one image
    (False, (4, 8, 24, 24), (16, 8, 3, 3), dict(padding=(0, 2), dilation=(1, 2))),  # images over threads
    (False, (2, 16, 34, 34), (32, 8, 3, 3), dict(stride=2, padding=(1, 2), dilation=(1, 2), groups=2)),
    (False, (1, 32, 26, 26), (32, 16, 3, 3), dict(padding=1, groups=2)),  # weight gradient per group
    (False, (2, 16, 30, 30), (16, 16, 3, 3), dict(stride=2, padding=1)),  # input gradient: 4 phases of 15x15
    (False, (1, 3, 50, 50), (16, 3, 7, 7), dict(stride=2, padding=3)),    # the stem's shape class
    (True, (2, 32, 10, 10), (32, 16, 4, 4), dict(stride=2, padding=1)),   # decoder: 4 phases of 10x10
]


@pytest.mark.parametrize("transpose,xs,ws,kwargs", TAP_NHWC_CASES, ids=str)
def test_cpp_direct_taps_channels_last(transpose, xs, ws, kwargs):
    with pyops.backend("cpp"):
        _compare("cpu", torch.float32, xs, ws, kwargs, transpose, channels_last=True)


# One input channel per group on rows wider than one vector: the C++ direct kernels' row
# blocks of 1, 2 and 4 vectors (and 8 in AVX2 builds), several blocks per row and partial
# last vectors; the weight gradient's 3x3 kernel (all taps' sums in registers) and its
# any-size one. Column strides read planes split into column phases: two phases
# (vector deinterleave, from an odd or even padded column), three (element by element);
# strided input gradients scatter into them (with a multiplier of 2: two filters per plane)
# and read dx back out. (transpose, input shape, weight shape, kwargs)
DIRECT_ROW_CASES = [
    (False, (2, 3, 20, 37), (3, 1, 3, 3), dict(padding=1, groups=3)),
    (False, (1, 2, 9, 70), (4, 1, 3, 3), dict(padding=(0, 2), dilation=(2, 1), groups=2)),  # multiplier 2
    (False, (2, 4, 11, 24), (4, 1, 5, 3), dict(stride=(2, 1), padding=(2, 1), groups=4)),
    (False, (2, 1, 6, 40), (6, 1, 3, 3), dict(padding=1)),                                 # one input channel
    (True, (2, 3, 12, 30), (3, 1, 3, 3), dict(padding=1, groups=3)),
    (False, (2, 3, 9, 45), (3, 1, 3, 3), dict(stride=2, padding=1, groups=3)),
    (False, (1, 2, 8, 41), (4, 1, 3, 3), dict(stride=2, padding=(1, 2), dilation=(1, 3), groups=2)),
    (False, (2, 2, 7, 38), (2, 1, 3, 4), dict(stride=3, padding=(0, 1), groups=2)),
    (True, (2, 3, 8, 20), (3, 1, 4, 4), dict(stride=2, padding=1, groups=3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("transpose,xs,ws,kwargs", DIRECT_ROW_CASES, ids=str)
def test_cpp_direct_rows(transpose, xs, ws, kwargs, dtype):
    with pyops.backend("cpp"):
        _compare("cpu", dtype, xs, ws, kwargs, transpose)


# Depthwise channels_last: the C++ kernel's pixel blocks (4 pixels by one or two vectors of
# channels, and a masked last vector: 40, 50, 19 channels), edge columns pixel by pixel;
# stride-1 input gradients as the flipped filter's convolution (padding 4 > the filter's
# reach: a negative padding there); weight-gradient rows for 3-, 5- and 7-wide filters, and
# any width (2) pixel by pixel. (transpose, input shape, weight shape, kwargs)
DIRECT_NHWC_CASES = [
    (False, (2, 40, 9, 13), (40, 1, 3, 3), dict(padding=1, groups=40)),
    (False, (1, 50, 8, 12), (50, 1, 5, 5), dict(padding=2, groups=50)),
    (False, (2, 19, 10, 17), (19, 1, 7, 7), dict(padding=3, groups=19)),
    (False, (2, 24, 9, 11), (24, 1, 3, 2), dict(stride=(1, 2), padding=1, groups=24)),
    (False, (1, 16, 6, 9), (16, 1, 3, 3), dict(padding=3, dilation=2, groups=16)),
    (False, (1, 8, 5, 6), (8, 1, 3, 3), dict(padding=4, groups=8)),
    (True, (2, 40, 7, 10), (40, 1, 3, 3), dict(padding=1, groups=40)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("transpose,xs,ws,kwargs", DIRECT_NHWC_CASES, ids=str)
def test_cpp_direct_channels_last(transpose, xs, ws, kwargs, dtype):
    with pyops.backend("cpp"):
        _compare("cpu", dtype, xs, ws, kwargs, transpose, channels_last=True)


# Planes of at most 64 floats (8x8 and smaller) with patch rows of at most 64: in AVX-512
# builds the C++ patch matrix is built (forward, weight gradient) and added back into the
# planes (input gradient) by register permutes (one, two or four registers per plane or
# row), per image (>= 64 output pixels or one image) and batched over images.
REGISTER_PLANE_CASES = [
    ((3, 6, 4, 4), (10, 6, 3, 3), dict(padding=1)),                                # 16: one register
    ((2, 4, 5, 6), (6, 2, 3, 3), dict(stride=2, padding=(2, 1), dilation=(2, 1), groups=2)),  # 30: two
    ((3, 5, 7, 7), (8, 5, 3, 3), dict(padding=1)),                                 # 49: four
    ((2, 5, 8, 8), (8, 5, 3, 3), dict(padding=1)),                                 # 64 outputs: per image
    ((1, 3, 8, 8), (4, 3, 5, 5), dict(padding=4, dilation=(1, 2))),                # 96 outputs: 6 chunks
    ((4, 8, 2, 2), (8, 8, 3, 3), dict(padding=1)),                                 # the deepest layers
    ((3, 4, 6, 5), (5, 4, 1, 1), dict(stride=(2, 1), padding=(0, 1))),
]
# conv_transpose2d: its forward is the input gradient (col2im into planes of <= 64)
REGISTER_PLANE_TRANSPOSE_CASES = [
    ((3, 6, 3, 3), (6, 4, 3, 3), dict(stride=2, padding=1)),                        # 5x5 outputs
    ((2, 4, 4, 4), (4, 6, 4, 4), dict(stride=2, padding=1, groups=2)),             # 8x8
    ((1, 5, 2, 3), (5, 3, 3, 2), dict(stride=(3, 2), dilation=(1, 2), output_padding=1)),
]


@pytest.mark.parametrize("transpose,case", [(False, c) for c in REGISTER_PLANE_CASES]
                         + [(True, c) for c in REGISTER_PLANE_TRANSPOSE_CASES], ids=str)
def test_cpp_register_plane_patches(transpose, case):
    xs, ws, kwargs = case
    with pyops.backend("cpp"):
        _compare("cpu", torch.float32, xs, ws, kwargs, transpose)


# channels_last, one group, N > 1, fewer than 64 output pixels: the C++ batched NHWC path (one
# GEMM over every image's patches, each image's patch gradients added back by its own col2im;
# the 7x2 and 1x7 taps reach past both sides of the row)
# (transpose, input shape, weight shape, kwargs)
BATCHED_NHWC_CASES = [
    (False, (3, 5, 4, 4), (6, 5, 3, 3), dict(padding=1)),
    (False, (2, 3, 7, 6), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    (False, (4, 2, 5, 3), (3, 2, 2, 7), dict(padding=(0, 3))),
    (True, (3, 4, 3, 3), (4, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    (True, (2, 3, 2, 4), (3, 5, 1, 7), dict(padding=(0, 2))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("transpose,xs,ws,kwargs", BATCHED_NHWC_CASES, ids=str)
def test_cpp_batched_channels_last(transpose, xs, ws, kwargs, dtype):
    with pyops.backend("cpp"):
        _compare("cpu", dtype, xs, ws, kwargs, transpose, channels_last=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_matches_torch(backend_device, dtype, case):
    xs, ws, kwargs = case
    _compare(backend_device, dtype, xs, ws, kwargs, transpose=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=str)
def test_conv_transpose2d_matches_torch(backend_device, dtype, case):
    xs, ws, kwargs = case
    _compare(backend_device, dtype, xs, ws, kwargs, transpose=True)


@pytest.mark.parametrize("transpose,case", [(False, 0), (False, 2), (False, 5), (False, 15),
                                            (True, 0), (True, 2), (True, 5)])
def test_channels_last_and_no_bias(backend_device, transpose, case):
    xs, ws, kwargs = (TRANSPOSE_CASES if transpose else CONV_CASES)[case]
    _compare(backend_device, torch.float32, xs, ws, kwargs, transpose, bias=False, channels_last=True)


def test_channels_last_weight_gives_channels_last_output(backend_device):
    x = torch.randn(2, 3, 6, 6, device=backend_device)
    w = torch.randn(4, 3, 3, 3, device=backend_device).contiguous(memory_format=torch.channels_last)
    out = pyops.functional.conv2d(x, w, padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck(backend_device, transpose):
    torch.manual_seed(0)
    if transpose:
        x = torch.randn(1, 4, 3, 3, dtype=torch.float64, device=backend_device, requires_grad=True)
        w = torch.randn(4, 1, 3, 2, dtype=torch.float64, device=backend_device, requires_grad=True)
        b = torch.randn(2, dtype=torch.float64, device=backend_device, requires_grad=True)
        fn = lambda x, w, b: pyops.functional.conv_transpose2d(x, w, b, stride=2, padding=1,  # noqa: E731
                                                               output_padding=1, groups=2)
    else:
        x = torch.randn(2, 4, 5, 4, dtype=torch.float64, device=backend_device, requires_grad=True)
        w = torch.randn(6, 2, 3, 2, dtype=torch.float64, device=backend_device, requires_grad=True)
        b = torch.randn(6, dtype=torch.float64, device=backend_device, requires_grad=True)
        fn = lambda x, w, b: pyops.functional.conv2d(x, w, b, stride=(2, 1), padding=1,  # noqa: E731
                                                     dilation=(1, 2), groups=2)
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=interpreting(backend_device))


def test_wgrad_split_counts_agree(monkeypatch):
    """The Triton weight gradient gives the same sums whatever the split-K count."""
    import pyops.ops.conv as conv_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64, device=device)
    g = torch.randn(3, 6, 9, 7, dtype=torch.float64, device=device)
    results = []
    for split in (1, 2, 5):
        monkeypatch.setattr(conv_ops, "wgrad_splits", lambda *a, split=split: split)
        with pyops.backend("triton"):
            results.append(torch.ops.pyops.conv2d_weight_grad(g, x, [6, 4, 3, 3], [1, 1], [1, 1], [1, 1], 1, False))
    w = torch.zeros(6, 4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    F.conv2d(x, w, padding=1).backward(g)
    for r in results:
        torch.testing.assert_close(r, w.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_int64_index_path_matches(monkeypatch, transpose, channels_last):
    """The Triton kernels' int64 index variant (taken past 2^31 offsets: native division, 64-bit
    bound checks) gives the int32 one's results bit for bit, forward and all gradients."""
    import pyops.ops.conv as conv_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through the interpreter
    xs, ws, kwargs = TRANSPOSE_CASES[1] if transpose else CONV_CASES[11]
    fn = pyops.functional.conv_transpose2d if transpose else pyops.functional.conv2d
    torch.manual_seed(0)
    x, w = torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)
    b = torch.randn(_bias_size(ws, kwargs, transpose), dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    results = []
    for force in (False, True):
        monkeypatch.setattr(conv_ops, "needs_int64", lambda *t, force=force: force)
        xi, wi, bi = (t.to(device).contiguous(memory_format=fmt) if t.dim() == 4 else t.to(device) for t in (x, w, b))
        xi, wi, bi = (t.requires_grad_() for t in (xi, wi, bi))
        with pyops.backend("triton"):
            y = fn(xi, wi, bi, **kwargs)
            grads = torch.autograd.grad(y, (xi, wi, bi), torch.ones_like(y) + y.detach())
        results.append((y.detach(), *grads))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_empty_batch_and_zero_grad(backend_device):
    x = torch.randn(0, 3, 5, 5, device=backend_device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=backend_device, requires_grad=True)
    b = torch.randn(4, device=backend_device, requires_grad=True)
    out = pyops.functional.conv2d(x, w, b)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_matches_torch(backend_device, padding_mode):
    torch.manual_seed(1)
    ref = torch.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                          padding_mode=padding_mode, dtype=torch.float64, device=backend_device)
    torch.manual_seed(1)
    mine = pyops.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                           padding_mode=padding_mode, dtype=torch.float64, device=backend_device)
    assert torch.equal(mine.weight, ref.weight) and torch.equal(mine.bias, ref.bias)  # same init
    assert repr(mine) == repr(ref)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, device=backend_device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mine(xa), ref(xb)
    assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    for a, b in [(xa.grad, xb.grad), (mine.weight.grad, ref.weight.grad), (mine.bias.grad, ref.bias.grad)]:
        assert_close(a, b)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert mine(xc).is_contiguous(memory_format=torch.channels_last) or padding_mode != "zeros"


@pytest.mark.parametrize("output_size", [None, (9, 12), [10, 11]])
def test_conv_transpose2d_module_matches_torch(backend_device, output_size):
    torch.manual_seed(2)
    ref = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64,
                                   device=backend_device)
    mine = pyops.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64,
                                    device=backend_device)
    assert repr(mine) == repr(ref)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, device=backend_device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mine(xa, output_size), ref(xb, output_size)
    assert ya.shape == yb.shape
    assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for a, b in [(xa.grad, xb.grad), (mine.weight.grad, ref.weight.grad), (mine.bias.grad, ref.bias.grad)]:
        assert_close(a, b)


def test_conv_transpose2d_bad_output_size_like_torch(backend_device):
    ref = torch.nn.ConvTranspose2d(2, 2, 3, stride=2, device=backend_device)
    mine = pyops.nn.ConvTranspose2d(2, 2, 3, stride=2, device=backend_device)
    x = torch.randn(1, 2, 4, 4, device=backend_device)
    with pytest.raises(ValueError):
        ref(x, (20, 20))
    with pytest.raises(ValueError):
        mine(x, (20, 20))


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (name, conv_transpose?, args, kwargs): each must raise the exception type torch raises
BAD_CONV_ARGS = [
    ("channels mismatch", False, (_t(1, 3, 5, 5), _t(4, 2, 3, 3)), {}),
    ("groups do not divide out channels", False, (_t(1, 4, 5, 5), _t(3, 2, 3, 3)), dict(groups=2)),
    ("groups do not divide in channels", False, (_t(1, 3, 5, 5), _t(4, 1, 3, 3)), dict(groups=2)),
    ("zero groups", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3)), dict(groups=0)),
    ("kernel larger than padded input", False, (_t(1, 3, 2, 2), _t(4, 3, 3, 3)), {}),
    ("negative padding", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3)), dict(padding=-1)),
    ("zero stride", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3)), dict(stride=0)),
    ("zero dilation", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3)), dict(dilation=0)),
    ("same with stride", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3)), dict(padding="same", stride=2)),
    ("bad padding string", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3)), dict(padding="full")),
    ("2-D input", False, (_t(3, 5), _t(4, 3, 3, 3)), {}),
    ("5-D input", False, (_t(1, 1, 3, 5, 5), _t(4, 3, 3, 3)), {}),
    ("3-D weight", False, (_t(1, 3, 5, 5), _t(4, 3, 3)), {}),
    ("dtype mismatch", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3, dtype=torch.float64)), {}),
    ("wrong bias length", False, (_t(1, 3, 5, 5), _t(4, 3, 3, 3), _t(3)), {}),
    ("bool input", False, (torch.ones(1, 3, 5, 5, dtype=torch.bool), torch.ones(4, 3, 3, 3, dtype=torch.bool)), {}),
    ("input not a tensor", False, ([[1.0]], _t(4, 3, 3, 3)), {}),
    ("transpose channels mismatch", True, (_t(1, 3, 5, 5), _t(4, 2, 3, 3)), {}),
    ("output_padding too large", True, (_t(1, 4, 5, 5), _t(4, 2, 3, 3)), dict(stride=2, output_padding=2)),
    ("transpose negative padding", True, (_t(1, 4, 5, 5), _t(4, 2, 3, 3)), dict(padding=-1)),
    ("transpose output too small", True, (_t(1, 4, 1, 1), _t(4, 2, 1, 1)), dict(padding=1)),
    ("transpose groups", True, (_t(1, 4, 5, 5), _t(4, 2, 3, 3)), dict(groups=3)),
    ("empty plane with images and channels", False, (_t(2, 3, 0, 5), _t(4, 3, 1, 1)), dict(padding=1)),
    ("unbatched empty plane", False, (_t(3, 5, 0), _t(4, 3, 1, 1)), dict(padding=1)),
    ("transpose empty plane", True, (_t(2, 3, 0, 5), _t(3, 4, 3, 3)), {}),
    ("transpose no output channels", True, (_t(2, 3, 5, 5), _t(3, 0, 3, 3)), {}),
]


# (input shape, weight shape, kwargs): conv_transpose2d calls of an empty batch
EMPTY_TRANSPOSE_OUTPUTS = [
    ((0, 3, 0, 5), (3, 4, 3, 3), dict(padding=1)),  # an empty input plane, an output height of 0
    ((0, 3, 4, 5), (3, 2, 3, 3), dict(stride=2)),
]


@pytest.mark.parametrize("case", EMPTY_TRANSPOSE_OUTPUTS, ids=str)
def test_conv_transpose2d_empty_output_like_torch(backend_device, case):
    """An empty batch gives torch's empty output, even where its plane has size 0 (the
    output-size check is for non-empty inputs), and empty gradients."""
    xs, ws, kwargs = case
    x, w, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (xs, ws, (ws[1],)))
    ref = F.conv_transpose2d(x, w, b, **kwargs)
    mine = [t.detach().to(backend_device).requires_grad_() for t in (x, w, b)]
    out = pyops.functional.conv_transpose2d(*mine, **kwargs)
    assert out.shape == ref.shape
    for got, want in zip(torch.autograd.grad(out.sum(), mine), torch.autograd.grad(ref.sum(), (x, w, b))):
        assert got.shape == want.shape
        assert_close(got.cpu(), want)


@pytest.mark.parametrize("case", BAD_CONV_ARGS, ids=lambda c: c[0])
def test_bad_arguments_raise_like_torch(backend_device, case):
    _, transpose, args, kwargs = case
    args = tuple(a.to(backend_device) if isinstance(a, torch.Tensor) else a for a in args)
    theirs = F.conv_transpose2d if transpose else F.conv2d
    ours = pyops.functional.conv_transpose2d if transpose else pyops.functional.conv2d
    with pytest.raises(Exception) as expected:
        theirs(*args, **kwargs)
    with pytest.raises(Exception) as got:
        ours(*args, **kwargs)
    assert type(got.value) is type(expected.value), (got.value, expected.value)


def test_remembered_geometry_still_checks_every_call():
    """functional.conv2d / conv_transpose2d remember a call's checked geometry per (shapes,
    arguments): calls that differ from a remembered one in anything torch checks (a bool
    for an int, a bias length, channels, padding, groups, dtype, dilation, output_padding)
    still raise as torch does, and list arguments (never remembered) still compute the right
    output."""
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(6)
    calls = [  # (transpose, args, kwargs): the first of each op is valid and remembered
        (False, (x, w, b), dict(stride=1, padding=1)),
        (False, (x, w, b), dict(stride=True, padding=1)),
        (False, (x, w, torch.randn(5)), dict(stride=1, padding=1)),
        (False, (x[:, :3], w, b), dict(stride=1, padding=1)),
        (False, (x, w, b), dict(stride=1, padding=-1)),
        (False, (x, w, b), dict(stride=1, padding=1, groups=3)),
        (False, (x, w, b), dict(stride=1, padding=1, groups=True)),
        (False, (x, w.double(), b), dict(stride=1, padding=1)),
        (False, (x, w, b.double()), dict(stride=1, padding=1)),
        (False, (x, w, b), dict(stride=(1, 1), padding=(1, 1), dilation=(1, 0))),
        (True, (x, w.transpose(0, 1)[:4].contiguous(), None), dict(stride=2, output_padding=1)),
        (True, (x, w.transpose(0, 1)[:4].contiguous(), None), dict(stride=2, output_padding=2)),
        (True, (x, w.transpose(0, 1)[:4].contiguous(), None), dict(stride=2, padding="same")),
    ]
    for transpose, args, kwargs in calls:
        ours = pyops.functional.conv_transpose2d if transpose else pyops.functional.conv2d
        theirs = F.conv_transpose2d if transpose else F.conv2d
        try:
            expected = theirs(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever torch raises, pyops must raise too
            with pytest.raises(type(error)):
                ours(*args, **kwargs)
        else:
            assert_close(ours(*args, **kwargs), expected)
    for transpose, theirs, ours in ((False, F.conv2d, pyops.functional.conv2d),
                                    (True, F.conv_transpose2d, pyops.functional.conv_transpose2d)):
        weight = w.transpose(0, 1)[:4].contiguous() if transpose else w
        assert_close(ours(x, weight, stride=[2, 1], padding=[1, 0]), theirs(x, weight, stride=[2, 1], padding=[1, 0]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_non_float_dtypes_raise_clearly(backend_device, dtype):
    """torch computes integer and complex convolutions on the CPU; pyops has no such kernels and says so."""
    x = torch.ones(1, 3, 5, 5, dtype=dtype, device=backend_device)
    w = torch.ones(4, 3, 3, 3, dtype=dtype, device=backend_device)
    with pytest.raises(RuntimeError, match="floating-point"):
        pyops.functional.conv2d(x, w)
