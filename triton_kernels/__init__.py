"""Triton kernels of moe_kernels, installed as ``moe_kernels.triton_kernels``.

Each module holds ``@triton.jit`` kernels and their launchers (grid, block sizes, allocation of
outputs through the ``empty`` callable the caller passes). Arguments are checked by the public API
before they get here; registration as torch ops lives in ``moe_kernels._triton``.
"""
