"""Drop-in modules: subclasses of their torch.nn twins that override only ``forward``.

Constructor arguments, defaults, parameter names, ``state_dict``, ``repr``,
``train()/eval()`` and ``isinstance`` checks are torch's own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import avg_pool2d, conv2d, conv_transpose2d, dropout, max_pool2d, sigmoid

__all__ = ["AvgPool2d", "Conv2d", "ConvTranspose2d", "Dropout", "MaxPool2d", "Sigmoid"]


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


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d running pyops kernels; non-zero padding modes pad first, as torch does."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            padded = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d running pyops kernels; ``output_size`` resolved as torch does."""

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                self.groups, self.dilation)
