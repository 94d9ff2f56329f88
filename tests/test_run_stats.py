"""Routing statistics accumulated over a run: per-expert counts and routing entropy, reset, compile."""

import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.hierarchical import hierarchical_probs
from moe_kernels.stats import RoutingStatsAccumulator, routing_entropy
from moe_kernels.testing import assert_close

H, I = 16, 8


def _entropy(p):
    return -sum(float(q) * math.log(float(q)) for q in p if q > 0)


@pytest.mark.parametrize("cfg", [dict(num_experts=6, top_k=2), dict(num_experts=6, top_k=2, scoring="sigmoid"),
                                 dict(num_experts=8, top_k=2, routing="hierarchical", num_groups=4, topk_groups=2),
                                 dict(num_experts=4, top_k=1, routing="expert_choice")])
def test_run_stats_accumulate_over_calls_and_reset(cfg):
    moe = mk.MoE(H, I, dtype=torch.float64, **cfg)
    E = moe.num_experts
    counts, ent, tokens = torch.zeros(E, dtype=torch.int64), 0.0, 0
    for T in (5, 0, 9, 3):
        x = torch.randn(T, H, dtype=torch.float64)
        moe(x)
        counts += moe.last_stats.tokens_per_expert.long()
        logits = x @ moe.router.weight.detach().t()
        if moe.group_router is not None:
            probs = hierarchical_probs(x @ moe.group_router.weight.detach().t(), logits)
        elif moe.scoring == "sigmoid":
            s = torch.sigmoid(logits)
            probs = s / s.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(logits, -1)
        ent += sum(_entropy(p) for p in probs)
        tokens += T
    rs = moe.run_stats
    assert torch.equal(rs.tokens_per_expert, counts) and int(rs.num_tokens) == tokens and int(rs.num_calls) == 4
    assert_close("mean entropy", rs.mean_entropy, torch.tensor(ent / tokens, dtype=torch.float64), rms_tol=1e-10)
    assert_close("load entropy", rs.stats().load_entropy, torch.tensor(_entropy(counts.double() / counts.sum())),
                 rms_tol=1e-6)
    assert_close("load fraction", rs.load_fraction, counts.float() / counts.sum(), rms_tol=1e-6)
    rs.reset()
    assert int(rs.tokens_per_expert.sum()) == 0 and int(rs.num_tokens) == 0 and float(rs.mean_entropy) == 0.0


def test_accumulator_direct_use_and_errors():
    acc = RoutingStatsAccumulator(3)
    acc.update(torch.tensor([1, 0, 2], dtype=torch.int32), 3, routing_entropy(torch.tensor([[0.5, 0.5, 0.0]])).sum())
    acc.update(torch.tensor([0, 0, 3]), 3)
    assert acc.tokens_per_expert.tolist() == [1, 0, 5] and int(acc.num_calls) == 2
    assert_close("entropy", acc.mean_entropy, torch.tensor(math.log(2) / 6, dtype=torch.float64), rms_tol=1e-7)
    with pytest.raises(ValueError, match="tokens_per_expert must have shape"):
        acc.update(torch.tensor([1, 2]), 1)
    with pytest.raises(ValueError, match="num_experts"):
        RoutingStatsAccumulator(0)
    moe = mk.MoE(H, I, 4, 2)
    moe.run_stats = None  # switched off
    moe(torch.randn(3, H))


def test_layer_with_run_stats_compiles_fullgraph_with_dynamic_tokens():
    moe = mk.MoE(H, I, 8, 2, routing="hierarchical", num_groups=4, topk_groups=2, residual=True, dtype=torch.float64,
                 aux_loss_coef=0.01)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for T in (6, 11):
        x = torch.randn(T, H, dtype=torch.float64)
        moe.run_stats.reset()
        eager = moe(x)
        counts = moe.run_stats.tokens_per_expert.clone()
        moe.run_stats.reset()
        assert_close(f"compiled T={T}", compiled(x), eager, rms_tol=1e-12)
        assert torch.equal(moe.run_stats.tokens_per_expert, counts)
