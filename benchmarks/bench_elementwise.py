"""Sigmoid and Dropout: pyops vs torch, forward / backward / full, time and GB/s.

    python benchmarks/bench_elementwise.py [--device cpu|cuda] [--full]

GB/s counts the bytes each op must move (sigmoid: read x, write y; backward: read
dy and y, write dx; dropout: read and write once each way, no mask), the same count
for both providers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
import harness  # noqa: E402

import pyops  # noqa: E402

# Elements moved per element of the tensor, per mode.
TRAFFIC = {
    "sigmoid": {"forward": 2, "backward": 3, "full": 5},
    "dropout": {"forward": 2, "backward": 2, "full": 4},
}
DROPOUT_P = 0.5


def shapes(device: torch.device, full: bool):
    if device.type == "cuda":
        base = [(1 << 24,), (128, 64, 56, 56), (64, 256, 56, 56)]
        return base + ([(128, 256, 112, 112)] if full else [])
    base = [(1 << 20,), (32, 64, 56, 56)]
    return base + ([(1 << 24,), (8, 256, 56, 56)] if full else [])


def dtypes(device: torch.device, full: bool):
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16, torch.float16]
    return [torch.float32, torch.bfloat16] if full else [torch.float32]


def _ops(op: str):
    if op == "sigmoid":
        return pyops.functional.sigmoid, torch.sigmoid
    return (lambda x: pyops.functional.dropout(x, DROPOUT_P),
            lambda x: torch.nn.functional.dropout(x, DROPOUT_P))


def _correct(op: str, x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    if op == "sigmoid":
        tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(x.dtype, 1e-2)
        return torch.allclose(ours.float(), theirs.float(), atol=tol, rtol=tol)
    kept = ours != 0
    frac = kept.float().mean().item()
    scaled = (x.float() / (1 - DROPOUT_P))[kept]
    five_sigma = 5 * (DROPOUT_P * (1 - DROPOUT_P) / x.numel()) ** 0.5
    return abs(frac - (1 - DROPOUT_P)) < five_sigma and torch.allclose(ours.float()[kept], scaled, rtol=1e-2, atol=1e-3)


def run_case(op: str, shape, dtype, memory_format, device) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    if memory_format is torch.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = _ops(op)
    correct = _correct(op, x, ours(x), theirs(x))
    traffic = {mode: k * x.numel() * x.element_size() for mode, k in TRAFFIC[op].items()}
    return harness.op_rows(op, x, ours, theirs, traffic, correct, device)


def cases(device: torch.device, full: bool):
    for op in ("sigmoid", "dropout"):
        for dtype in dtypes(device, full):
            for shape in shapes(device, full):
                formats = [torch.contiguous_format] + ([torch.channels_last] if len(shape) == 4 else [])
                for fmt in formats:
                    yield op, shape, dtype, fmt


def run(device: torch.device, full: bool = False, progress=None) -> list[dict]:
    return harness.run_cases("elementwise", list(cases(device, full)), lambda *c: run_case(*c, device), progress)


if __name__ == "__main__":
    sys.exit(harness.suite_main("elementwise", run, __doc__.splitlines()[0]))
