"""Expert-choice routing: gating, its plan, and the MoE layer end to end, against naive loops."""

import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close

import naive

BACKENDS = ["torch"] + (["triton"] if mk.backends()["triton"].available else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def naive_expert_choice(logits, capacity, scoring):
    """Per expert: tokens sorted by score descending, lower token first on ties; NaN last."""
    s = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
    T, E = s.shape
    w = torch.zeros(E, capacity, dtype=torch.float64)
    ids = torch.full((E, capacity), -1, dtype=torch.int32)
    for e in range(E):
        col = [(-math.inf if math.isnan(v) else v, t) for t, v in enumerate(s[:, e].tolist())]
        order = sorted(range(T), key=lambda t: (-col[t][0], t))[:capacity]
        for c, t in enumerate(order):
            ids[e, c], w[e, c] = t, s[t, e]
    return w, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,C", [(0, 4, 2), (1, 1, 1), (9, 4, 3), (37, 8, 10), (5, 3, 8), (20, 60, 5), (70, 6, 64)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_expert_choice_gating_matches_naive(backend, T, E, C, scoring):
    logits = torch.randn(T, E, device=DEV) * 2
    w, ids = mk.expert_choice_gating(logits, C, scoring=scoring, backend=backend)
    ew, eids = naive_expert_choice(logits.cpu(), C, scoring)
    assert w.shape == (E, C) and ids.dtype == torch.int32
    assert torch.equal(ids.cpu(), eids)
    assert_close("weights", w, ew, rms_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ties", "nan", "neg_inf"])
def test_expert_choice_adversarial(backend, kind):
    T, E, C = 12, 4, 5
    logits = torch.randn(T, E, device=DEV)
    if kind == "ties":
        logits = torch.randint(0, 2, (T, E), device=DEV).float()
    elif kind == "nan":
        logits[::3, 1] = float("nan")
    else:
        logits[:, 2] = float("-inf")
    _, ids = mk.expert_choice_gating(logits, C, backend=backend)
    assert ((ids >= 0) & (ids < T)).all()
    assert torch.equal(ids.cpu(), naive_expert_choice(logits.cpu(), C, "softmax")[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_choice_gradient(backend):
    logits = torch.randn(11, 5, device=DEV, requires_grad=True)
    g = torch.randn(5, 4, device=DEV)
    w, _ = mk.expert_choice_gating(logits, 4, backend=backend)
    (w * g).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    w64, _ = mk.expert_choice_gating(x64, 4, backend="torch")
    (w64 * g.double()).sum().backward()
    assert_close("grad logits", logits.grad, x64.grad, rms_tol=1e-6)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mk.expert_choice_gating(x, 3, scoring="sigmoid", backend="torch")[0], (x,))


def test_expert_choice_plan_layout():
    token_ids = torch.tensor([[3, 0, -1], [0, 2, 1]], dtype=torch.int32)  # E=2, C=3, T=4
    weights = torch.rand(2, 3)
    plan, sw = mk.expert_choice_plan(token_ids, weights, 4)
    assert plan.sorted_slots.tolist() == [6, 0, -1, 1, 5, 3]  # slot = t*E + e
    assert plan.expert_offsets.tolist() == [0, 3, 6]
    assert plan.tokens_per_expert.tolist() == [2, 3]
    assert plan.slot_to_row.view(4, 2).tolist() == [[1, 3], [-1, 5], [-1, 4], [0, -1]]
    expected = torch.zeros(4, 2)
    expected[3, 0], expected[0, 0], expected[0, 1], expected[2, 1], expected[1, 1] = (
        weights[0, 0], weights[0, 1], weights[1, 0], weights[1, 1], weights[1, 2])
    assert torch.equal(sw, expected)
    with pytest.raises(ValueError, match="token_ids must hold values"):
        mk.expert_choice_plan(torch.tensor([[4]]), torch.rand(1, 1), 4)


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 2.0])
def test_moe_expert_choice_matches_naive(capacity_factor):
    H, I, E, k, T = 16, 8, 4, 2, 13
    moe = mk.MoE(H, I, num_experts=E, top_k=k, routing="expert_choice", capacity_factor=capacity_factor,
                 expert_bias=True, dtype=torch.float64)
    x = torch.randn(T, H, dtype=torch.float64)
    y = moe(x)
    logits = x @ moe.router.weight.detach().t()
    C = max(1, math.ceil((capacity_factor or 1.0) * T * k / E))
    w, ids = naive_expert_choice(logits, C, "softmax")
    p = {n: t.detach() for n, t in moe.named_parameters()}
    expected = torch.zeros(T, H, dtype=torch.float64)
    for e in range(E):
        for c in range(C):
            t = int(ids[e, c])
            if t >= 0:
                h = p["w13"][e] @ x[t] + p["b13"][e]
                expected[t] += w[e, c] * (p["w2"][e] @ naive.act(h, "silu", True) + p["b2"][e])
    assert_close("expert-choice MoE", y, expected, rms_tol=1e-10)
    assert int(moe.last_stats.tokens_per_expert.sum()) == int((ids >= 0).sum())


def test_moe_expert_choice_gradcheck_and_compile():
    moe = mk.MoE(6, 4, num_experts=3, top_k=1, routing="expert_choice", dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe(x), (x,))
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True)
    x = torch.randn(8, 6, dtype=torch.float64)
    assert_close("compiled", compiled(x), moe(x), rms_tol=1e-12)


def test_expert_choice_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        mk.expert_choice_gating(torch.randn(4, 3), 0)
    with pytest.raises(ValueError, match="logits must be a 2-D"):
        mk.expert_choice_gating(torch.randn(4), 2)
    with pytest.raises(ValueError, match="routing"):
        mk.MoE(8, 4, num_experts=2, top_k=1, routing="hash")


def test_expert_choice_opcheck():
    logits = torch.randn(9, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_kernels.expert_choice_gating.default, (logits, 3, "softmax"))
    w, ids = mk.expert_choice_gating(logits.detach(), 3)
    torch.library.opcheck(torch.ops.moe_kernels.expert_choice_backward.default, (torch.randn(4, 3), logits.detach(), ids, "sigmoid"))
    torch.library.opcheck(torch.ops.moe_kernels.expert_choice_plan.default, (ids, 9))
