import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close

import naive

# Model families of ../shared/models.json scaled down (H, I and E shrunk; routing settings kept).
FAMILIES = {
    "mixtral": dict(num_experts=8, top_k=2),
    "deepseek-v3": dict(num_experts=16, top_k=4, scoring="sigmoid", num_groups=8, topk_groups=4, scaling_factor=2.5,
                        correction_bias=True, shared_intermediate_size=16),
    "qwen1.5-moe": dict(num_experts=60, top_k=4, renormalize=False, shared_intermediate_size=24, shared_gate=True),
    "olmoe": dict(num_experts=64, top_k=8, renormalize=False),
    "gpt-oss": dict(num_experts=8, top_k=4, activation="swiglu_oai", expert_bias=True, router_bias=True),
    "switch": dict(num_experts=8, top_k=1, renormalize=False, activation="relu", gated=False, capacity_factor=1.0),
}
H, I = 32, 16


def naive_layer(moe: mk.MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer in float64 from its parameters, through the naive per-token experts."""
    x = x.reshape(-1, H).double()
    p = {n: t.detach().double() for n, t in moe.named_parameters()}
    logits = x @ p["router.weight"].t() + (p["router.bias"] if "router.bias" in p else 0)
    w, ids = mk.topk_gating(logits, moe.top_k, scoring=moe.scoring, renormalize=moe.renormalize,
                            correction_bias=moe.correction_bias, num_groups=moe.num_groups,
                            topk_groups=moe.topk_groups, scaling_factor=moe.scaling_factor)
    cap = None if moe.capacity_factor is None else math.ceil(moe.capacity_factor * x.shape[0] * moe.top_k / moe.num_experts)
    out = naive.moe(x, p["w13"], p["w2"], w, ids, moe.activation, moe.gated, p.get("b13"), p.get("b2"), capacity=cap)
    if moe.shared is not None:
        up = [x @ p["shared.up_proj.weight"].t()] if moe.gated else []
        h = torch.cat([x @ p["shared.gate_proj.weight"].t()] + up, -1)
        shared = torch.stack([naive.act(r, moe.activation, moe.gated) for r in h]) @ p["shared.down_proj.weight"].t()
        if moe.shared_gate is not None:
            shared = torch.sigmoid(x @ p["shared_gate.weight"].t()) * shared
        out = out + shared
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_layer_families(family):
    moe = mk.MoE(H, I, **FAMILIES[family], dtype=torch.float64)
    if moe.correction_bias is not None:
        moe.correction_bias.normal_(0, 0.1)
    x = torch.randn(3, 5, H, dtype=torch.float64)
    y = moe(x)
    assert y.shape == x.shape
    assert_close(f"{family} output", y.reshape(-1, H), naive_layer(moe, x), rms_tol=1e-10)


@pytest.mark.parametrize("family", ["mixtral", "deepseek-v3", "gpt-oss", "switch"])
def test_moe_layer_backward_matches_naive_autograd(family):
    moe = mk.MoE(H, I, **FAMILIES[family], dtype=torch.float64)
    x = torch.randn(7, H, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, H, dtype=torch.float64)
    moe(x).backward(g)
    got = {n: p.grad for n, p in moe.named_parameters()}
    got_x = x.grad

    # Same layer in naive float64 with autograd: router logits differentiable through topk_gating.
    params = {n: p.detach().clone().requires_grad_() for n, p in moe.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    logits = xr @ params["router.weight"].t() + (params["router.bias"] if "router.bias" in params else 0)
    w, ids = mk.topk_gating(logits, moe.top_k, scoring=moe.scoring, renormalize=moe.renormalize,
                            correction_bias=moe.correction_bias, num_groups=moe.num_groups,
                            topk_groups=moe.topk_groups, scaling_factor=moe.scaling_factor)
    cap = None if moe.capacity_factor is None else math.ceil(moe.capacity_factor * 7 * moe.top_k / moe.num_experts)
    out = naive.moe(xr, params["w13"], params["w2"], w, ids, moe.activation, moe.gated, params.get("b13"), params.get("b2"),
                    capacity=cap)
    if moe.shared is not None:
        h = torch.cat([xr @ params["shared.gate_proj.weight"].t(), xr @ params["shared.up_proj.weight"].t()], -1)
        out = out + torch.stack([naive.act(r, moe.activation, moe.gated) for r in h]) @ params["shared.down_proj.weight"].t()
    out.backward(g)
    assert_close("grad x", got_x, xr.grad, rms_tol=1e-10)
    for n, p in params.items():
        assert_close(f"grad {n}", got[n], p.grad, rms_tol=1e-10)


def test_moe_layer_gradcheck_small():
    moe = mk.MoE(6, 4, num_experts=3, top_k=2, expert_bias=True, shared_intermediate_size=4, shared_gate=True,
                 dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe(x), (x,))


def test_moe_layer_aux_losses_and_stats():
    moe = mk.MoE(H, I, num_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(20, H)
    moe(x)
    logits, _, ids, stats = moe.route(x)
    assert torch.equal(stats.tokens_per_expert, mk.expert_counts(ids, 8))
    expected = 0.01 * mk.load_balancing_loss(logits, ids, 8) + 0.001 * mk.router_z_loss(logits)
    assert_close("aux_loss", moe.aux_loss, expected, rms_tol=1e-6)
    counts = torch.bincount(ids.flatten().long(), minlength=8)
    assert torch.equal(moe.last_stats.tokens_per_expert.long(), counts)
    assert moe.last_stats.max_load == counts.max()
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_moe_layer_correction_bias_is_fp32_buffer_and_updates():
    moe = mk.MoE(H, I, num_experts=8, top_k=2, scoring="sigmoid", correction_bias=True, dtype=torch.bfloat16)
    assert moe.correction_bias.dtype == torch.float32
    assert "correction_bias" in dict(moe.named_buffers())
    moe(torch.randn(16, H, dtype=torch.bfloat16))
    load = moe.last_stats.tokens_per_expert
    before = moe.correction_bias.clone()
    mk.update_correction_bias(moe.correction_bias, load, 1e-3)
    expected = before + 1e-3 * torch.sign(load.float().mean() - load.float())
    assert torch.equal(moe.correction_bias, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_moe_layer_low_precision(dtype):
    moe = mk.MoE(H, I, num_experts=8, top_k=2, shared_intermediate_size=16, dtype=dtype)
    x = torch.randn(9, H, dtype=dtype)
    y = moe(x)
    assert y.dtype == dtype
    moe64 = mk.MoE(H, I, num_experts=8, top_k=2, shared_intermediate_size=16, dtype=torch.float64)
    moe64.load_state_dict({n: t.double() for n, t in moe.state_dict().items()})
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert_close("y", y, moe64(x.double()), rms_tol=tol)


def test_moe_layer_zero_tokens_and_batch_shapes():
    moe = mk.MoE(H, I, num_experts=4, top_k=2)
    assert moe(torch.randn(0, H)).shape == (0, H)
    assert moe(torch.randn(2, 0, H)).shape == (2, 0, H)
    with pytest.raises(ValueError, match="input must have shape"):
        moe(torch.randn(3, H + 1))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(top_k=9), "top_k"), (dict(num_groups=3), "num_groups"), (dict(activation="tanh"), "activation"),
     (dict(capacity_factor=0.0), "capacity_factor"), (dict(num_groups=4, topk_groups=1, top_k=3), "topk_groups")],
)
def test_moe_layer_bad_config(kwargs, match):
    args = dict(num_experts=8, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mk.MoE(H, I, **args)


def test_moe_layer_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    moe = mk.MoE(H, I, num_experts=8, top_k=2, shared_intermediate_size=16, aux_loss_coef=0.01)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for T in (5, 12):  # two sizes, one graph with a dynamic token count
        x = torch.randn(T, H, requires_grad=True)
        y = compiled(x)
        (y.square().sum() + compiled.aux_loss).backward()
        gx, gw = x.grad.clone(), moe.w13.grad.clone()
        moe.zero_grad()
        x2 = x.detach().clone().requires_grad_()
        y2 = moe(x2)
        (y2.square().sum() + moe.aux_loss).backward()
        assert_close("compiled y", y, y2, rms_tol=1e-5)
        assert_close("compiled grad x", gx, x2.grad, rms_tol=1e-5)
        assert_close("compiled grad w13", gw, moe.w13.grad, rms_tol=1e-5)
        moe.zero_grad()
