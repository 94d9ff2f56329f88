"""FasterMoE on ExpertParallel (dynamic shadowing, chunked pipeline) with real processes: 2 and 4 gloo ranks on
127.0.0.1. Outputs and gradients against the plain expert-parallel path and the single-process layer (float64),
with uniform and heavily skewed routing; one process group per world size runs every scenario."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import moe_kernels as mk
from moe_kernels.distributed import ExpertParallel
from moe_kernels.fastermoe import shadow_choice

from test_distributed import _batch, _run_group

H, I = 12, 10


def _case(chk, rank, world, device, Ts, cfg, shadow, chunks, skew="uniform", seed=0, policy="load"):
    """The FasterMoE layer on this rank's tokens vs the plain EP layer and the single-process layer on all tokens."""
    cfg = dict(cfg)
    E, k = cfg.pop("num_experts"), cfg.pop("top_k")
    El = E // world
    torch.manual_seed(seed)
    ref = mk.MoE(H, I, E, k, dtype=torch.float64, device=device, router_bias=True, **cfg)
    with torch.no_grad():
        if skew == "hot":  # every token to experts 0..k-1, all on rank 0
            ref.router.bias.zero_()
            ref.router.bias[:k] = 30.0
        elif skew == "skewed":  # most tokens to the last expert, the rest spread
            ref.router.bias.zero_()
            ref.router.bias[-1] = 2.5
    plain = mk.MoE(H, I, E, k, dtype=torch.float64, device=device, router_bias=True, ep_group=dist.group.WORLD, **cfg)
    ep = ExpertParallel(dist.group.WORLD, E, shadow=shadow, chunks=chunks, shadow_policy=policy)
    fast = mk.MoE(H, I, E, k, dtype=torch.float64, device=device, router_bias=True, ep_group=ep,
                  shadow_experts=shadow, **cfg)
    lo = rank * El
    state = {n: (t[lo:lo + El] if n in ("w13", "w2", "b13", "b2") else t) for n, t in ref.state_dict().items()}
    plain.load_state_dict(state)
    fast.load_state_dict(state)

    xs, _, _, gs = _batch(Ts, H, E, k, device, seed + 1)
    x_all = torch.cat(xs).requires_grad_()
    ref(x_all).backward(torch.cat(gs))
    start = sum(Ts[:rank])
    mine = slice(start, start + Ts[rank])
    outs = {}
    for name, moe in (("plain", plain), ("fast", fast)):
        x = xs[rank].clone().requires_grad_()
        y = moe(x)
        y.backward(gs[rank])
        outs[name] = (y, x.grad, moe)
    y, gx, _ = outs["fast"]
    chk.close("output vs plain EP", y, outs["plain"][0])
    chk.close("output vs single process", y, ref(x_all)[mine])
    chk.close("grad input vs plain EP", gx, outs["plain"][1])
    chk.close("grad input vs single process", gx, x_all.grad[mine])
    ref_params, plain_params = dict(ref.named_parameters()), dict(plain.named_parameters())
    for name, p in fast.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        chk.close(f"grad {name} vs plain EP", grad, plain_params[name].grad)
        expected = ref_params[name].grad
        if name in ("w13", "w2", "b13", "b2"):
            expected = expected[lo:lo + El]
        else:
            dist.all_reduce(grad)
        chk.close(f"grad {name} vs single process", grad, expected)
    t = ep.last_traffic
    if shadow:
        all_ids = ref.route(x_all.detach())[2].long()
        load = torch.bincount(all_ids.reshape(-1), minlength=E)
        params = sum(p[0].numel() for n, p in fast.named_parameters() if n in ("w13", "w2", "b13", "b2"))
        eligible = None
        if policy == "bytes":  # rows from non-owners, both directions, against one broadcast per other rank
            remote = torch.zeros(E, dtype=torch.int64)
            for r, part in enumerate(all_ids.split(Ts)):
                for e in part.reshape(-1).tolist():
                    remote[e] += e // El != r
            eligible = 2 * remote * H * 8 > (world - 1) * params * 8
        want = tuple(e for e in shadow_choice(load, shadow, eligible).tolist() if e >= 0)
        chk.true("shadowed experts", t.shadowed == want, f"{t.shadowed} != {want}")
        owned = sum(1 for e in want if e // El == rank)
        chk.true("weights broadcast", t.weight_elements_sent == owned * (world - 1) * params,
                 f"{t.weight_elements_sent} != {owned} * {world - 1} * {params}")
    if skew == "hot" and shadow >= k:  # everything computed where the tokens are
        chk.true("no rows sent when the hot experts are shadowed", t.rows_sent == 0, f"sent {t.rows_sent}")
    if not shadow:
        p = plain.ep.last_traffic
        chk.true("pipeline sends the plain path's rows", (t.rows_sent, t.rows_off_rank) == (p.rows_sent, p.rows_off_rank),
                 f"{t} vs {p}")


def _scenario_shadow_and_chunks(chk, rank, world, device):
    Ts = [5, 3, 9, 1][:world]
    mixtral = dict(num_experts=2 * world, top_k=2)
    chk.scenario = "uniform routing, shadow=2"
    _case(chk, rank, world, device, Ts, mixtral, shadow=2, chunks=1)
    chk.scenario = "every token to rank 0's experts, shadow=2"
    _case(chk, rank, world, device, Ts, mixtral, shadow=2, chunks=1, skew="hot", seed=1)
    chk.scenario = "skewed, shadow=1, chunks=3, biases, shared expert, plain relu MLP, k=3"
    _case(chk, rank, world, device, Ts, dict(num_experts=2 * world, top_k=3, expert_bias=True, shared_intermediate_size=6,
                                             gated=False, activation="relu", renormalize=False),
          shadow=1, chunks=3, skew="skewed", seed=2)
    chk.scenario = "uniform routing, chunks=2 without shadowing"
    _case(chk, rank, world, device, Ts, dict(num_experts=8, top_k=2), shadow=0, chunks=2, seed=3)
    chk.scenario = "hot routing, shadow=3, chunks=2, zero tokens on rank 1"
    _case(chk, rank, world, device, [4, 0, 6, 2][:world], dict(num_experts=8, top_k=2), shadow=3, chunks=2, skew="hot",
          seed=4)
    chk.scenario = "zero tokens on every rank, shadow=2, chunks=2"
    _case(chk, rank, world, device, [0] * world, dict(num_experts=8, top_k=2), shadow=2, chunks=2, seed=5)
    chk.scenario = "skewed, shadow=3 where it pays (shadow_policy='bytes'), 100 tokens"
    _case(chk, rank, world, device, [30, 20, 40, 10][:world], dict(num_experts=2 * world, top_k=2), shadow=3, chunks=1,
          skew="skewed", seed=7, policy="bytes")
    chk.scenario = "hierarchical routing, shadow=2, chunks=2"
    _case(chk, rank, world, device, Ts, dict(num_experts=8, top_k=2, routing="hierarchical", num_groups=4, topk_groups=2),
          shadow=2, chunks=2, skew="skewed", seed=6)


def _scenario_errors(chk, rank, world, device):
    chk.scenario = "FasterMoE errors"
    chk.raises("shadow with capacity", lambda: ExpertParallel(None, 2 * world, capacity=4, shadow=1), "exact path")
    chk.raises("ranks disagree on shadow", lambda: ExpertParallel(None, 2 * world, shadow=rank), "disagree on shadow")
    chk.raises("bad shadow_policy", lambda: ExpertParallel(None, 2 * world, shadow=1, shadow_policy="time"),
               "shadow_policy must be one of")
    chk.raises("ranks disagree on chunks", lambda: ExpertParallel(None, 2 * world, chunks=1 + rank), "disagree on chunks")
    chk.raises("shadow out of range", lambda: ExpertParallel(None, 2 * world, shadow=2 * world + 1),
               "must be in")
    ep = ExpertParallel(None, 2 * world, shadow=1)
    chk.raises("MoE shadow differs from its ExpertParallel", lambda: mk.MoE(8, 8, 2 * world, 2, ep_group=ep, shadow_experts=2),
               "shadow")


SCENARIOS = (_scenario_shadow_and_chunks, _scenario_errors)


@pytest.mark.parametrize("world", [2, 4])
def test_fastermoe_matches_plain_ep_and_single_process(world, tmp_path):
    failures = _run_group(world, "gloo", tmp_path, scenarios=SCENARIOS, preload=__name__)
    assert not failures, f"{len(failures)} failure(s) on {world} ranks:\n" + "\n".join(failures)


def test_shadow_choice_and_local_errors():
    load = torch.tensor([3, 9, 0, 9, 1])
    assert shadow_choice(load, 3).tolist() == [1, 3, 0]  # most loaded first, ties to the lower id
    assert shadow_choice(load, 5).tolist() == [1, 3, 0, 4, -1]  # experts without load are never shadowed
    with pytest.raises(ValueError, match="needs an ep_group"):
        mk.MoE(8, 8, 4, 2, shadow_experts=1)
