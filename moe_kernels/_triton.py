"""The ``triton`` backend: Triton kernels registered with ``torch.library.triton_op``.

``triton_op`` + ``wrap_triton`` let torch.compile see inside the ops. On CPU tensors (the
interpreter, ``TRITON_INTERPRET=1``) the ops run eagerly; torch.compile and opcheck of these ops
need a GPU (FakeTensor cannot trace an interpreted launch).
Importing this module is a no-op when triton cannot be imported.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _alloc, _backends
from . import ops
from .ops import gating_autograd

try:
    from torch.library import triton_op, wrap_triton

    from .triton_kernels import expert_choice as _expert_choice
    from .triton_kernels import gating as _gating
except Exception:  # triton missing or broken: the backend reports why
    _gating = None


def _empty(shape, dtype, device):
    return _alloc.empty(*shape, dtype=dtype, device=device)


def _no_fp64(tensor: torch.Tensor, *args, **kwargs) -> Optional[str]:
    """Refuse float64: the Triton kernels compute in fp32, the float64 reference is the torch backend."""
    if tensor.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    return None


if _gating is not None:

    @triton_op("moe_kernels::topk_gating_triton", mutates_args=())
    def topk_gating_triton(
        logits: Tensor, correction_bias: Optional[Tensor], top_k: int, scoring: str, renormalize: bool,
        num_groups: int, topk_groups: int, scaling_factor: float, with_stats: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _gating.topk_gating(logits, correction_bias, top_k, scoring, renormalize, num_groups, topk_groups,
                                   scaling_factor, with_stats, launch=wrap_triton, empty=_empty)

    @triton_op("moe_kernels::topk_gating_backward_triton", mutates_args=())
    def topk_gating_backward_triton(
        grad_weights: Tensor, grad_score_sums: Optional[Tensor], logits: Tensor, topk_ids: Tensor, scoring: str,
        renormalize: bool, scaling_factor: float,
    ) -> Tensor:
        return _gating.topk_gating_backward(grad_weights, grad_score_sums, logits, topk_ids, scoring, renormalize,
                                            scaling_factor, launch=wrap_triton, empty=_empty)

    _bwd, _setup = gating_autograd(topk_gating_backward_triton)
    topk_gating_triton.register_autograd(_bwd, setup_context=_setup)
    _backends.register("topk_gating", "triton", _no_fp64)(torch.ops.moe_kernels.topk_gating_triton.default)

    @triton_op("moe_kernels::expert_choice_gating_triton", mutates_args=())
    def expert_choice_gating_triton(logits: Tensor, capacity: int, scoring: str) -> Tuple[Tensor, Tensor]:
        return _expert_choice.expert_choice_gating(logits, capacity, scoring, launch=wrap_triton, empty=_empty)

    # The backward is a scatter and a softmax backward: the reference op serves it on every device.
    _bwd, _setup = ops.expert_choice_autograd(ops.expert_choice_backward)
    expert_choice_gating_triton.register_autograd(_bwd, setup_context=_setup)
    _backends.register("expert_choice_gating", "triton", _expert_choice.supports)(
        torch.ops.moe_kernels.expert_choice_gating_triton.default)
