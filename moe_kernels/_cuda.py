"""Python side of the ``moe_kernels._C`` CUDA extension: fake implementations and backend entries.

Importing this module never fails: without the extension the ``cuda`` backend reports why it is
unavailable (see :func:`moe_kernels.backends`).
"""

from __future__ import annotations

import torch

from . import _backends

try:
    from . import _C  # noqa: F401  (registers torch.ops.moe_kernels.*_cuda)
except ImportError:
    _C = None

if _C is not None:

    @torch.library.register_fake("moe_kernels::expert_counts_cuda")
    def _(topk_ids, num_experts):
        return topk_ids.new_empty(num_experts, dtype=torch.int32)

    def _counts_supports(topk_ids, *args, **kwargs):
        return None

    _backends.register("expert_counts", "cuda", _counts_supports)(torch.ops.moe_kernels.expert_counts_cuda.default)
