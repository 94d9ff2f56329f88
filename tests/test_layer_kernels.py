"""The whole MoE layer on the fast backends against the float64 torch reference, for every model
family of models.json (scaled down): forward and backward, with shared experts, capacity and
expert-choice routing. fp32 under the interpreter on CPU; bf16 too on a GPU."""

import json
import math
import os

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in ("triton", "cuda") if mk.backends()[b].available]
if not FAST:
    pytest.skip("no fast backend here", allow_module_level=True)

_MODELS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models.json")
BUILTIN = {  # used when the shared model list is not beside the checkout
    "mixtral-8x7b": {"experts": 8, "top_k": 2, "scoring": "softmax", "renormalize": True, "shared_intermediate": 0,
                     "activation": "silu"},
    "deepseek-v3": {"experts": 256, "top_k": 8, "scoring": "sigmoid", "renormalize": True, "shared_intermediate": 2048,
                    "activation": "silu", "num_groups": 8, "topk_groups": 4, "scaling_factor": 2.5, "correction_bias": True},
}


def families():
    try:
        with open(_MODELS) as f:
            models = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    except OSError:
        models = BUILTIN
    return models


def layer_kwargs(cfg):
    """MoE arguments of a model entry, scaled down: H=64, I=32, at most 32 experts (groups kept)."""
    groups = cfg.get("num_groups", 1)
    E = min(cfg["experts"], 32)
    E -= E % groups
    return dict(
        num_experts=E, top_k=min(cfg["top_k"], E), scoring=cfg["scoring"], renormalize=cfg["renormalize"],
        num_groups=groups, topk_groups=cfg.get("topk_groups", 1), scaling_factor=cfg.get("scaling_factor", 1.0),
        correction_bias=cfg.get("correction_bias", False), shared_intermediate_size=32 if cfg["shared_intermediate"] else 0,
        shared_gate=cfg.get("shared_gate") == "sigmoid", activation=cfg["activation"], gated=cfg.get("gated", True),
        expert_bias=cfg.get("bias", False), router_bias=cfg.get("bias", False), capacity_factor=cfg.get("capacity_factor"),
    )


def compare(kwargs, backend, dtype, T=24):
    ref = mk.MoE(64, 32, **kwargs, dtype=torch.float64, device=DEV, backend="torch")
    if ref.correction_bias is not None:
        ref.correction_bias.normal_(0, 0.05)
    fast = mk.MoE(64, 32, **kwargs, dtype=dtype, device=DEV, backend=backend)
    fast.load_state_dict({k: v.to(dtype) if v.is_floating_point() and "correction" not in k else v
                          for k, v in ref.state_dict().items()})
    x = torch.randn(T, 64, device=DEV, dtype=torch.float64)
    g = torch.randn(T, 64, device=DEV, dtype=torch.float64)
    x_ref, x_fast = x.clone().requires_grad_(), x.to(dtype).requires_grad_()
    y_ref, y_fast = ref(x_ref), fast(x_fast)
    y_ref.backward(g)
    y_fast.backward(g.to(dtype))
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    assert_close("output", y_fast, y_ref, rms_tol=tol)
    assert_close("grad input", x_fast.grad, x_ref.grad, rms_tol=tol)
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        assert_close(f"grad {name}", p_fast.grad, p_ref.grad, rms_tol=tol)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
@pytest.mark.parametrize("family", sorted(families()))
def test_moe_layer_family_on_fast_backend(backend, dtype, family):
    kwargs = layer_kwargs(families()[family])
    if backend == "cuda" and not mk.backends()["triton"].available:
        pytest.skip("training on the cuda backend uses the triton kernels")
    compare(kwargs, backend, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("variant", ["capacity", "expert_choice", "no_shared", "shared_gate"])
def test_moe_layer_variants_on_fast_backend(backend, variant):
    kwargs = dict(num_experts=8, top_k=2, shared_intermediate_size=32)
    if variant == "capacity":
        kwargs.update(capacity_factor=0.75)
    elif variant == "expert_choice":
        kwargs.update(routing="expert_choice", capacity_factor=1.5)
    elif variant == "no_shared":
        kwargs.update(shared_intermediate_size=0)
    else:
        kwargs.update(shared_gate=True)
    compare(kwargs, backend, torch.float32, T=math.ceil(20 * 1.1))
