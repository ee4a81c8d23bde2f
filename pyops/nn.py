"""Drop-in modules: subclasses of their torch.nn twins that override only ``forward``.

Constructor arguments, defaults, parameter names, ``state_dict``, ``repr``,
``train()/eval()`` and ``isinstance`` checks are torch's own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import avg_pool2d, batch_norm, conv2d, conv_transpose2d, dropout, max_pool2d, sigmoid

__all__ = ["AvgPool2d", "BatchNorm2d", "Conv2d", "ConvTranspose2d", "Dropout", "MaxPool2d", "Sigmoid", "SyncBatchNorm"]


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


def _batch_norm_args(bn: torch.nn.modules.batchnorm._BatchNorm):
    """torch's _BatchNorm.forward bookkeeping: (bn_training, factor, running_mean, running_var).

    Counts the batch in ``num_batches_tracked`` (training with tracked stats); the
    factor is ``momentum``, or 1 / num_batches_tracked (cumulative average) for None.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    tracked = not bn.training or bn.track_running_stats
    return bn_training, factor, bn.running_mean if tracked else None, bn.running_var if tracked else None


class BatchNorm2d(torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d running pyops kernels."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        bn_training, factor, running_mean, running_var = _batch_norm_args(self)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps)


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm running pyops kernels; statistics combined with torch.distributed.

    In training under an initialised process group of more than one process, each
    process's statistics (from pyops' kernels) are all-gathered and merged, and the
    backward all-reduces the two gradient sums; otherwise it is BatchNorm. Unlike
    torch's, it also synchronises CPU tensors (gloo).
    """

    def forward(self, input: Tensor) -> Tensor:
        from .ops.batch_norm import SyncBatchNormFunction

        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training, factor, running_mean, running_var = _batch_norm_args(self)
        dist = torch.distributed
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
            need_sync = world_size > 1
        if not need_sync:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                              self.eps)
        from .functional import check_batch_norm_args

        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias, True, self.eps,
                              "sync_batch_norm", per_process=True)
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                           factor, group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Every BatchNorm*d in ``module`` as a pyops SyncBatchNorm sharing its parameters and buffers.

        As torch.nn.SyncBatchNorm.convert_sync_batchnorm: returns a new module when
        ``module`` itself is a batch norm, else converts its children in place.
        """
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
