"""Triton kernels of pyops (installed as ``pyops.triton_kernels``).

Only ``@triton.jit`` functions and their launch configurations live here; the
launchers and autograd Functions are in ``pyops.ops``. Nothing here imports pyops.
"""
