"""Compute kernels of the model core, importable as ``llamactl.kernels``.

Each op lives in its own module with a plain-torch reference (``*_ref``); the Triton kernels, their launchers and
autograd Functions sit beside the reference in the same file. The model never calls these directly: it goes
through ``llamactl.ops``, which picks the implementation.
"""
