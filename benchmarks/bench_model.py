"""A whole model: a ResNet-18-style network with torch.nn layers vs the same network after pyops.swap.

    python benchmarks/bench_model.py [--device cpu|cuda] [--full]

Two cases per dtype/layout: a training step (forward, cross-entropy, backward, SGD
step) and an inference pass (eval mode, no grad). Both models start from the same
weights; they are timed in interleaved rounds by the shared harness. Rows give
images/s and TFLOP/s (FLOPs counted by torch.utils.flop_counter on the torch model;
a training step counted as forward + backward). CPU: 4 images of 64x64 at width 32
(--full: 8 of 112x112 at width 64); GPU: 64 images of 224x224 at width 64.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
import harness  # noqa: E402

import pyops  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNet18Style(nn.Module):
    """ResNet-18's layout (stem 7x7/2 + max-pool 3x3/2, four stages of two basic blocks, global average pool)."""

    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stages += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(cin, classes))

    def forward(self, x):
        h = self.stages(self.stem(x))
        return self.head(h.mean((2, 3)))


def settings(device: torch.device, full: bool) -> dict:
    if device.type == "cuda":
        return {"batch": 64, "size": 224, "width": 64}
    return {"batch": 8, "size": 112, "width": 64} if full else {"batch": 4, "size": 64, "width": 32}


def variants(device: torch.device, full: bool):
    if device.type == "cuda":
        return [(torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)]
    return [(torch.float32, torch.contiguous_format)] + ([(torch.float32, torch.channels_last)] if full else [])


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def run_case(dtype, memory_format, device, s) -> list[dict]:
    torch.manual_seed(0)
    theirs = ResNet18Style(s["width"]).to(device=device, dtype=dtype, memory_format=memory_format)
    ours = pyops.swap(copy.deepcopy(theirs))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device, dtype=dtype,
                    generator=gen).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (s["batch"],), device=device, generator=gen)

    theirs.eval()
    ours.eval()
    with torch.no_grad():
        ref, out = theirs(x).float(), ours(x).float()
        fwd_flops = _flops(theirs, x)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    correct = bool(((out - ref).norm() / ref.norm().clamp_min(1e-12)).item() < tol)

    def step(model, opt):
        def run():
            loss = nn.functional.cross_entropy(model(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def infer(model):
        def run():
            with torch.no_grad():
                return model(x)
        return run

    rows = []
    for mode in ("train step", "inference"):
        train = mode == "train step"
        for m in (theirs, ours):
            m.train(train)
        if train:
            fns = {"pyops": step(ours, torch.optim.SGD(ours.parameters(), lr=1e-3)),
                   "torch": step(theirs, torch.optim.SGD(theirs.parameters(), lr=1e-3))}
        else:
            fns = {"pyops": infer(ours), "torch": infer(theirs)}
        t = harness.compare(fns, device, rounds=5 if device.type == "cuda" else None)
        flops = fwd_flops * (3 if train else 1)
        rows.append({
            "op": "resnet18-style", "mode": mode, "shape": list(x.shape), "dtype": str(dtype),
            "format": "channels_last" if memory_format == torch.channels_last else "contiguous",
            "config": f"width {s['width']}",
            "pyops_ms": t["pyops"].median_ms, "pyops_p20_ms": t["pyops"].p20_ms, "pyops_p80_ms": t["pyops"].p80_ms,
            "torch_ms": t["torch"].median_ms, "torch_p20_ms": t["torch"].p20_ms, "torch_p80_ms": t["torch"].p80_ms,
            "speedup": t["torch"].median_ms / t["pyops"].median_ms,
            "flops": flops,
            "pyops_tflops": flops / t["pyops"].median_ms / 1e9, "torch_tflops": flops / t["torch"].median_ms / 1e9,
            "pyops_images_per_s": s["batch"] / t["pyops"].median_ms * 1e3,
            "torch_images_per_s": s["batch"] / t["torch"].median_ms * 1e3,
            "correct": correct, "samples": t["pyops"].samples,
        })
    return rows


def cases(device: torch.device, full: bool):
    s = settings(device, full)
    for dtype, fmt in variants(device, full):
        yield dtype, fmt, device, s


def run(device: torch.device, full: bool = False, progress=None) -> list[dict]:
    return harness.run_cases("model", list(cases(device, full)), run_case, progress)


if __name__ == "__main__":
    sys.exit(harness.suite_main("model", run, __doc__.splitlines()[0]))
