"""The training example (examples/train_digits.py) on synthetic digits: torch.nn and swapped runs agree."""
import copy
import importlib.util
from pathlib import Path

import torch

import pyops

_path = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
_spec = importlib.util.spec_from_file_location("train_digits", _path)
train_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_digits)


def _synthetic(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    # each class a bright pixel block at its own place: learnable in a few steps
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    for i, c in enumerate(y.tolist()):
        x[i, 0, (c // 5) * 4:(c // 5) * 4 + 4, (c % 5):(c % 5) + 3] += 0.8
    return x[:64], y[:64], x[64:], y[64:]


def test_swapped_training_follows_torch_without_dropout():
    torch.manual_seed(0)
    reference = train_digits.DigitsNet()
    reference.classifier[1].p = 0.0  # no randomness: the two runs must agree to rounding
    swapped = pyops.swap(copy.deepcopy(reference))
    data = _synthetic()
    with pyops.backend("cpp"):
        ref = train_digits.train(reference, data, epochs=3, batch=16)
        ours = train_digits.train(swapped, data, epochs=3, batch=16)
    for r, o in zip(ref, ours):
        assert abs(r["train_loss"] - o["train_loss"]) < 1e-4 * max(1.0, r["train_loss"])
        assert abs(r["test_acc"] - o["test_acc"]) < 1e-6
    assert ref[-1]["train_loss"] < ref[0]["train_loss"]  # it does learn


def test_compare_runs_both_models():
    with pyops.backend("cpp"):
        ref, ours, seconds = train_digits.compare(_synthetic(), epochs=1)
    assert len(ref) == len(ours) == 1 and all(s > 0 for s in seconds)
