"""moe_kernels: fast kernels for Mixture-of-Experts layers.

Public API (every function takes ``backend="auto" | "torch" | "triton" | "cuda"``):

- :func:`topk_gating` - router scores -> ``(topk_weights, topk_ids)``
- :func:`expert_choice_gating`, :func:`expert_choice_plan` - expert-choice routing (experts pick tokens)
- :func:`plan_routing`, :func:`permute`, :func:`unpermute` - group (token, slot) pairs by expert and back
- :func:`grouped_gemm` - every expert's rows times its own weight in one call
- :func:`grouped_gemm_wgrad` - per expert ``a_e^T @ b_e`` (ragged-K GEMM, the weight gradient)
- :func:`fused_moe` - the experts of an MoE layer in one call
- :class:`MoE` - router + experts + shared experts + auxiliary losses as an nn.Module (also hierarchical and residual;
  ``MoE.from_dense``, ``merge_experts``, ``to_dense``; ``run_stats`` over a run)
- :func:`lora_moe`, :class:`LoRAMoE`, :func:`wrap_linear` - a mixture of LoRA experts on a frozen linear layer
- :func:`load_balancing_loss`, :func:`seq_aux_loss`, :func:`router_z_loss`, :func:`routing_stats`, :func:`update_correction_bias`
- :class:`ExpertParallel` - expert parallelism: dispatch rows to the ranks owning their experts and combine back
  (FasterMoE shadowing and chunked pipelining: ``shadow``, ``chunks``)
- :class:`QuantizedWeight`, :func:`quantize` - FP8 expert weights (vLLM's layouts), accepted wherever a weight is
- :func:`backends` - which backends can run here, and why not
- :func:`batch_invariant` - a mode in which a token's results do not depend on the batch size
"""

from ._backends import BackendInfo, backends
from .batch_invariance import batch_invariant, is_batch_invariant
from .gating import (
    GatingStats,
    RoutingStats,
    expert_choice_gating,
    expert_counts,
    load_balancing_loss,
    router_z_loss,
    routing_stats,
    seq_aux_loss,
    topk_gating,
    update_correction_bias,
)
from . import _cuda, _triton  # noqa: F401  (optional backends)
from .distributed import EPHandle, EPTraffic, ExpertParallel
from .hierarchical import hierarchical_gating
from .gemm import grouped_gemm, grouped_gemm_wgrad
from .layer import MoE
from .lora import LoRAMoE, lora_moe, wrap_linear
from .moe import activation, fused_moe
from .quant import QuantizedWeight, quantize
from . import _quant_ops  # noqa: E402,F401  (the FP8 ops, registered at import: torch.compile never imports them)
from . import _wna16_ops  # noqa: E402,F401  (the int8 / int4 / mxfp4 ops, registered at import)
from .routing import RoutingPlan, expert_choice_plan, permute, plan_routing, unpermute
from .stats import RoutingStatsAccumulator
from .upcycle import DenseFFN

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "DenseFFN",
    "EPHandle",
    "EPTraffic",
    "ExpertParallel",
    "GatingStats",
    "LoRAMoE",
    "MoE",
    "QuantizedWeight",
    "RoutingPlan",
    "RoutingStats",
    "RoutingStatsAccumulator",
    "activation",
    "backends",
    "batch_invariant",
    "expert_choice_gating",
    "expert_choice_plan",
    "expert_counts",
    "fused_moe",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "hierarchical_gating",
    "is_batch_invariant",
    "load_balancing_loss",
    "lora_moe",
    "permute",
    "plan_routing",
    "quantize",
    "router_z_loss",
    "routing_stats",
    "seq_aux_loss",
    "topk_gating",
    "unpermute",
    "update_correction_bias",
    "wrap_linear",
]
