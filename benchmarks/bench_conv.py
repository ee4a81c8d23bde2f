"""Conv2d and ConvTranspose2d: pyops vs torch (cuDNN / oneDNN), forward / backward / full, TFLOP/s.

    python benchmarks/bench_conv.py [--device cpu|cuda] [--full]

Cases: the ResNet-50 conv layer set (resnet50_conv_layers.json, a copy of the project's
shared list), a depthwise 3x3 and a ConvTranspose2d 4x4/2 decoder layer. Backward is
the input, weight and bias gradients together; full is forward + backward. TFLOP/s
counts 2*N*K*OH*OW*(C/groups)*R*S per GEMM (forward one, backward two). On a GPU:
bfloat16 channels_last and float32 NCHW, with cudnn.benchmark on and TF32 off for
both (see benchmarks/run.py); on the CPU float32.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
import harness  # noqa: E402

import pyops  # noqa: E402

LAYERS = json.loads((Path(__file__).resolve().parent / "resnet50_conv_layers.json").read_text())["layers"]
# a quick CPU run takes a representative few (stem, 1x1, 3x3, strided 3x3, deep 1x1)
CPU_QUICK = {"conv1 7x7/2", "layer1 1x1 64->256", "layer1 3x3 64->64", "layer2 3x3/2 128->128",
             "layer3 3x3 256->256", "layer4 1x1 512->2048"}
EXTRA = [
    # name, transpose, C_in, C_out, H, W, kernel, stride, padding, groups
    ("depthwise 3x3 128", False, 128, 128, 56, 56, 3, 1, 1, 128),
    ("convtranspose 4x4/2 128->64", True, 128, 64, 28, 28, 4, 2, 1, 1),
]


def batch(device: torch.device, full: bool) -> int:
    if device.type == "cuda":
        return 64 if full else 32
    return 8 if full else 2


def settings(device: torch.device, full: bool):
    if device.type == "cuda":
        return [(torch.bfloat16, torch.channels_last), (torch.float32, torch.contiguous_format)]
    return [(torch.float32, torch.contiguous_format)] + ([(torch.float32, torch.channels_last)] if full else [])


def run_case(name, transpose, cin, cout, h, w, k, stride, padding, groups, dtype, fmt, device, n) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    if transpose:
        weight = torch.randn(cin, cout // groups, k, k, generator=gen) * (cout // groups * k * k) ** -0.5
    else:
        weight = torch.randn(cout, cin // groups, k, k, generator=gen) * (cin // groups * k * k) ** -0.5
    weight = weight.to(device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    bias = torch.randn(cout, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    kw = dict(stride=stride, padding=padding, groups=groups)
    ours_fn = pyops.functional.conv_transpose2d if transpose else pyops.functional.conv2d
    theirs_fn = torch.nn.functional.conv_transpose2d if transpose else torch.nn.functional.conv2d
    ours = lambda t: ours_fn(t, weight, bias, **kw)  # noqa: E731
    theirs = lambda t: theirs_fn(t, weight, bias, **kw)  # noqa: E731

    xg = x.detach().requires_grad_()
    y_ours, y_theirs = ours(xg), theirs(xg)
    g = torch.randn(y_theirs.shape, generator=gen).to(device=device, dtype=dtype)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    grads_ours = torch.autograd.grad(y_ours, (xg, weight, bias), g, retain_graph=True)
    grads_theirs = torch.autograd.grad(y_theirs, (xg, weight, bias), g, retain_graph=True)
    correct = all(_close(a, b, tol) for a, b in zip((y_ours, *grads_ours), (y_theirs, *grads_theirs)))
    correct = correct and y_ours.is_contiguous(memory_format=fmt) == y_theirs.is_contiguous(memory_format=fmt)

    leaves = (xg, weight, bias)
    providers = {
        "forward": {"pyops": lambda: ours(x), "torch": lambda: theirs(x)},
        "backward": {"pyops": lambda: torch.autograd.grad(y_ours, leaves, g, retain_graph=True),
                     "torch": lambda: torch.autograd.grad(y_theirs, leaves, g, retain_graph=True)},
        "full": {"pyops": lambda: torch.autograd.grad(ours(xg), leaves, g),
                 "torch": lambda: torch.autograd.grad(theirs(xg), leaves, g)},
    }
    # one GEMM's work: conv's output pixels x its reduction (for the transposed conv, the input is conv's output)
    pixels = x.shape[0] * x.shape[2] * x.shape[3] if transpose else y_theirs.shape[0] * y_theirs.shape[2] * \
        y_theirs.shape[3]
    conv_out, conv_in = (cin, cout) if transpose else (cout, cin)
    gemm = 2 * pixels * conv_out * (conv_in // groups) * k * k
    es = x.element_size()
    traffic = (x.numel() + weight.numel() + y_theirs.numel()) * es
    rows = []
    for mode, fns in providers.items():
        t = harness.compare(fns, device, rounds=5 if device.type == "cuda" else None)
        flops = gemm * {"forward": 1, "backward": 2, "full": 3}[mode]
        nbytes = traffic * {"forward": 1, "backward": 2, "full": 3}[mode]
        rows.append({
            "op": "conv_transpose2d" if transpose else "conv2d", "mode": mode, "shape": list(x.shape),
            "weight": list(weight.shape), "dtype": str(dtype),
            "format": "channels_last" if fmt == torch.channels_last else "contiguous", "config": name,
            "stride": stride, "padding": padding, "groups": groups,
            "pyops_ms": t["pyops"].median_ms, "pyops_p20_ms": t["pyops"].p20_ms, "pyops_p80_ms": t["pyops"].p80_ms,
            "torch_ms": t["torch"].median_ms, "torch_p20_ms": t["torch"].p20_ms, "torch_p80_ms": t["torch"].p80_ms,
            "speedup": t["torch"].median_ms / t["pyops"].median_ms,
            "flops": flops, "bytes": nbytes,
            "pyops_tflops": flops / t["pyops"].median_ms / 1e9, "torch_tflops": flops / t["torch"].median_ms / 1e9,
            "pyops_gbps": nbytes / t["pyops"].median_ms / 1e6, "torch_gbps": nbytes / t["torch"].median_ms / 1e6,
            "correct": bool(correct), "samples": t["pyops"].samples,
        })
    return rows


def _close(a, b, tol) -> bool:
    scale = max(1.0, b.abs().max().item())
    return torch.allclose(a.float(), b.float(), atol=tol * scale, rtol=tol)


def cases(device: torch.device, full: bool):
    n = batch(device, full)
    quick_cpu = device.type == "cpu" and not full
    for dtype, fmt in settings(device, full):
        for layer in LAYERS:
            if quick_cpu and layer["name"] not in CPU_QUICK:
                continue
            yield (layer["name"], False, layer["C_in"], layer["C_out"], layer["H"], layer["W"], layer["kernel"],
                   layer["stride"], layer["padding"], 1, dtype, fmt, device, n)
        for extra in EXTRA:
            yield (*extra, dtype, fmt, device, n)


def run(device: torch.device, full: bool = False, progress=None) -> list[dict]:
    return harness.run_cases("conv", list(cases(device, full)), run_case, progress)


if __name__ == "__main__":
    sys.exit(harness.suite_main("conv", run, __doc__.splitlines()[0]))
