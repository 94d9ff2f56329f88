"""Hugging Face transformers (>= 5.0) MoE blocks that compute what a ``moe_kernels.MoE`` computes, for the
``moe`` suite's baselines: a block of the model's family built from a config of the benchmark size, on the
meta device, then given the MoE's own parameter tensors (no copy; gpt-oss stores its experts transposed and
with gate/up interleaved, so it gets converted copies). The experts implementation (``eager``,
``grouped_mm``, and ours, ``moe_kernels``) is chosen per call through ``config._experts_implementation``, as transformers 5.x's
``@use_experts_implementation`` experts classes read it at every forward.
"""

from __future__ import annotations

import torch
from torch import nn

import moe_kernels as mk

from .shapes import Shape

IMPLEMENTATIONS = ("eager", "grouped_mm", "moe_kernels")


def family(model: str) -> str | None:
    """The transformers block family of a models.json name, or None."""
    for prefix, fam in (("mixtral", "mixtral"), ("deepseek-v3", "deepseek_v3"), ("kimi", "deepseek_v3"),
                        ("qwen3", "qwen3_moe"), ("gpt-oss", "gpt_oss")):
        if model.startswith(prefix):
            return fam
    return None


def unavailable(model: str) -> str | None:
    """Why no HF baseline runs for ``model`` here (None: it can)."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed"
    if int(transformers.__version__.split(".")[0]) < 5:
        return f"transformers {transformers.__version__} < 5.0 has no selectable experts implementations"
    if family(model) is None:
        return f"no transformers block mapped for {model}"
    return None


def _put(root: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = root.get_submodule(mod_name)
    if leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        setattr(mod, leaf, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad))


def build(s: Shape, moe: mk.MoE) -> nn.Module:
    """The block of ``s.model``'s family holding ``moe``'s parameters; call ``forward(block, x [T, H], impl)``."""
    from moe_kernels.integrations.transformers import register

    register()  # the "moe_kernels" experts implementation
    fam, c = family(s.model), s.cfg
    common = dict(hidden_size=s.H, num_experts_per_tok=s.k)
    with torch.device("meta"):
        if fam == "mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            cfg = MixtralConfig(intermediate_size=s.I, num_local_experts=s.E, router_jitter_noise=0.0, **common)
            block = MixtralSparseMoeBlock(cfg)
        elif fam == "deepseek_v3":
            from transformers import DeepseekV3Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE

            cfg = DeepseekV3Config(moe_intermediate_size=s.I, n_routed_experts=s.E, n_group=int(c.get("num_groups", 1)),
                                   topk_group=int(c.get("topk_groups", 1)), norm_topk_prob=bool(c.get("renormalize", True)),
                                   routed_scaling_factor=float(c.get("scaling_factor", 1.0)), n_shared_experts=1, **common)
            block = DeepseekV3MoE(cfg)
            block.shared_experts = DeepseekV3MLP(cfg, intermediate_size=s.shared_I)
        elif fam == "qwen3_moe":
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            cfg = Qwen3MoeConfig(moe_intermediate_size=s.I, num_experts=s.E, norm_topk_prob=bool(c.get("renormalize", True)),
                                 **common)
            block = Qwen3MoeSparseMoeBlock(cfg)
        elif fam == "gpt_oss":
            from transformers import GptOssConfig
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

            cfg = GptOssConfig(intermediate_size=s.I, num_local_experts=s.E, **common)
            block = GptOssMLP(cfg)
        else:
            raise ValueError(f"no transformers block for {s.model}")
    block.mk_config, block.mk_family = cfg, fam
    if fam == "gpt_oss":  # [E, H, 2I] with gate/up interleaved in columns; down [E, I, H]; router with a bias
        with torch.no_grad():
            E, I2, H = moe.w13.shape
            gu = torch.empty(E, H, I2, dtype=moe.w13.dtype, device=moe.w13.device)
            gu[:, :, 0::2], gu[:, :, 1::2] = moe.w13[:, : I2 // 2].transpose(1, 2), moe.w13[:, I2 // 2:].transpose(1, 2)
            gub = torch.empty_like(moe.b13)
            gub[:, 0::2], gub[:, 1::2] = moe.b13[:, : I2 // 2], moe.b13[:, I2 // 2:]
        tensors = {"router.weight": moe.router.weight, "router.bias": torch.zeros_like(moe.router.weight[:, 0]),
                   "experts.gate_up_proj": gu, "experts.gate_up_proj_bias": gub,
                   "experts.down_proj": moe.w2.detach().transpose(1, 2).contiguous(), "experts.down_proj_bias": moe.b2}
    else:
        tensors = {"gate.weight": moe.router.weight, "experts.gate_up_proj": moe.w13, "experts.down_proj": moe.w2}
        if fam == "deepseek_v3":
            tensors["gate.e_score_correction_bias"] = moe.correction_bias
            for p in ("gate_proj", "up_proj", "down_proj"):
                tensors[f"shared_experts.{p}.weight"] = getattr(moe.shared, p).weight
    for name, t in tensors.items():
        _put(block, name, t if isinstance(t, nn.Parameter) or name.endswith("correction_bias") else t.requires_grad_())
    left = [n for n, t in list(block.named_parameters()) + list(block.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{type(block).__name__}: no MoE tensor for {left}")
    return block


def forward(block: nn.Module, x: torch.Tensor, impl: str) -> torch.Tensor:
    """The block on ``x [T, H]`` with experts implementation ``impl``: ``[T, H]``."""
    block.mk_config._experts_implementation = impl
    out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def expert_grads(block: nn.Module) -> list[torch.Tensor | None]:
    """The gradients of the block's expert weights as they are (cheap: no copy)."""
    return [block.experts.gate_up_proj.grad, block.experts.down_proj.grad]


def moe_layout(block: nn.Module, g13: torch.Tensor | None, g2: torch.Tensor | None) -> list[torch.Tensor | None]:
    """:func:`expert_grads` in ``MoE``'s layout: ``[grad w13 [E, 2I, H], grad w2 [E, H, I]]``."""
    if block.mk_family != "gpt_oss" or g13 is None or g2 is None:
        return [g13, g2]
    return [torch.cat([g13[:, :, 0::2], g13[:, :, 1::2]], 2).transpose(1, 2), g2.transpose(1, 2)]
