"""Hugging Face transformers' FP8 experts (``FP8Experts``, fine-grained FP8 checkpoints such as DeepSeek-V3's) on
moe_kernels.

transformers 5.x dispatches the forward of its FP8 experts through ``ALL_FP8_EXPERTS_FUNCTIONS``
(``transformers.integrations.finegrained_fp8``); :func:`register_fp8` adds a ``"moe_kernels"`` entry there, so a
model loaded with ``experts_implementation="moe_kernels"`` (or ``config._experts_implementation = "moe_kernels"``)
runs :func:`fp8_experts_forward`; ``integrations.transformers.register()`` does the same, with its ``backend``.
The module's tensors are taken as they are, without copies:

=========================== ======================= ================================================
attribute                   shape                   read as
=========================== ======================= ================================================
``gate_up_proj``            [E, 2I, H] e4m3fn       w13 data (``up_proj`` [E, I, H] without a gate)
``gate_up_proj_scale_inv``  [E, ceil(2I/bn),        block scales of ``block_size = (bn, bk)``; without
                            ceil(H/bk)]             a block size ``[E, 2, 1]``: one scale per half
``down_proj``               [E, H, I] e4m3fn        w2 data
``down_proj_scale_inv``     [E, ceil(H/bn),         as above (``[E, 1, 1]`` without a block size)
                            ceil(I/bk)]
=========================== ======================= ================================================

fp32 scales are used in place; UE8M0 (``float8_e8m0fnu``) scales become fp32 (a copy of the scales only).
Activations are quantized dynamically (per token and ``bk`` columns for block scales, per token otherwise).
``activation_scheme="static"`` (per-expert input scales) and softcapped gates are refused with a clear error.
"""

from __future__ import annotations

import torch

from ..moe import fused_moe
from ..quant import QuantizedWeight

__all__ = ["fp8_experts_forward", "register_fp8"]

NAME = "moe_kernels"


def _scale(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _activation(module) -> tuple[str, bool]:
    """(fused_moe activation, gated) of an FP8Experts module."""
    cfg = module.config
    gated = getattr(module, "has_gate", True)
    if getattr(module, "gate_softcap", None) is not None:
        raise ValueError("fp8_experts_forward: softcapped gates (mlp_gate_softcap) are not supported")
    if getattr(module, "swiglu_alpha", None) is not None:
        if (module.swiglu_alpha, module.swiglu_limit) != (1.702, 7.0):
            raise ValueError(f"fp8_experts_forward: swiglu_alpha={module.swiglu_alpha}, swiglu_limit={module.swiglu_limit}; "
                             "only gpt-oss's (1.702, 7.0) is supported")
        return "swiglu_oai", True
    if getattr(module, "limit", None) is not None:
        raise ValueError(f"fp8_experts_forward: clamped SwiGLU (swiglu_limit={module.limit}) without swiglu_alpha is "
                         "not supported")
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    kinds = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
    if act not in kinds:
        raise ValueError(f"fp8_experts_forward: hidden_act={act!r} is not supported; expected one of {tuple(kinds)}")
    return kinds[act], gated


def _weight(data: torch.Tensor, scale: torch.Tensor, block_size, gate_halves: bool) -> QuantizedWeight:
    """The QuantizedWeight view of one FP8Experts projection."""
    E, N, K = data.shape
    scale = _scale(scale)
    if block_size is not None:
        return QuantizedWeight(data=data, scale=scale, block_shape=(int(block_size[0]), int(block_size[1])))
    if gate_halves and tuple(scale.shape) == (E, 2, 1):  # one per-tensor scale per half [gate | up]
        return QuantizedWeight(data=data, scale=scale, block_shape=(N // 2, K))
    return QuantizedWeight(data=data, scale=scale.reshape(E))


def fp8_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-forward signature for ``FP8Experts``: ``hidden_states [T, H]``, ``top_k_index [T, k]``
    (ids >= E, expert-parallel sentinels, are dropped), ``top_k_weights [T, k]`` -> ``[T, H]``."""
    if getattr(self, "activation_scheme", "dynamic") != "dynamic":
        raise ValueError("fp8_experts_forward: activation_scheme='static' (per-expert input scales) is not supported; "
                         "use activation_scheme='dynamic'")
    if getattr(self, "has_bias", False):
        raise ValueError("fp8_experts_forward: FP8 experts with biases are not supported")
    if not getattr(self, "is_concatenated", True):
        raise ValueError("fp8_experts_forward: interleaved gate/up rows are not supported for FP8 experts")
    kind, gated = _activation(self)
    block = getattr(self, "block_size", None)
    if gated:
        w13 = _weight(self.gate_up_proj, self.gate_up_proj_scale_inv, block, True)
    else:
        w13 = _weight(self.up_proj, self.up_proj_scale_inv, block, False)
    w2 = _weight(self.down_proj, self.down_proj_scale_inv, block, False)
    E = w13.shape[0]
    ids = torch.where(top_k_index < E, top_k_index, -1)
    from . import hf_experts  # the backend chosen by integrations.transformers.register(backend=...)

    out = fused_moe(hidden_states, w13, w2, top_k_weights.float(), ids, activation=kind, gated=gated,
                    backend=getattr(hf_experts, "BACKEND", "auto"))
    return out.to(hidden_states.dtype)


def register_fp8() -> bool:
    """Add ``"moe_kernels"`` to transformers' ``ALL_FP8_EXPERTS_FUNCTIONS`` when that registry exists; returns
    whether it did. Idempotent."""
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_FP8_EXPERTS_FUNCTIONS.register(NAME, fp8_experts_forward)
    return True
