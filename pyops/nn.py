"""Drop-in modules: subclasses of their torch.nn twins that override only ``forward``.

Constructor arguments, defaults, parameter names, ``state_dict``, ``repr``,
``train()/eval()`` and ``isinstance`` checks are torch's own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import avg_pool2d, dropout, max_pool2d, sigmoid

__all__ = ["AvgPool2d", "Dropout", "MaxPool2d", "Sigmoid"]


class Sigmoid(torch.nn.Sigmoid):
    """torch.nn.Sigmoid running pyops kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return sigmoid(input)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout running pyops kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training, self.inplace)


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d running pyops kernels."""

    def forward(self, input: Tensor):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d running pyops kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)
