"""Batch-invariant mode: a token's results do not depend on the batch it came in.

By default the grouped GEMM picks its tiles from the rows per expert (small row tiles and long K tiles
for decode, wgmma-sized tiles for prefill) and the fused MoE takes the CUDA decode kernel for small
batches: the fastest choice for every batch, but the reduction order over K, the MMA instruction
and the kernel change with the batch size, so a token's outputs differ in the last bits between a
batch of 1 and a batch of 4096.

Inside ``with moe_kernels.batch_invariant():`` (or with ``MOE_KERNELS_BATCH_INVARIANT=1``) every
kernel's configuration is a function of the layer's shapes (E, k, H, I, N, K, dtype) and the GPU only,
never of the token count:

- the grouped GEMM (forward, dX, fused MoE forward and backward, LoRA shrink and expand) uses one
  tile config per (N, K, dtype, GPU), ignoring tuned files (those are keyed by row count);
- ``fused_moe`` never takes the CUDA decode kernel (the Triton kernel serves every batch);
- ``lora_moe`` computes the base layer ``x @ W0.T`` (and its dX) with the same fixed-config kernel
  instead of cuBLAS (whose kernel choice depends on T), and never takes the dense path;
- the other kernels (plan, permute, unpermute, combine, gating) already reduce per token in a fixed
  order with blocks sized from the layer's shapes.

Cost: decode batches run 64-row tiles (the padding rows are computed and discarded, and the K tiles
are shorter) and large prefill batches miss the 128-row tiles; ``python -m bench`` measures both modes.
The mode is off by default. It is read when an op runs (or when torch.compile traces it: a graph keeps
the mode it was traced in). Weight gradients sum over the batch and are deterministic, not
batch-invariant. The ``torch`` backend (the reference) makes no batch-invariance promise.
"""

from __future__ import annotations

import contextlib
import os
import threading

_state = threading.local()


def is_batch_invariant() -> bool:
    """True inside :func:`batch_invariant` or when ``MOE_KERNELS_BATCH_INVARIANT=1``."""
    depth = getattr(_state, "depth", 0)
    if depth:
        return getattr(_state, "on", True)
    return os.environ.get("MOE_KERNELS_BATCH_INVARIANT", "0") == "1"


@contextlib.contextmanager
def batch_invariant(enabled: bool = True):
    """Run the ops inside with batch-invariant configurations (``enabled=False`` turns the mode off
    inside, e.g. under ``MOE_KERNELS_BATCH_INVARIANT=1``).

    Example::

        >>> with moe_kernels.batch_invariant():
        ...     y1 = moe_kernels.fused_moe(x[:1], w13, w2, w[:1], ids[:1])
        ...     y = moe_kernels.fused_moe(x, w13, w2, w, ids)
        >>> torch.equal(y1[0], y[0])
        True
    """
    prev_depth, prev_on = getattr(_state, "depth", 0), getattr(_state, "on", True)
    _state.depth, _state.on = prev_depth + 1, bool(enabled)
    try:
        yield
    finally:
        _state.depth, _state.on = prev_depth, prev_on
