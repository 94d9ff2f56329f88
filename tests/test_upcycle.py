"""Residual MoE, sparse upcycling (MoE.from_dense), merging experts and MoE.to_dense, in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels as mk
from moe_kernels.layer import SharedExpert
from moe_kernels.testing import assert_close

TOL = 1e-10
H, I = 16, 12


def _plain_mlp(x, gate, up, down, act=F.silu):
    return (act(x @ gate.t()) * (x @ up.t())) @ down.t()


def test_residual_moe_matches_plain_formula_and_gradients():
    moe = mk.MoE(H, I, 6, 2, residual=True, shared_intermediate_size=8, dtype=torch.float64)
    inner = mk.MoE(H, I, 6, 2, shared_intermediate_size=8, dtype=torch.float64)
    inner.load_state_dict({n: t for n, t in moe.state_dict().items() if not n.startswith("residual")})
    x = torch.randn(2, 7, H, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, H, dtype=torch.float64)
    y = moe(x)
    (y * g).sum().backward()

    xr = x.detach().clone().requires_grad_()
    m = moe.residual_mlp
    wc = moe.residual_coef.weight.detach().clone().requires_grad_()
    gate, up, down = (p.detach().clone().requires_grad_() for p in (m.gate_proj.weight, m.up_proj.weight,
                                                                    m.down_proj.weight))
    c = torch.softmax(xr @ wc.t(), -1)
    expected = c[..., :1] * _plain_mlp(xr, gate, up, down) + c[..., 1:] * inner(xr)
    assert_close("residual MoE", y, expected, rms_tol=TOL)
    (expected * g).sum().backward()
    assert_close("grad x", x.grad, xr.grad, rms_tol=TOL)
    assert_close("grad residual_coef", moe.residual_coef.weight.grad, wc.grad, rms_tol=TOL)
    for name, ref in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        assert_close(f"grad residual_mlp.{name}", getattr(m, name).weight.grad, ref.grad, rms_tol=TOL)
    for name, p in inner.named_parameters():
        assert_close(f"grad {name}", dict(moe.named_parameters())[name].grad, p.grad, rms_tol=TOL)


class HFStyleMLP(nn.Module):
    """The layout of a Hugging Face Llama/Qwen MLP."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(H, I), nn.Linear(I, H), nn.ReLU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("kind", ["hf", "shared_expert", "plain_bias", "weights", "dense_ffn"])
def test_from_dense_with_no_noise_equals_the_dense_ffn(kind):
    if kind == "hf":
        dense = HFStyleMLP().double()
    elif kind == "shared_expert":
        dense = SharedExpert(H, I, "gelu", True, dtype=torch.float64)
    elif kind == "plain_bias":
        dense = PlainMLP().double()
    else:
        w13, w2 = torch.randn(2 * I, H, dtype=torch.float64) / 4, torch.randn(H, I, dtype=torch.float64) / 4
        dense = (w13, w2) if kind == "weights" else mk.DenseFFN(w13, w2, activation="silu")
    x = torch.randn(9, H, dtype=torch.float64)
    expected = dense(x) if isinstance(dense, nn.Module) else _plain_mlp(x, w13[:I], w13[I:], w2)
    for E, k in ((8, 2), (5, 5), (7, 1)):
        moe = mk.MoE.from_dense(dense, E, k)
        assert moe.num_experts == E and moe.w13.dtype == torch.float64
        assert_close(f"{kind}: upcycled E={E} k={k}", moe(x), expected, rms_tol=TOL)
    if kind == "plain_bias":
        assert moe.activation == "relu" and not moe.gated and moe.b13 is not None


def test_from_dense_noise_makes_experts_differ_by_that_much():
    dense = HFStyleMLP().double()
    moe = mk.MoE.from_dense(dense, 6, 2, noise=0.05, generator=torch.Generator().manual_seed(0))
    w = torch.cat([dense.gate_proj.weight, dense.up_proj.weight]).detach()
    dev = (moe.w13.detach() - w).std() / w.std()
    assert 0.04 < float(dev) < 0.06
    assert not torch.equal(moe.w13[0], moe.w13[1])
    with pytest.raises(ValueError, match="noise"):
        mk.MoE.from_dense(dense, 6, 2, noise=-1.0)
    with pytest.raises(ValueError, match="cannot find the FFN weights"):
        mk.MoE.from_dense(nn.Sequential(nn.Linear(H, H)), 4, 2)
    with pytest.raises(ValueError, match="w13 must have shape"):
        mk.MoE.from_dense((torch.randn(2 * I + 1, H), torch.randn(H, I)), 4, 2)


@pytest.mark.parametrize("cfg", [dict(), dict(shared_intermediate_size=8, shared_gate=True, residual=True),
                                 dict(capacity_factor=4.0, expert_bias=True)])
def test_merging_identical_experts_changes_nothing(cfg):
    dense = HFStyleMLP().double()
    moe = mk.MoE.from_dense(dense, 8, 2, **cfg)
    x = torch.randn(3, 5, H, dtype=torch.float64)
    y = moe(x)
    for num_out in (8, 3, 1):
        merged = moe.merge_experts(num_out)
        assert isinstance(merged, mk.MoE) and merged.num_experts == num_out and merged.top_k == min(2, num_out)
        assert_close(f"merged to {num_out}", merged(x), y, rms_tol=TOL)
    ffn = moe.to_dense()
    assert isinstance(ffn, mk.DenseFFN)
    assert_close("to_dense", ffn(x), y, rms_tol=TOL)
    if cfg.get("residual"):
        with pytest.raises(ValueError, match="shared or residual"):
            mk.MoE.from_dense(ffn, 4, 2)
    else:
        assert_close("from_dense of to_dense", mk.MoE.from_dense(ffn, 4, 2)(x), y, rms_tol=TOL)


def test_merge_experts_is_usage_weighted_within_router_similarity_clusters():
    E = 4
    moe = mk.MoE(H, I, E, 2, dtype=torch.float64, router_bias=True)
    with torch.no_grad():  # router rows: 0 ~ 1 and 2 ~ 3
        base = torch.randn(2, H, dtype=torch.float64)
        moe.router.weight.copy_(torch.stack([base[0], base[0] + 0.01, base[1], base[1] - 0.01]))
    usage = torch.tensor([10.0, 1.0, 2.0, 5.0])
    merged = moe.merge_experts(2, usage=usage)  # seeds: experts 0 and 3 (most used)
    w = moe.w13.detach()
    assert_close("cluster {0, 1}", merged.w13[0], (10 * w[0] + w[1]) / 11, rms_tol=TOL)
    assert_close("cluster {3, 2}", merged.w13[1], (5 * w[3] + 2 * w[2]) / 7, rms_tol=TOL)
    assert torch.equal(merged.router.weight, moe.router.weight[[0, 3]])
    assert torch.equal(merged.router.bias, moe.router.bias[[0, 3]])
    dense = moe.to_dense(usage=usage)
    assert_close("to_dense average", dense.w2, (moe.w2.detach() * (usage.double() / 18)[:, None, None]).sum(0),
                 rms_tol=TOL)
    # default usage: the tokens the layer counted in run_stats
    moe.run_stats.reset()
    for _ in range(3):
        moe(torch.randn(6, H, dtype=torch.float64))
    counts = moe.run_stats.tokens_per_expert.clone()
    assert torch.equal(moe.merge_experts(2).w13, moe.merge_experts(2, usage=counts).w13)


def test_merge_experts_refusals():
    with pytest.raises(ValueError, match="num_out"):
        mk.MoE(H, I, 4, 2).merge_experts(5)
    with pytest.raises(ValueError, match="groups"):
        mk.MoE(H, I, 8, 2, routing="hierarchical", num_groups=2, topk_groups=1).merge_experts(4)
    with pytest.raises(ValueError, match="usage must"):
        mk.MoE(H, I, 4, 2).merge_experts(2, usage=torch.tensor([1.0, -1.0, 0.0, 2.0]))
