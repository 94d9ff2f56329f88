"""Expert parallelism with real processes: 2 and 4 ranks on CPU with gloo over 127.0.0.1 (NCCL with one
GPU per rank when the machine has enough GPUs).

Every rank builds the same global batch from a shared seed, runs its own tokens through the sharded layer
and compares outputs and gradients with the single-process ``MoE`` on all tokens (float64). One process
group per world size runs every scenario; a scenario's failed comparisons are collected, not raised, so
the ranks stay in step and the report names each failure.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

import moe_kernels as mk
from moe_kernels.distributed import ExpertParallel
from moe_kernels.testing import assert_close, tolerance

JOIN_TIMEOUT_S = 180  # the whole group; a hung collective fails the test instead of the suite
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
TOL = tolerance(torch.float64)


# ----- one rank --------------------------------------------------------------------------------------


class Checks:
    """Failed comparisons of one rank, by scenario (collected, so every rank reaches every collective)."""

    def __init__(self, rank: int):
        self.rank, self.scenario, self.failures = rank, "", []

    def close(self, name, actual, expected, tol=TOL):
        try:
            assert_close(f"{self.scenario}: rank {self.rank}: {name}", actual, expected, rms_tol=tol)
        except AssertionError as exc:
            self.failures.append(str(exc))

    def true(self, name, ok: bool, detail=""):
        if not ok:
            self.failures.append(f"{self.scenario}: rank {self.rank}: {name} {detail}")

    def raises(self, name, fn, match: str):
        try:
            fn()
        except ValueError as exc:
            self.true(name, match in str(exc), f"raised {exc!r}, expected a message with {match!r}")
        else:
            self.true(name, False, "did not raise ValueError")


def _batch(Ts, H, E, k, device, seed, drop=0.0):
    """The global batch, identical on every rank: tokens, distinct expert ids per token, weights, output grads."""
    g = torch.Generator().manual_seed(seed)
    xs, ids, ws, gs = [], [], [], []
    for T in Ts:
        xs.append(torch.randn(T, H, generator=g, dtype=torch.float64))
        i = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
        ids.append(torch.where(torch.rand(T, k, generator=g) < drop, -1, i))
        ws.append(torch.rand(T, k, generator=g, dtype=torch.float64))
        gs.append(torch.randn(T, H, generator=g, dtype=torch.float64))
    return [[t.to(device) for t in ts] for ts in (xs, ids, ws, gs)]


def _layer_case(chk, rank, world, device, Ts, cfg, capacity=None, hot_rank=None, seed=0):
    """Sharded ``MoE`` on this rank's tokens vs the unsharded one on all tokens: outputs and every gradient."""
    H, I, E, k = 12, 10, cfg.pop("num_experts"), cfg.pop("top_k")
    torch.manual_seed(seed)
    ref = mk.MoE(H, I, E, k, dtype=torch.float64, device=device, **cfg)
    El = E // world
    if hot_rank is not None:  # every token's k experts on one rank
        with torch.no_grad():
            ref.router.bias.zero_()
            ref.router.bias[hot_rank * El:(hot_rank + 1) * El] = 30.0
    group = dist.group.WORLD if capacity is None else ExpertParallel(dist.group.WORLD, E, capacity=capacity)
    moe = mk.MoE(H, I, E, k, dtype=torch.float64, device=device, ep_group=group, **cfg)
    lo = rank * El
    state = {n: (t[lo:lo + El] if n in ("w13", "w2", "b13", "b2") else t) for n, t in ref.state_dict().items()}
    moe.load_state_dict(state)

    xs, _, _, gs = _batch(Ts, H, E, k, device, seed + 1)
    x_all = torch.cat(xs).requires_grad_()
    y_all = ref(x_all)
    y_all.backward(torch.cat(gs))
    start = sum(Ts[:rank])
    mine = slice(start, start + Ts[rank])
    x = xs[rank].clone().requires_grad_()
    y = moe(x)
    y.backward(gs[rank])
    if hot_rank is not None:
        ids = ref.route(x_all.detach())[2]
        chk.true("hot routing", bool(((ids // El) == hot_rank).all()), "(router bias did not send every token to one rank)")

    chk.close("output", y, y_all[mine])
    chk.close("grad input", x.grad, x_all.grad[mine])
    ref_params = dict(ref.named_parameters())
    for name, p in moe.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        expected = ref_params[name].grad
        if name in ("w13", "w2", "b13", "b2"):
            expected = expected[lo:lo + El]
        else:  # replicated (router, shared experts): the sum over ranks, as DDP would all-reduce it
            dist.all_reduce(grad)
        chk.close(f"grad {name}", grad, expected)


def _scenario_layers(chk, rank, world, device):
    Ts = [5, 3, 9, 1][:world]  # T different on every rank
    chk.scenario = "mixtral, T different on every rank"
    _layer_case(chk, rank, world, device, Ts, dict(num_experts=8, top_k=2))
    chk.scenario = "biases, shared expert, plain relu MLP, k=3"
    _layer_case(chk, rank, world, device, Ts, dict(num_experts=2 * world, top_k=3, expert_bias=True, router_bias=True,
                                                   shared_intermediate_size=6, shared_gate=True, gated=False,
                                                   activation="relu", renormalize=False), seed=1)
    chk.scenario = "zero tokens on rank 1"
    _layer_case(chk, rank, world, device, [4, 0, 6, 2][:world], dict(num_experts=8, top_k=2), seed=2)
    chk.scenario = "zero tokens on every rank"
    _layer_case(chk, rank, world, device, [0] * world, dict(num_experts=8, top_k=2), seed=3)
    chk.scenario = "all tokens to the last rank's experts"
    _layer_case(chk, rank, world, device, Ts, dict(num_experts=8, top_k=2, router_bias=True), hot_rank=world - 1, seed=4)
    chk.scenario = "sync-free path, capacity max(T)*k"
    _layer_case(chk, rank, world, device, Ts, dict(num_experts=8, top_k=2), capacity=max(Ts) * 2, seed=5)


def _expected_dispatch(rank, world, E, k, ids, capacity):
    """For every source rank: its slots kept for this rank, in send order (expert, then slot), and
    for this rank's own slots: which are kept at their destination."""
    El = E // world
    kept_here, my_kept = [], None
    for s, ids_s in enumerate(ids):
        flat = ids_s.reshape(-1).tolist()
        by_dest = {}
        for slot in sorted(range(len(flat)), key=lambda q: (flat[q], q)):
            if flat[slot] >= 0:
                by_dest.setdefault(flat[slot] // El, []).append(slot)
        if capacity is not None:
            by_dest = {d: v[:capacity] for d, v in by_dest.items()}
        kept_here.append(by_dest.get(rank, []))
        if s == rank:
            my_kept = {q for v in by_dest.values() for q in v}
    return kept_here, my_kept


def _scenario_dispatch_combine(chk, rank, world, device):
    """Rows land grouped by local expert, in (source, token, slot) order; combine, its gradients and the
    drop rule of the capacity path against values computed here slot by slot."""
    E, k, H = 4 * world, 3, 5
    El, first = 4, 4 * rank
    Ts = [6, 0, 9, 3][:world]
    xs, ids, ws, gs = _batch(Ts, H, E, k, device, seed=11, drop=0.15)
    for capacity in (None, max(Ts) * k, 2):
        chk.scenario = f"dispatch/combine, capacity={capacity}"
        ep = ExpertParallel(None, E, capacity=capacity)
        x = xs[rank].clone().requires_grad_()
        w = ws[rank].clone().requires_grad_()
        rows, handle = ep.dispatch(x, ids[rank], w)
        kept_here, my_kept = _expected_dispatch(rank, world, E, k, [i.cpu() for i in ids], capacity)
        offsets = handle.plan.expert_offsets.tolist()
        expect_rows = torch.zeros(rows.shape, dtype=rows.dtype, device=device)
        row = 0
        for e in range(El):
            for s in range(world):
                flat = ids[s].reshape(-1)
                for slot in kept_here[s]:
                    if int(flat[slot]) == first + e:
                        expect_rows[row] = xs[s][slot // k]
                        row += 1
            chk.true(f"segment {e}", offsets[e + 1] == row, f"ends at {offsets[e + 1]}, expected {row}")
        chk.true("rows", torch.equal(rows, expect_rows), "local rows differ from the expected (source, token, slot) order")
        # Expert first+e multiplies by first+e+1, so out[t] = sum_j kept * w * (id + 1) * x[t].
        experts = torch.searchsorted(handle.plan.expert_offsets[1:].contiguous(),
                                     torch.arange(rows.shape[0], device=device, dtype=torch.int32), right=True)
        scale = (experts.clamp(max=El - 1) + first + 1).to(rows.dtype)
        out = ep.combine(rows * scale[:, None], handle)
        out.backward(gs[rank])
        T = Ts[rank]
        kept = torch.tensor([q in my_kept for q in range(T * k)], dtype=torch.bool, device=device).view(T, k)
        factor = torch.where(kept, (ids[rank] + 1).to(torch.float64), 0.0)  # [T, k]
        chk.close("combine", out, (factor * ws[rank]).sum(1, keepdim=True) * xs[rank])
        chk.close("grad x", x.grad, (factor * ws[rank]).sum(1, keepdim=True) * gs[rank])
        chk.close("grad weights", w.grad, factor * (xs[rank] * gs[rank]).sum(1, keepdim=True))
        sent = int((ids[rank] >= 0).sum())
        chk.true("dropped", int(handle.dropped) == sent - len(my_kept), f"{int(handle.dropped)} != {sent - len(my_kept)}")


def _scenario_errors(chk, rank, world, device):
    chk.scenario = "errors"
    chk.raises("E not divisible", lambda: ExpertParallel(None, 2 * world + 1), "not divisible")
    chk.raises("ranks disagree on E", lambda: ExpertParallel(None, world * (2 if rank else 1)), "disagree")
    chk.raises("E invalid on one rank", lambda: ExpertParallel(None, 0 if rank == world - 1 else world),
               "must be in" if rank == world - 1 else "disagree")
    chk.raises("ranks disagree on capacity", lambda: ExpertParallel(None, world, capacity=4 + rank), "disagree")
    world_group = dist.group.WORLD
    chk.raises("MoE with E not divisible", lambda: mk.MoE(8, 8, 2 * world + 1, 2, ep_group=world_group), "not divisible")
    chk.raises("MoE with capacity_factor", lambda: mk.MoE(8, 8, 8, 2, capacity_factor=1.0, ep_group=world_group),
               "capacity_factor")
    ep = ExpertParallel(None, 2 * world)
    chk.raises("MoE with another E's ExpertParallel", lambda: mk.MoE(8, 8, 4 * world, 2, ep_group=ep), "num_experts")


SCENARIOS = (_scenario_layers, _scenario_dispatch_combine, _scenario_errors)


def _worker(rank, world, port, backend, out_dir, scenarios=SCENARIOS):
    torch.set_num_threads(1)  # the ranks share a few cores
    if backend == "gloo" and sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    chk = Checks(rank)
    try:
        for scenario in scenarios:
            scenario(chk, rank, world, device)
    except Exception:
        chk.failures.append(f"{chk.scenario}: rank {rank}: raised\n{traceback.format_exc()}")
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(chk.failures, f)
    dist.destroy_process_group()


# ----- the launcher ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world: int, backend: str, out_dir, scenarios=SCENARIOS, preload: str = __name__) -> list[str]:
    """Run every scenario (functions of the importable module ``preload``) on ``world`` processes; the failures
    of all ranks. Kills the group on a hang.
    A second try, on a new port, only when the first could not bind its port (another process took it)."""
    ctx = mp.get_context("forkserver")  # one import of torch and moe_kernels, then cheap forks
    ctx.set_forkserver_preload(["moe_kernels", preload])
    for attempt in range(2):
        procs = mp.start_processes(_worker, args=(world, _free_port(), backend, str(out_dir), scenarios), nprocs=world,
                                   join=False, start_method="forkserver")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        crashed = None
        try:
            while not procs.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    break
        except ProcessException as exc:  # one rank failed: join has terminated the others
            crashed = str(exc)
        finally:
            hung = [p for p in procs.processes if p.is_alive()]
            for p in hung:
                p.kill()
                p.join(10)
        ran = [out_dir / f"rank{r}.json" for r in range(world) if (out_dir / f"rank{r}.json").exists()]
        if not (crashed and not ran and "in use" in crashed.lower() and attempt == 0):
            break
    failures = [f for path in ran for f in json.loads(path.read_text())]
    if hung:
        failures.append(f"{len(hung)} rank(s) still running after {JOIN_TIMEOUT_S} s: killed")
    if crashed and not failures:
        failures.append(crashed)
    return failures


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world, backend, tmp_path):
    if backend == "nccl" and not (dist.is_nccl_available() and torch.cuda.device_count() >= max(world, 2)):
        pytest.skip(f"NCCL needs {world} GPUs, {torch.cuda.device_count()} present")
    failures = _run_group(world, backend, tmp_path)
    assert not failures, f"{len(failures)} failure(s) on {world} ranks ({backend}):\n" + "\n".join(failures)


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ExpertParallel(None, 8)
