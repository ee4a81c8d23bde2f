"""``pyops.swap`` / ``pyops.unswap``: put pyops layers into an existing model, and take them out.

Every pyops module subclasses its torch.nn twin and adds no state, only ``forward``.
So a swap changes the class of each layer object in place (``module.__class__``): the
same object keeps its Parameters (an optimizer built before the swap keeps working),
buffers, hooks, device, dtype, training mode and position in every container, and
``unswap`` changes it back. Only exact torch.nn types are swapped: a user's subclass
of torch.nn.Conv2d may override more than ``forward``, so it is left alone.
"""
from __future__ import annotations

import collections
import logging

import torch

from . import nn as pnn

log = logging.getLogger("pyops")

TWINS: dict[type, type] = {
    torch.nn.Conv2d: pnn.Conv2d,
    torch.nn.ConvTranspose2d: pnn.ConvTranspose2d,
    torch.nn.MaxPool2d: pnn.MaxPool2d,
    torch.nn.AvgPool2d: pnn.AvgPool2d,
    torch.nn.BatchNorm2d: pnn.BatchNorm2d,
    torch.nn.SyncBatchNorm: pnn.SyncBatchNorm,
    torch.nn.Dropout: pnn.Dropout,
    torch.nn.Sigmoid: pnn.Sigmoid,
}
ORIGINALS: dict[type, type] = {ours: theirs for theirs, ours in TWINS.items()}


def _layer_types(types, arg: str) -> set[type] | None:
    if types is None:
        return None
    if isinstance(types, type):
        types = [types]
    out = set()
    for t in types:
        torch_type = ORIGINALS.get(t, t)  # pyops.nn.Conv2d names the same layer as torch.nn.Conv2d
        if torch_type not in TWINS:
            names = ", ".join(sorted(f"torch.nn.{t.__name__}" for t in TWINS))
            raise ValueError(f"pyops.swap: {arg} takes layer types among {names}; got {t!r}")
        out.add(torch_type)
    return out


def _retype(model: torch.nn.Module, mapping: dict[type, type], keep, verbose: bool, what: str) -> dict[str, int]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyops.{what}: expected a torch.nn.Module, got {type(model).__name__}")
    counts: collections.Counter[str] = collections.Counter()
    for name, module in model.named_modules(remove_duplicate=True):
        new = mapping.get(type(module))
        if new is None or not keep(type(module)):
            continue
        old = type(module)
        module.__class__ = new
        counts[old.__name__] += 1
        if verbose:
            print(f"pyops.{what}: {name or '(model)'}: {old.__module__}.{old.__qualname__} -> "
                  f"{new.__module__}.{new.__qualname__}")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing"
    if verbose:
        print(f"pyops.{what}: replaced {summary}")
    log.info("pyops.%s: replaced %s", what, summary)
    return dict(counts)


def swap(model: torch.nn.Module, include=None, exclude=None, verbose: bool = False) -> torch.nn.Module:
    """Replace, in place, every exact torch.nn layer pyops implements with its pyops twin; return ``model``.

    Args:
        model: any module; its submodules are searched recursively (Sequential,
            ModuleList, ModuleDict and custom containers alike), ``model`` itself included.
        include: layer types to swap (default: all of Conv2d, ConvTranspose2d,
            MaxPool2d, AvgPool2d, BatchNorm2d, SyncBatchNorm, Dropout, Sigmoid).
        exclude: layer types to leave as they are.
        verbose: print every replaced layer and the count per type.

    The counts per type are also logged (logger ``pyops``, INFO) and kept in
    ``model.pyops_swap_counts``. Swapping a swapped model changes nothing.
    """
    inc, exc = _layer_types(include, "include"), _layer_types(exclude, "exclude") or set()
    counts = _retype(model, TWINS, lambda t: (inc is None or t in inc) and t not in exc, verbose, "swap")
    model.pyops_swap_counts = counts
    return model


def unswap(model: torch.nn.Module, verbose: bool = False) -> torch.nn.Module:
    """Turn every pyops layer in ``model`` back into its torch.nn type, in place; return ``model``."""
    _retype(model, ORIGINALS, lambda t: True, verbose, "unswap")
    model.__dict__.pop("pyops_swap_counts", None)
    return model
