"""MaxPool2d and AvgPool2d: pyops vs torch, forward / backward / full, time and GB/s.

    python benchmarks/bench_pooling.py [--device cpu|cuda] [--full]

Cases: the ResNet stem max-pool (3x3/2, pad 1, 64x112x112), 2x2/2 pooling, and a
global-ish average pool (7x7 over 2048x7x7). GB/s counts the bytes each op must move:
forward reads the input and writes the output (max: and int64 indices); backward reads
the output gradient (max: and the indices) and writes the input gradient.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
import harness  # noqa: E402

import pyops  # noqa: E402

# name, op, per-image (C, H, W), kwargs
CASES = [
    ("resnet stem max 3x3/2 p1", "max_pool2d", (64, 112, 112), {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("max 2x2/2", "max_pool2d", (128, 56, 56), {"kernel_size": 2, "stride": 2}),
    ("avg 2x2/2", "avg_pool2d", (128, 56, 56), {"kernel_size": 2, "stride": 2}),
    ("avg 3x3/1 p1 (inception)", "avg_pool2d", (192, 28, 28), {"kernel_size": 3, "stride": 1, "padding": 1,
                                                              "count_include_pad": False}),
    ("global avg 7x7", "avg_pool2d", (2048, 7, 7), {"kernel_size": 7}),
]


def batch(device: torch.device, full: bool) -> int:
    if device.type == "cuda":
        return 128 if full else 64
    return 16 if full else 4


def dtypes(device: torch.device, full: bool):
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16] if full else [torch.float32]


def _traffic(op: str, x: torch.Tensor, out: torch.Tensor) -> dict[str, int]:
    es = x.element_size()
    idx = out.numel() * 8 if op == "max_pool2d" else 0
    fwd = x.numel() * es + out.numel() * es + idx
    bwd = out.numel() * es + idx + x.numel() * es
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


def run_case(name, op, chw, kwargs, dtype, memory_format, device, n) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((n, *chw), dtype=dtype, device=device, generator=gen).contiguous(memory_format=memory_format)
    ours = lambda t: getattr(pyops.functional, op)(t, **kwargs)  # noqa: E731
    theirs = lambda t: getattr(torch.nn.functional, op)(t, **kwargs)  # noqa: E731
    out_ours, out_theirs = ours(x), theirs(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    correct = torch.allclose(out_ours.float(), out_theirs.float(), atol=tol, rtol=tol) and \
        out_ours.stride() == out_theirs.stride()
    return harness.op_rows(op, x, ours, theirs, _traffic(op, x, out_theirs), correct, device, config=name)


def cases(device: torch.device, full: bool):
    n = batch(device, full)
    for name, op, chw, kwargs in CASES:
        for dtype in dtypes(device, full):
            for fmt in (torch.contiguous_format, torch.channels_last):
                yield name, op, chw, kwargs, dtype, fmt, device, n


def run(device: torch.device, full: bool = False, progress=None) -> list[dict]:
    return harness.run_cases("pooling", list(cases(device, full)), run_case, progress)


if __name__ == "__main__":
    sys.exit(harness.suite_main("pooling", run, __doc__.splitlines()[0]))
