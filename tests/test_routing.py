"""plan_routing, permute and unpermute against naive per-slot implementations written from the contract.

Contract: slots ``t*k + j`` are grouped by expert, stably (flat slot order within an expert), every
segment padded to a multiple of ``block_size``; ``capacity`` keeps the first choices of all tokens
before the second choices, earlier tokens first (GShard); ``expert_map`` maps global ids to local
ones (-1: dropped); ids of -1 are dropped. permute gathers ``x[slot // k]`` (padding rows zero),
unpermute sums ``w[t, j] * y_sorted[row]`` over the kept slots in fp32.
"""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, tolerance

# ----- naive implementations (plain Python per slot) ---------------------------------------------------


def naive_plan(ids: list[list[int]], k: int, E: int, block_size: int = 1, capacity=None, expert_map=None):
    T = len(ids)
    local = [[-1] * k for _ in range(T)]
    for t in range(T):
        for j in range(k):
            g = ids[t][j]
            if g >= 0:
                local[t][j] = expert_map[g] if expert_map is not None else g
    if capacity is not None:
        used = [0] * E
        for j in range(k):  # all first choices, then all second choices, ...
            for t in range(T):  # ... earlier tokens first
                e = local[t][j]
                if e >= 0:
                    if used[e] < capacity:
                        used[e] += 1
                    else:
                        local[t][j] = -1
    members = [[] for _ in range(E)]
    for s in range(T * k):
        e = local[s // k][s % k]
        if e >= 0:
            members[e].append(s)
    offsets = [0]
    for m in members:
        offsets.append(offsets[-1] + -(-len(m) // block_size) * block_size)
    P = T * k + E * (block_size - 1)
    sorted_slots, slot_to_row = [-1] * P, [-1] * (T * k)
    for e, m in enumerate(members):
        for i, s in enumerate(m):
            sorted_slots[offsets[e] + i] = s
            slot_to_row[s] = offsets[e] + i
    return dict(sorted_slots=sorted_slots, expert_offsets=offsets, tokens_per_expert=[len(m) for m in members],
                slot_to_row=slot_to_row, members=members)


def naive_permute(x: torch.Tensor, sorted_slots: list[int], k: int) -> torch.Tensor:
    out = torch.zeros(len(sorted_slots), x.shape[1], dtype=x.dtype)
    xc = x.detach().cpu()
    for r, s in enumerate(sorted_slots):
        if s >= 0:
            out[r] = xc[s // k]
    return out


def naive_unpermute(y: torch.Tensor, slot_to_row: list[int], k: int, w=None) -> torch.Tensor:
    T = len(slot_to_row) // k
    Y = y.detach().double().cpu()
    W = None if w is None else w.detach().double().cpu().tolist()
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            r = slot_to_row[t * k + j]
            if r >= 0:
                out[t] += (1.0 if W is None else W[t][j]) * Y[r]
    return out


def check_plan(plan, ids: torch.Tensor, E: int, *, block_size=1, capacity=None, expert_map=None):
    """Exact comparison with the naive plan, plus the per-expert set view of the same contract."""
    T, k = ids.shape
    emap = None if expert_map is None else expert_map.tolist()
    want = naive_plan(ids.tolist(), k, E, block_size, capacity, emap)
    P = T * k + E * (block_size - 1)
    assert (plan.num_tokens, plan.top_k, plan.num_experts, plan.block_size, plan.num_rows) == (T, k, E, block_size, P)
    for name in ("sorted_slots", "expert_offsets", "tokens_per_expert", "slot_to_row"):
        got = getattr(plan, name)
        assert got.dtype == torch.int32, f"{name}: dtype {got.dtype}"
        assert got.device == ids.device, f"{name}: device {got.device}"
        assert got.dim() == 1 and got.shape[0] == len(want[name]), f"{name}: shape {tuple(got.shape)}"
        assert got.tolist() == want[name], f"{name} differs from the naive plan"
    # per expert as sets: exactly the kept slots of e, then padding (-1) up to the block boundary
    slots, offs = plan.sorted_slots.tolist(), plan.expert_offsets.tolist()
    for e in range(E):
        seg = slots[offs[e]:offs[e + 1]]
        n = plan.tokens_per_expert[e].item()
        assert (offs[e + 1] - offs[e]) % block_size == 0 and n <= offs[e + 1] - offs[e] < n + block_size
        assert set(seg[:n]) == set(want["members"][e]) and all(s == -1 for s in seg[n:])
        if capacity is not None:
            assert n <= capacity
    assert all(s == -1 for s in slots[offs[E]:])
    return want


def make_ids(T, k, n_ids, device, *, distinct=True, drop=0.0, dtype=torch.int32, empty_expert=None):
    if distinct:
        ids = torch.rand(T, n_ids).argsort(dim=1)[:, :k] if T else torch.empty(0, k, dtype=torch.int64)
    else:
        ids = torch.randint(0, n_ids, (T, k))
    if empty_expert is not None and n_ids > 1:
        # may repeat an expert within a row: routing does not need distinct ids
        ids = torch.where(ids == empty_expert, (empty_expert + 1) % n_ids, ids)
    if drop:
        ids[torch.rand(T, k) < drop] = -1
    return ids.to(dtype).to(device)


def make_map(E_local: int, E_global: int, device, dtype=torch.int32) -> torch.Tensor:
    """Global -> local map, E_local - 1 experts present (so one local expert is empty), rest -1."""
    m = torch.full((E_global,), -1, dtype=torch.int64)
    n = max(E_local - 1, 1)
    m[torch.randperm(E_global)[:n]] = torch.randperm(E_local)[:n]
    return m.to(dtype).to(device)


# T, E, k, block_size, capacity, use_map, drop, distinct, dtype, empty_expert
PLAN_CASES = [
    (0, 8, 2, 1, None, False, 0.0, True, torch.int32, None),
    (0, 4, 4, 16, 3, True, 0.0, True, torch.int64, None),
    (1, 1, 1, 1, None, False, 0.0, True, torch.int32, None),
    (1, 8, 8, 64, None, False, 0.0, True, torch.int64, None),
    (3, 2, 2, 16, 1, False, 0.0, True, torch.int32, None),
    (3, 257, 8, 1, None, False, 0.3, True, torch.int32, None),
    (37, 1, 1, 16, 3, False, 0.0, True, torch.int32, None),
    (37, 2, 1, 1, 0, False, 0.0, True, torch.int64, None),
    (37, 8, 2, 1, None, False, 0.0, True, torch.int32, 3),
    (37, 8, 8, 64, 3, False, 0.0, True, torch.int32, None),
    (37, 8, 8, 1, 5, False, 0.1, False, torch.int32, 0),
    (37, 8, 2, 1, 1000, False, 0.0, True, torch.int64, None),
    (37, 8, 2, 16, 9, False, 0.2, True, torch.int32, None),
    (37, 60, 2, 16, None, True, 0.0, True, torch.int32, None),
    (37, 60, 8, 1, 5, False, 0.2, True, torch.int64, 7),
    (37, 60, 60, 16, None, False, 0.0, True, torch.int32, None),
    (37, 64, 8, 64, 10, True, 0.1, True, torch.int32, None),
    (37, 64, 64, 1, None, False, 0.3, True, torch.int32, None),
    (37, 257, 1, 1, None, False, 0.0, True, torch.int32, None),
    (37, 257, 2, 16, 1, True, 0.0, False, torch.int64, None),
    (37, 257, 257, 64, None, False, 0.0, True, torch.int32, None),
]


@pytest.mark.parametrize("T,E,k,bs,cap,use_map,drop,distinct,dtype,empty", PLAN_CASES,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-bs{c[3]}-cap{c[4]}-map{int(c[5])}-drop{c[6]}-d{int(c[7])}-"
                              f"{str(c[8])[6:]}-empty{c[9]}" for c in PLAN_CASES])
def test_plan_permute_unpermute_match_naive(device, T, E, k, bs, cap, use_map, drop, distinct, dtype, empty):
    n_ids = 2 * E + 1 if use_map else E
    emap = make_map(E, n_ids, device) if use_map else None
    ids = make_ids(T, k, n_ids, device, distinct=distinct and k <= n_ids, drop=drop, dtype=dtype, empty_expert=empty)
    plan = mk.plan_routing(ids, E, block_size=bs, capacity=cap, expert_map=emap)
    want = check_plan(plan, ids, E, block_size=bs, capacity=cap, expert_map=emap)
    if empty is not None and not use_map:
        assert plan.tokens_per_expert[empty].item() == 0

    H = 24
    x = torch.randn(T, H, device=device)
    xs = mk.permute(x, plan)
    assert xs.dtype == x.dtype and xs.device == x.device
    assert torch.equal(xs.cpu(), naive_permute(x, want["sorted_slots"], k))

    y = torch.randn(plan.num_rows, H + 3, device=device)  # padding rows hold data too: they must not be read
    w = torch.rand(T, k, device=device) + 0.1
    out = mk.unpermute(y, plan, w)
    assert out.dtype == y.dtype and out.shape == (T, H + 3)
    assert_close("unpermute", out, naive_unpermute(y, want["slot_to_row"], k, w), rms_tol=tolerance(torch.float32))
    out1 = mk.unpermute(y, plan)
    assert_close("unpermute w=1", out1, naive_unpermute(y, want["slot_to_row"], k), rms_tol=tolerance(torch.float32))


# ----- plan_routing specifics ------------------------------------------------------------------------


def test_plan_routing_docstring_example(device):
    plan = mk.plan_routing(torch.tensor([[1, 0], [1, 1]], device=device), 2)
    assert plan.sorted_slots.tolist() == [1, 0, 2, 3]
    assert plan.expert_offsets.tolist() == [0, 1, 4]
    assert plan.tokens_per_expert.tolist() == [1, 3]
    assert plan.slot_to_row.tolist() == [1, 0, 2, 3]


def test_plan_routing_capacity_priority_gshard(device):
    """Second choices of early tokens lose to first choices of later tokens."""
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 2]], dtype=torch.int32, device=device)
    plan = mk.plan_routing(ids, 3, capacity=2)
    # expert 0: first choices t0, t2 (slots 0, 4) fill it; t1's second choice (slot 3) is dropped
    # expert 1: first choices t1, t3 (slots 2, 6); t0's and t2's second choices (1, 5) dropped
    assert plan.tokens_per_expert.tolist() == [2, 2, 1]
    dropped = [s for s, r in enumerate(plan.slot_to_row.tolist()) if r < 0]
    assert dropped == [1, 3, 5]
    check_plan(plan, ids, 3, capacity=2)
    plan = mk.plan_routing(ids, 3, capacity=0)
    assert plan.slot_to_row.eq(-1).all() and plan.expert_offsets.eq(0).all() and plan.sorted_slots.eq(-1).all()


@pytest.mark.parametrize("cap", [0, 1, 3, 12, None])
def test_plan_routing_capacity_grid(device, cap):
    T, k, E = 37, 4, 12
    ids = make_ids(T, k, E, device, drop=0.1)
    ids[:, 0] = 5  # a hot expert
    for bs in (1, 16):
        plan = mk.plan_routing(ids, E, block_size=bs, capacity=cap)
        check_plan(plan, ids, E, block_size=bs, capacity=cap)


def test_plan_routing_expert_map_and_minus_one(device):
    E = 3  # local experts of 10 global ones
    emap = torch.tensor([-1, 0, -1, 2, -1, -1, 1, -1, 0, -1], dtype=torch.int32, device=device)
    ids = torch.tensor([[1, 3], [-1, 8], [6, 0], [9, -1], [3, 6]], dtype=torch.int32, device=device)
    plan = mk.plan_routing(ids, E, expert_map=emap)
    # local experts: slot 0 (g1)->0, 1 (g3)->2, 3 (g8)->0, 4 (g6)->1, 8 (g3)->2, 9 (g6)->1
    assert plan.sorted_slots.tolist()[:6] == [0, 3, 4, 9, 1, 8]
    assert plan.tokens_per_expert.tolist() == [2, 2, 2]
    assert [s for s, r in enumerate(plan.slot_to_row.tolist()) if r < 0] == [2, 5, 6, 7]
    check_plan(plan, ids, E, expert_map=emap)
    for bs, cap in ((16, 1), (1, 0)):
        plan = mk.plan_routing(ids.long(), E, expert_map=emap.long(), block_size=bs, capacity=cap)
        check_plan(plan, ids.long(), E, block_size=bs, capacity=cap, expert_map=emap.long())


def test_plan_routing_all_dropped(device):
    ids = torch.full((5, 2), -1, dtype=torch.int32, device=device)
    plan = mk.plan_routing(ids, 4, block_size=16)
    check_plan(plan, ids, 4, block_size=16)
    assert plan.expert_offsets.eq(0).all() and plan.num_rows == 10 + 4 * 15
    x = torch.randn(5, 3, device=device)
    assert torch.equal(mk.permute(x, plan), torch.zeros(plan.num_rows, 3, device=device))
    y = torch.randn(plan.num_rows, 3, device=device)
    assert torch.equal(mk.unpermute(y, plan, torch.rand(5, 2, device=device)), torch.zeros(5, 3, device=device))


def test_plan_routing_empty_expert_map(device):
    ids = torch.full((2, 1), -1, dtype=torch.int32, device=device)
    plan = mk.plan_routing(ids, 3, expert_map=torch.empty(0, dtype=torch.int32, device=device))
    assert plan.slot_to_row.tolist() == [-1, -1]


def test_plan_routing_noncontiguous_ids(device):
    T, k, E = 37, 3, 8
    big = make_ids(T, 2 * k, E, device, distinct=True, drop=0.1)
    views = [big[:, ::2], big.t().contiguous().t()[:, :k], big[::2, 1:k + 1].t().contiguous().t()]
    for ids in views:
        assert not ids.is_contiguous()
        for kw in (dict(), dict(block_size=16, capacity=3)):
            plan = mk.plan_routing(ids, E, **kw)
            check_plan(plan, ids, E, **kw)
            x = torch.randn(ids.shape[0], 5, device=device)
            assert torch.equal(mk.permute(x, plan).cpu(), naive_permute(x, plan.sorted_slots.tolist(), k))


def test_plan_routing_is_deterministic(device):
    ids = make_ids(37, 8, 64, device, drop=0.1)
    a = mk.plan_routing(ids, 64, block_size=16, capacity=7)
    b = mk.plan_routing(ids, 64, block_size=16, capacity=7)
    for name in ("sorted_slots", "expert_offsets", "tokens_per_expert", "slot_to_row"):
        assert torch.equal(getattr(a, name), getattr(b, name))


# ----- permute / unpermute ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_permute_unpermute_dtypes(device, dtype):
    T, k, E, H = 37, 2, 8, 16
    ids = make_ids(T, k, E, device, drop=0.1)
    plan = mk.plan_routing(ids, E, block_size=16, capacity=12)
    x = torch.randn(T, H, device=device).to(dtype)
    xs = mk.permute(x, plan)
    assert xs.dtype == dtype and torch.equal(xs.cpu(), naive_permute(x, plan.sorted_slots.tolist(), k))
    y = torch.randn(plan.num_rows, H, device=device).to(dtype)
    for w in (None, torch.rand(T, k, device=device), torch.rand(T, k, device=device, dtype=torch.float64)):
        out = mk.unpermute(y, plan, w)
        assert out.dtype == dtype
        assert_close("unpermute", out, naive_unpermute(y, plan.slot_to_row.tolist(), k, w), rms_tol=tolerance(dtype))


def test_unpermute_accumulates_in_fp32(device):
    """bf16 rows that cancel: summing in bf16 would lose the small terms, fp32 accumulation keeps them."""
    T, k, E, H = 4, 3, 3, 8
    ids = torch.tensor([[0, 1, 2]] * T, dtype=torch.int32, device=device)
    plan = mk.plan_routing(ids, E)
    big = torch.full((H,), 256.0)
    small = torch.linspace(0.5, 1.5, H)
    rows = []
    for t in range(T):
        rows += [big, small, -big]  # slot order within expert = token order
    y = torch.empty(plan.num_rows, H)
    for s in range(T * k):
        y[plan.slot_to_row[s].item()] = rows[s]
    y = y.to(torch.bfloat16).to(device)
    out = mk.unpermute(y, plan)
    expected = naive_unpermute(y, plan.slot_to_row.tolist(), k)
    assert_close("unpermute bf16 cancellation", out, expected, rms_tol=tolerance(torch.bfloat16))


def test_permute_round_trip(device):
    T, k, E, H = 37, 1, 8, 16
    ids = make_ids(T, k, E, device)
    plan = mk.plan_routing(ids, E, block_size=16)
    x = torch.randn(T, H, device=device)
    assert torch.equal(mk.unpermute(mk.permute(x, plan), plan), x)
    ids = make_ids(T, 3, E, device, drop=0.2)
    plan = mk.plan_routing(ids, E)
    kept = (ids >= 0).sum(1, keepdim=True).double().cpu()
    assert_close("round trip", mk.unpermute(mk.permute(x, plan), plan), x.double().cpu() * kept, rms_tol=1e-6)


def test_unpermute_deterministic(device):
    T, k, E, H = 37, 8, 64, 32
    ids = make_ids(T, k, E, device)
    plan = mk.plan_routing(ids, E, block_size=16)
    y = torch.randn(plan.num_rows, H, device=device)
    w = torch.rand(T, k, device=device)
    a, b = mk.unpermute(y, plan, w), mk.unpermute(y, plan, w)
    assert torch.equal(a, b)
    yb = y.to(torch.bfloat16)
    assert torch.equal(mk.unpermute(yb, plan, w), mk.unpermute(yb, plan, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_unpermute_batch_invariant(device, dtype):
    """A token's results do not depend on the other tokens of the batch (bitwise)."""
    T, k, E, H = 37, 4, 16, 24
    ids = make_ids(T, k, E, device, drop=0.1)
    x = torch.randn(T, H, device=device).to(dtype)
    w = torch.rand(T, k, device=device)
    plan = mk.plan_routing(ids, E, block_size=16)
    y = torch.randn(plan.num_rows, H, device=device).to(dtype)
    full_out = mk.unpermute(y, plan, w)
    full_xs = mk.permute(x, plan)
    sub = [5, 6, 20, 36]
    plan_s = mk.plan_routing(ids[sub], E)
    y_s = torch.randn(plan_s.num_rows, H, device=device).to(dtype)
    rows_full, rows_sub = plan.slot_to_row.tolist(), plan_s.slot_to_row.tolist()
    xs_s = mk.permute(x[sub], plan_s)
    for i, t in enumerate(sub):
        for j in range(k):
            rf, rs = rows_full[t * k + j], rows_sub[i * k + j]
            assert (rf < 0) == (rs < 0)
            if rs >= 0:
                y_s[rs] = y[rf]
                assert torch.equal(xs_s[rs], full_xs[rf])
    assert torch.equal(mk.unpermute(y_s, plan_s, w[sub]), full_out[sub])


# ----- gradients -------------------------------------------------------------------------------------


def _grad_plan(device):
    E_global, E = 9, 4
    emap = make_map(E, E_global, device)
    ids = make_ids(6, 3, E_global, device, drop=0.2)
    return mk.plan_routing(ids, E, block_size=4, capacity=3, expert_map=emap)


def test_permute_gradcheck(device):
    plan = _grad_plan(device)
    x = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mk.permute(x, plan), (x,))
    assert torch.autograd.gradgradcheck(lambda x: mk.permute(x, plan), (x,))


def test_unpermute_gradcheck(device):
    plan = _grad_plan(device)
    y = torch.randn(plan.num_rows, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: mk.unpermute(y, plan, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: mk.unpermute(y, plan), (y,))
    assert torch.autograd.gradgradcheck(lambda y: mk.unpermute(y, plan), (y,))


def test_permute_unpermute_grad_fp32(device):
    """fp32 gradients against the naive expressions: dx[t] = sum_j g[row(t,j)], dw[t,j] = <y[row], g[t]>."""
    T, k, E, H = 11, 2, 6, 7
    ids = make_ids(T, k, E, device, drop=0.2)
    plan = mk.plan_routing(ids, E, block_size=4)
    x = torch.randn(T, H, device=device, requires_grad=True)
    g = torch.randn(plan.num_rows, H, device=device)
    (dx,) = torch.autograd.grad(mk.permute(x, plan), x, g)
    rows = plan.slot_to_row.tolist()
    assert_close("d x", dx, naive_unpermute(g, rows, k), rms_tol=1e-5)
    y = torch.randn(plan.num_rows, H, device=device, requires_grad=True)
    w = torch.rand(T, k, device=device, requires_grad=True)
    go = torch.randn(T, H, device=device)
    dy, dw = torch.autograd.grad(mk.unpermute(y, plan, w), (y, w), go)
    exp_dy = torch.zeros(plan.num_rows, H, dtype=torch.float64)
    exp_dw = torch.zeros(T, k, dtype=torch.float64)
    for s, r in enumerate(rows):
        if r >= 0:
            exp_dy[r] = w[s // k, s % k].item() * go[s // k].double().cpu()
            exp_dw[s // k, s % k] = (y[r].double().cpu() * go[s // k].double().cpu()).sum()
    assert_close("d y_sorted", dy, exp_dy, rms_tol=1e-5)
    assert_close("d topk_weights", dw, exp_dw, rms_tol=1e-5)
    assert dw.dtype == w.dtype and dy.dtype == y.dtype


# ----- opcheck ---------------------------------------------------------------------------------------


def test_opcheck_plan_routing(device):
    ids = make_ids(9, 3, 8, device, drop=0.2)
    emap = make_map(4, 8, device)
    op = torch.ops.moe_kernels.plan_routing.default
    torch.library.opcheck(op, (ids, 8, 1, None, None))
    torch.library.opcheck(op, (ids.long(), 8, 16, 2, None))
    torch.library.opcheck(op, (ids, 4, 4, 3, emap))


def test_opcheck_permute_unpermute_slot_dots(device):
    T, k, E, H = 7, 2, 5, 6
    plan = mk.plan_routing(make_ids(T, k, E, device, drop=0.2), E, block_size=4)
    ops = torch.ops.moe_kernels
    x = torch.randn(T, H, device=device, requires_grad=True)
    torch.library.opcheck(ops.permute.default, (x, plan.sorted_slots, plan.slot_to_row, k, None))
    torch.library.opcheck(ops.permute.default, (x, plan.sorted_slots, plan.slot_to_row, k,
                                                torch.rand(T, k, device=device, requires_grad=True)))
    y = torch.randn(plan.num_rows, H, device=device, requires_grad=True)
    torch.library.opcheck(ops.unpermute.default, (y, plan.sorted_slots, plan.slot_to_row, k, None))
    torch.library.opcheck(ops.unpermute.default, (y, plan.sorted_slots, plan.slot_to_row, k,
                                                  torch.rand(T, k, device=device, requires_grad=True)))
    per_token = torch.randn(T, H, device=device)
    rows = torch.randn(plan.num_rows, H, device=device)
    torch.library.opcheck(ops.slot_dots.default, (rows, plan.slot_to_row, per_token, k))
    d = ops.slot_dots(rows, plan.slot_to_row, per_token, k)
    exp = torch.zeros(T, k, dtype=torch.float64)
    for s, r in enumerate(plan.slot_to_row.tolist()):
        if r >= 0:
            exp[s // k, s % k] = (rows[r].double().cpu() * per_token[s // k].double().cpu()).sum()
    assert_close("slot_dots", d, exp, rms_tol=1e-5)


# ----- argument checks -------------------------------------------------------------------------------


def test_plan_routing_bad_arguments(device, monkeypatch):
    ids = make_ids(4, 2, 8, device)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.plan_routing(ids.flatten(), 8)
    with pytest.raises(TypeError, match="topk_ids"):
        mk.plan_routing(ids.float(), 8)
    with pytest.raises(TypeError, match="topk_ids"):
        mk.plan_routing(ids.tolist(), 8)
    with pytest.raises(ValueError, match="num_experts"):
        mk.plan_routing(ids, 0)
    with pytest.raises(TypeError, match="num_experts"):
        mk.plan_routing(ids, 8.0)
    with pytest.raises(ValueError, match="block_size"):
        mk.plan_routing(ids, 8, block_size=0)
    with pytest.raises(ValueError, match="capacity"):
        mk.plan_routing(ids, 8, capacity=-1)
    with pytest.raises(TypeError, match="capacity"):
        mk.plan_routing(ids, 8, capacity=2.5)
    with pytest.raises(TypeError, match="expert_map"):
        mk.plan_routing(ids, 4, expert_map=torch.zeros(8, device=device))
    with pytest.raises(ValueError, match="expert_map"):
        mk.plan_routing(ids, 4, expert_map=torch.zeros(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="backend"):
        mk.plan_routing(ids, 8, backend="jax")
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")  # strict mode: out-of-range ids raise
    with pytest.raises(ValueError, match="topk_ids"):
        mk.plan_routing(torch.tensor([[0, 8]], device=device), 8)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.plan_routing(torch.tensor([[0, -2]], device=device), 8)
    with pytest.raises(ValueError, match="expert_map"):
        mk.plan_routing(ids, 4, expert_map=torch.full((8,), 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="topk_ids"):  # ids index the global map
        mk.plan_routing(torch.tensor([[0, 6]], device=device), 4,
                        expert_map=torch.zeros(6, dtype=torch.int32, device=device))


def test_plan_routing_mixed_devices():
    ids = make_ids(4, 2, 8, "cpu")
    with pytest.raises(ValueError, match="expert_map"):
        mk.plan_routing(ids, 4, expert_map=torch.zeros(8, dtype=torch.int32, device="meta"))


def test_permute_unpermute_bad_arguments(device):
    T, k, E = 4, 2, 8
    plan = mk.plan_routing(make_ids(T, k, E, device), E, block_size=4)
    x = torch.randn(T, 6, device=device)
    y = torch.randn(plan.num_rows, 6, device=device)
    with pytest.raises(TypeError, match="plan"):
        mk.permute(x, (plan.sorted_slots, plan.slot_to_row))
    with pytest.raises(ValueError, match="x"):
        mk.permute(x[:3], plan)
    with pytest.raises(ValueError, match="x"):
        mk.permute(x[0], plan)
    with pytest.raises(TypeError, match="x"):
        mk.permute(x.long(), plan)
    with pytest.raises(TypeError, match="plan"):
        mk.unpermute(y, None)
    with pytest.raises(ValueError, match="y_sorted"):
        mk.unpermute(y[:-1], plan)
    with pytest.raises(ValueError, match="y_sorted"):
        mk.unpermute(y[None], plan)
    with pytest.raises(TypeError, match="y_sorted"):
        mk.unpermute(y.int(), plan)
    with pytest.raises(ValueError, match="topk_weights"):
        mk.unpermute(y, plan, torch.rand(T, k + 1, device=device))
    with pytest.raises(ValueError, match="topk_weights"):
        mk.unpermute(y, plan, torch.rand(T * k, device=device))
    with pytest.raises(TypeError, match="topk_weights"):
        mk.unpermute(y, plan, torch.ones(T, k, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="backend"):
        mk.permute(x, plan, backend="nope")
    with pytest.raises(ValueError, match="backend"):
        mk.unpermute(y, plan, backend="nope")


def test_permute_unpermute_mixed_devices():
    T, k, E = 4, 2, 8
    plan = mk.plan_routing(make_ids(T, k, E, "cpu"), E)
    with pytest.raises(ValueError, match=r"\bx\b"):
        mk.permute(torch.randn(T, 6, device="meta"), plan)
    with pytest.raises(ValueError, match="y_sorted"):
        mk.unpermute(torch.randn(plan.num_rows, 6, device="meta"), plan)
    with pytest.raises(ValueError, match="topk_weights"):
        mk.unpermute(torch.randn(plan.num_rows, 6), plan, torch.rand(T, k, device="meta"))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
def test_routing_every_backend(device, backend):
    """Each backend that serves these inputs meets the contract (skipped where it cannot serve them)."""
    T, k, E, H = 13, 2, 8, 16
    ids = make_ids(T, k, E, device, drop=0.1)
    x = torch.randn(T, H, device=device)
    w = torch.rand(T, k, device=device)
    try:
        plan = mk.plan_routing(ids, E, block_size=16, capacity=4, backend=backend)
        check_plan(plan, ids, E, block_size=16, capacity=4)
        xs = mk.permute(x, plan, backend=backend)
        out = mk.unpermute(xs, plan, w, backend=backend)
    except ValueError as exc:
        if "cannot serve these inputs" in str(exc):
            pytest.skip(str(exc))
        raise
    assert torch.equal(xs.cpu(), naive_permute(x, plan.sorted_slots.tolist(), k))
    assert_close("unpermute", out, naive_unpermute(xs, plan.slot_to_row.tolist(), k, w), rms_tol=1e-5)


def test_routing_unavailable_backends(device, monkeypatch):
    """An explicitly requested backend that cannot run here fails with a ValueError that says why."""
    from moe_kernels import _backends

    ids = make_ids(4, 2, 8, device)
    plan = mk.plan_routing(ids, 8)
    x = torch.randn(4, 6, device=device)
    y = torch.randn(plan.num_rows, 6, device=device)
    calls = (lambda b: mk.plan_routing(ids, 8, backend=b), lambda b: mk.permute(x, plan, backend=b),
             lambda b: mk.unpermute(y, plan, backend=b))
    if device.type != "cuda":
        for call in calls:
            with pytest.raises(ValueError, match="backend 'cuda' cannot serve") as err:
                call("cuda")
            assert len(str(err.value).split("cannot serve these inputs:")[1].strip()) > 10
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter: Triton cannot take CPU tensors
        _backends._triton_status.cache_clear()
        try:
            for call in calls:
                with pytest.raises(ValueError, match="backend 'triton' cannot serve") as err:
                    call("triton")
                assert len(str(err.value).split("cannot serve these inputs:")[1].strip()) > 10
        finally:
            _backends._triton_status.cache_clear()
