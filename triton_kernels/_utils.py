"""Small helpers shared by the Triton launchers."""

from __future__ import annotations


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def identity_launch(kernel):
    """Launch a jit kernel as it is (outside a ``torch.library.triton_op``, which passes ``wrap_triton``)."""
    return kernel
