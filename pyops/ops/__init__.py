"""Launchers, torch.library custom operators and autograd Functions, one module per op family."""
from . import batch_norm, conv, dropout, pooling, sigmoid  # noqa: F401  (registers the pyops:: operators)
