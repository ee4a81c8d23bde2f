"""Train the same small CNN twice on scikit-learn's digits: once with torch.nn, once after pyops.swap.

    pip install scikit-learn matplotlib      # the dataset ships inside scikit-learn
    python examples/train_digits.py [--epochs 20] [--out examples/results]

The model has every layer pyops implements: Conv2d, BatchNorm2d, MaxPool2d,
AvgPool2d, Dropout and Sigmoid, and a ConvTranspose2d auto-encoder branch that
reconstructs the input from the pooled features (loss: cross-entropy + reconstruction
MSE). Both runs start from the same weights and see the same batches; only dropout's
random stream differs (pyops draws its own Philox masks). Prints the loss and test
accuracy of both per epoch and plots them to <out>/digits_training.png.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

import pyops


class DigitsNet(nn.Module):
    """8x8 grey digits -> 10 classes, plus an 8x8 reconstruction."""

    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.MaxPool2d(2))                                   # 16 x 4 x 4
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                    nn.AvgPool2d(2))                                   # 32 x 2 x 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(128, 10))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
                                     nn.Conv2d(8, 1, 3, padding=1), nn.Sigmoid())      # 1 x 8 x 8

    def forward(self, x):
        h = self.block1(x)
        return self.classifier(self.block2(h)), self.decoder(h)


def load_digits(seed: int = 0):
    """(train_x, train_y, test_x, test_y): scikit-learn's 1797 digits scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def train(model: nn.Module, data, epochs: int, seed: int = 0, batch: int = 64, lr: float = 3e-3) -> list[dict]:
    """Train with Adam; one record per epoch: mean train loss, test loss and test accuracy."""
    train_x, train_y, test_x, test_y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout's stream (torch's generator seeds pyops' Philox too)
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=order)
        total, steps = 0.0, 0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            logits, recon = model(train_x[idx])
            loss = nn.functional.cross_entropy(logits, train_y[idx]) + nn.functional.mse_loss(recon, train_x[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
        model.eval()
        with torch.no_grad():
            logits, recon = model(test_x)
            test_loss = (nn.functional.cross_entropy(logits, test_y) + nn.functional.mse_loss(recon, test_x)).item()
            acc = (logits.argmax(1) == test_y).float().mean().item()
        history.append({"epoch": epoch + 1, "train_loss": total / steps, "test_loss": test_loss, "test_acc": acc})
    return history


def compare(data, epochs: int, seed: int = 0):
    """Train torch.nn and pyops copies of one DigitsNet; returns (torch history, pyops history, seconds each)."""
    torch.manual_seed(seed)
    reference = DigitsNet()
    swapped = pyops.swap(copy.deepcopy(reference))
    t0 = time.perf_counter()
    ref_hist = train(reference, data, epochs, seed)
    t1 = time.perf_counter()
    ours_hist = train(swapped, data, epochs, seed)
    t2 = time.perf_counter()
    return ref_hist, ours_hist, (t1 - t0, t2 - t1)


def plot(ref_hist, ours_hist, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in ref_hist]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for hist, label, style in ((ref_hist, "torch.nn", "-"), (ours_hist, "pyops (swapped)", "--")):
        a.plot(epochs, [h["train_loss"] for h in hist], style, label=f"{label} train")
        a.plot(epochs, [h["test_loss"] for h in hist], style, label=f"{label} test")
        b.plot(epochs, [100 * h["test_acc"] for h in hist], style, label=label)
    a.set(xlabel="epoch", ylabel="loss (CE + recon MSE)", title="loss")
    b.set(xlabel="epoch", ylabel="test accuracy (%)", title="digits test accuracy")
    a.legend()
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    data = load_digits(args.seed)
    ref_hist, ours_hist, (t_ref, t_ours) = compare(data, args.epochs, args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {args.epochs} epochs, seed {args.seed}")
    print(f"{'epoch':>5} | {'torch loss':>10} {'test acc':>8} | {'pyops loss':>10} {'test acc':>8}")
    for r, o in zip(ref_hist, ours_hist):
        print(f"{r['epoch']:5d} | {r['train_loss']:10.4f} {100 * r['test_acc']:7.2f}% | "
              f"{o['train_loss']:10.4f} {100 * o['test_acc']:7.2f}%")
    print(f"training time: torch.nn {t_ref:.1f} s, pyops {t_ours:.1f} s (backend: {pyops.requested_backend()})")
    png = args.out / "digits_training.png"
    plot(ref_hist, ours_hist, png)
    print(f"plot written to {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
