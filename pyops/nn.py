"""Drop-in modules: subclasses of their torch.nn twins that override only ``forward``.

Constructor arguments, defaults, parameter names, ``state_dict``, ``repr``,
``train()/eval()`` and ``isinstance`` checks are torch's own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import dropout, sigmoid

__all__ = ["Dropout", "Sigmoid"]


class Sigmoid(torch.nn.Sigmoid):
    """torch.nn.Sigmoid running pyops kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return sigmoid(input)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout running pyops kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)
