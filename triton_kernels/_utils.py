"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

from ._launch import DIRECT


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# The launch path outside a ``torch.library.triton_op`` (which passes ``Launcher(wrap_triton)``).
identity_launch = DIRECT
