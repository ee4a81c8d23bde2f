"""BatchNorm2d: pyops vs torch, training forward / backward / full and eval, time and GB/s.

    python benchmarks/bench_batchnorm.py [--device cpu|cuda] [--full]

Cases: the ResNet batch-norm shapes 64x112x112, 256x56x56 and 2048x7x7 (batch 32 on
a GPU, 2 on the CPU; --full: 64 / 8). GB/s counts the passes over memory the kernels
actually make, the same count for both providers: training forward reads x twice
(statistics, then normalisation) and writes y; training backward reads dy and x for
the two sums, then dy and x again and writes dx; eval forward reads x and writes y,
eval backward reads dy and writes dx. Running statistics are updated on every
training call, as in a training step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
import harness  # noqa: E402

import pyops  # noqa: E402

SHAPES = [(64, 112, 112), (256, 56, 56), (2048, 7, 7)]
PASSES = {  # tensor-sized reads + writes per mode
    True: {"forward": 3, "backward": 5, "full": 8},
    False: {"forward": 2, "backward": 2, "full": 4},
}


def batch(device: torch.device, full: bool) -> int:
    if device.type == "cuda":
        return 64 if full else 32
    return 8 if full else 2


def dtypes(device: torch.device, full: bool):
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16] if full else [torch.float32]


def run_case(chw, training: bool, dtype, memory_format, device, n) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    C = chw[0]
    x = (torch.randn((n, *chw), dtype=dtype, device=device, generator=gen) * 2 + 1).contiguous(
        memory_format=memory_format)
    pdtype = torch.float32 if dtype != torch.float64 else dtype
    w = torch.rand(C, dtype=pdtype, device=device, generator=gen) + 0.5
    b = torch.randn(C, dtype=pdtype, device=device, generator=gen)
    stats = {name: (torch.zeros(C, dtype=pdtype, device=device), torch.ones(C, dtype=pdtype, device=device))
             for name in ("pyops", "torch")}

    def ours(t):
        return pyops.functional.batch_norm(t, *stats["pyops"], w, b, training=training)

    def theirs(t):
        return torch.nn.functional.batch_norm(t, *stats["torch"], w, b, training=training)

    out_ours, out_theirs = ours(x), theirs(x)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    correct = torch.allclose(out_ours.float(), out_theirs.float(), atol=tol, rtol=tol) and \
        out_ours.stride() == out_theirs.stride()
    nbytes = x.numel() * x.element_size()
    traffic = {mode: k * nbytes for mode, k in PASSES[training].items()}
    return harness.op_rows("batch_norm", x, ours, theirs, traffic, correct, device,
                           config="train" if training else "eval")


def cases(device: torch.device, full: bool):
    n = batch(device, full)
    for chw in SHAPES:
        for training in (True, False):
            for dtype in dtypes(device, full):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    yield chw, training, dtype, fmt, device, n


def run(device: torch.device, full: bool = False, progress=None) -> list[dict]:
    return harness.run_cases("batchnorm", list(cases(device, full)), run_case, progress)


if __name__ == "__main__":
    sys.exit(harness.suite_main("batchnorm", run, __doc__.splitlines()[0]))
