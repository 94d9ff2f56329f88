"""Hierarchical MoE (a tree of softmax gates) against a plain per-token float64 reference."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.hierarchical import hierarchical_gating, hierarchical_probs
from moe_kernels.testing import assert_close

import naive

TOL = 1e-10


def plain_gating(group_logits, expert_logits, k, kg, renormalize):
    """One token at a time: groups by p(g), then experts by p(e | g), ties to the lower index."""
    T, G = group_logits.shape
    n = expert_logits.shape[1] // G
    ws, ids = [], []
    for t in range(T):
        pg = torch.softmax(group_logits[t].double(), 0)
        key_g = pg.detach()
        groups = sorted(range(G), key=lambda g: (-float(key_g[g]), g))[:kg]
        w_t, i_t = [], []
        for g in groups:
            pe = torch.softmax(expert_logits[t, g * n:(g + 1) * n].double(), 0)
            for e in sorted(range(n), key=lambda e: (-float(pe[e].detach()), e))[: k // kg]:
                w_t.append(pg[g] * pe[e])
                i_t.append(g * n + e)
        w_t = torch.stack(w_t)
        ws.append(w_t / w_t.sum() if renormalize else w_t)
        ids.append(i_t)
    return torch.stack(ws) if T else group_logits.new_zeros(0, k).double(), torch.tensor(ids, dtype=torch.int64).view(T, k)


@pytest.mark.parametrize("T,G,E,k,kg,renormalize", [
    (9, 4, 16, 4, 2, True),
    (7, 3, 12, 2, 1, False),   # E not a power of two, one group
    (5, 2, 6, 6, 2, True),     # k = E
    (6, 5, 5, 1, 1, False),    # one expert per group, k = 1
    (0, 2, 8, 2, 2, True),     # no tokens
])
def test_hierarchical_gating_matches_plain(T, G, E, k, kg, renormalize):
    gl = torch.randn(T, G, dtype=torch.float64, requires_grad=True)
    el = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    w, ids = hierarchical_gating(gl, el, k, kg, renormalize=renormalize)
    gl2, el2 = gl.detach().clone().requires_grad_(), el.detach().clone().requires_grad_()
    w_ref, ids_ref = plain_gating(gl2, el2, k, kg, renormalize)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ids_ref)
    assert_close("weights", w, w_ref, rms_tol=TOL)
    if T:
        g = torch.randn(T, k, dtype=torch.float64)
        w.backward(g)
        w_ref.backward(g)
        assert_close("grad group logits", gl.grad, gl2.grad, rms_tol=TOL)
        assert_close("grad expert logits", el.grad, el2.grad, rms_tol=TOL)
        probs = hierarchical_probs(gl, el)
        assert_close("marginal sums to 1", probs.sum(1), torch.ones(T, dtype=torch.float64), rms_tol=TOL)


def test_hierarchical_ties_go_to_the_lower_index():
    w, ids = hierarchical_gating(torch.zeros(3, 4), torch.zeros(3, 8), 4, 2)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    assert_close("tied weights", w, torch.full((3, 4), 0.125), rms_tol=1e-7)


def test_hierarchical_gating_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of topk_groups"):
        hierarchical_gating(torch.randn(2, 4), torch.randn(2, 8), 3, 2)
    with pytest.raises(ValueError, match="divide the number of experts"):
        hierarchical_gating(torch.randn(2, 3), torch.randn(2, 8), 2, 1)
    with pytest.raises(ValueError, match="expert_logits must have shape"):
        hierarchical_gating(torch.randn(2, 4), torch.randn(3, 8), 2, 1)
    with pytest.raises(ValueError, match="routing='hierarchical'"):
        mk.MoE(16, 8, 8, 3, routing="hierarchical", num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="scoring='softmax'"):
        mk.MoE(16, 8, 8, 2, routing="hierarchical", num_groups=4, topk_groups=2, scoring="sigmoid")


@pytest.mark.parametrize("cfg", [
    dict(num_experts=12, top_k=4, num_groups=3, topk_groups=2, router_bias=True),
    dict(num_experts=8, top_k=2, num_groups=4, topk_groups=1, renormalize=False, shared_intermediate_size=8,
         expert_bias=True),
])
def test_hierarchical_layer_forward_backward_matches_plain(cfg):
    H, I, T = 16, 8, 11
    moe = mk.MoE(H, I, routing="hierarchical", dtype=torch.float64, aux_loss_coef=0.1, z_loss_coef=0.01, **cfg)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, H, dtype=torch.float64)
    y = moe(x)
    (y * g).sum().backward()

    p = {n: t.detach().clone().requires_grad_() for n, t in moe.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    gl = xr @ p["group_router.weight"].t() + p.get("group_router.bias", 0)
    el = xr @ p["router.weight"].t() + p.get("router.bias", 0)
    w, ids = plain_gating(gl, el, moe.top_k, moe.topk_groups, moe.renormalize)
    out = naive.moe(xr, p["w13"], p["w2"], w, ids, moe.activation, moe.gated, p.get("b13"), p.get("b2"))
    if moe.shared is not None:
        h = torch.cat([xr @ p["shared.gate_proj.weight"].t(), xr @ p["shared.up_proj.weight"].t()], -1)
        out = out + torch.stack([naive.act(r, moe.activation, True) for r in h]) @ p["shared.down_proj.weight"].t()
    assert_close("output", y, out, rms_tol=TOL)
    # aux loss: E * sum_e f_e P_e over the marginal p(g) p(e | g), plus both routers' z-losses
    E = moe.num_experts
    f = torch.bincount(ids.reshape(-1), minlength=E).double() / ids.numel()
    marginal = torch.stack([torch.softmax(gl[t], 0).repeat_interleave(E // moe.num_groups) *
                            torch.softmax(el[t].view(moe.num_groups, -1), 1).reshape(-1) for t in range(T)])
    z = sum(torch.logsumexp(l, 1).square().mean() for l in (gl, el))
    aux = 0.1 * E * (f * marginal.mean(0)).sum() + 0.01 * z
    assert_close("aux loss", moe.aux_loss, aux, rms_tol=TOL)
    ((out * g).sum()).backward()
    assert_close("grad x", x.grad, xr.grad, rms_tol=TOL)
    for n, t in moe.named_parameters():
        assert_close(f"grad {n}", t.grad, p[n].grad, rms_tol=TOL)
    assert moe.group_router.weight.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0
