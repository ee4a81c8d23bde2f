"""pyops: PyTorch layers whose forward and backward run our own kernels.

Triton kernels for CUDA tensors, C++ kernels (``pyops._C``) for CPU tensors; see
``pyops.backend`` for choosing one explicitly.
"""
from . import ops  # noqa: F401  (registers the pyops:: custom operators)
from . import functional, nn
from ._dispatch import BACKENDS, backend, requested_backend
from ._swap import swap, unswap

__all__ = ["BACKENDS", "backend", "functional", "nn", "requested_backend", "swap", "unswap"]
__version__ = "0.1.0"
