"""Conventions of vLLM, TransformerEngine/Megatron, MegaBlocks and DeepSeek behind our API.

Each peer's semantics are written here as a small reference (from its documented behaviour and its own
tests), never imported, and our API is held against it. Also the edge cases those callers hit: empty
batches, k = 0, sentinel ids, narrow id dtypes, data-dependent sizes under torch.compile.
"""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.integrations import vllm as mkv
from moe_kernels.testing import assert_close

PLAN_BACKENDS = ["torch", "triton"]  # the cuda plan kernel runs on a GPU only
ID_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def plans_equal(a, b):
    for name in ("sorted_slots", "expert_offsets", "tokens_per_expert", "slot_to_row"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def random_ids(T, k, E, *, drop=0.0):
    ids = torch.rand(T, E).argsort(dim=1)[:, :k] if T else torch.empty(0, k, dtype=torch.int64)
    if drop:
        ids[torch.rand(T, k) < drop] = -1
    return ids.to(torch.int32)


def backend_or_skip(backend):
    if not mk.backends()[backend].available:
        pytest.skip(mk.backends()[backend].reason)


# ----- defects: empty batches, k = 0, data-dependent sizes -------------------------------------------


def _all_grads(*tensors):
    return [t.grad for t in tensors]


def test_empty_batch_gradients_connected():
    """T = 0: every differentiable input gets a gradient (zeros), never None."""
    E, k, H, I = 4, 2, 8, 6
    x = torch.randn(0, H, requires_grad=True)
    w = torch.rand(0, k, requires_grad=True)
    ids = torch.empty(0, k, dtype=torch.int32)
    plan = mk.plan_routing(ids, E, block_size=4)
    xs, rw = mk.permute(x, plan, topk_weights=w)
    (xs.sum() + rw.sum()).backward()
    assert x.grad is not None and w.grad is not None and w.grad.shape == (0, k)

    y = torch.randn(plan.num_rows, H, requires_grad=True)
    w2 = torch.rand(0, k, requires_grad=True)
    mk.unpermute(y, plan, w2).sum().backward()
    assert torch.equal(y.grad, torch.zeros_like(y)) and w2.grad is not None

    wt = torch.randn(E, I, H, requires_grad=True)
    xg = torch.randn(plan.num_rows, H, requires_grad=True)
    mk.grouped_gemm(xg, wt, plan).sum().backward()
    assert torch.equal(wt.grad, torch.zeros_like(wt)) and xg.grad is not None

    hidden = torch.randn(0, H, requires_grad=True)
    w13 = torch.randn(E, 2 * I, H, requires_grad=True)
    w2e = torch.randn(E, H, I, requires_grad=True)
    tw = torch.rand(0, k, requires_grad=True)
    mk.fused_moe(hidden, w13, w2e, tw, ids).sum().backward()
    for g, t in zip(_all_grads(hidden, w13, w2e, tw), (hidden, w13, w2e, tw)):
        assert g is not None and torch.equal(g, torch.zeros_like(t))

    logits = torch.randn(0, E, requires_grad=True)
    wg, idg = mk.topk_gating(logits, k)
    (wg.sum() + mk.load_balancing_loss(logits, idg, E) + mk.router_z_loss(logits)
     + mk.seq_aux_loss(logits.view(0, 3, E), idg.view(0, 3, k))).backward()
    assert logits.grad is not None and logits.grad.shape == (0, E)

    a = torch.randn(plan.num_rows, 3, requires_grad=True)
    mk.grouped_gemm_wgrad(a, xg.detach(), plan).sum().backward()
    assert a.grad is not None

    moe = mk.MoE(H, I, num_experts=E, top_k=k, aux_loss_coef=1e-2, shared_intermediate_size=I)
    out = moe(torch.randn(0, H))
    (out.sum() + moe.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_gradients_every_backend(backend):
    backend_or_skip(backend)
    E, k, H, I = 3, 2, 8, 4
    ids = torch.empty(0, k, dtype=torch.int16)
    hidden = torch.randn(0, H, requires_grad=True)
    w13 = torch.randn(E, 2 * I, H, requires_grad=True)
    w2 = torch.randn(E, H, I, requires_grad=True)
    tw = torch.rand(0, k, requires_grad=True)
    out = mk.fused_moe(hidden, w13, w2, tw, ids, backend=backend)
    assert out.shape == (0, H)
    out.sum().backward()
    for t in (hidden, w13, w2, tw):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    plan = mk.plan_routing(ids, E, block_size=2, backend=backend)
    x = torch.randn(0, H, requires_grad=True)
    w = torch.rand(0, k, requires_grad=True)
    xs, rw = mk.permute(x, plan, topk_weights=w, backend=backend)
    y = mk.unpermute(xs * 2, plan, w, backend=backend)
    (y.sum() + rw.sum()).backward()
    assert x.grad is not None and w.grad is not None
    base = torch.randn(5, H, requires_grad=True)
    la = torch.randn(E, 2, H, requires_grad=True)
    lb = torch.randn(E, 5, 2, requires_grad=True)
    lw = torch.rand(0, k, requires_grad=True)
    mk.lora_moe(x.detach().requires_grad_(), base, la, lb, lw, ids, backend=backend).sum().backward()
    for t in (base, la, lb, lw):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


def test_empty_batch_expert_choice_gradients():
    logits = torch.randn(0, 4, requires_grad=True)
    weights, tokens = mk.expert_choice_gating(logits, 2)
    plan, slot_weights = mk.expert_choice_plan(tokens, weights, 0)
    y = mk.unpermute(torch.randn(plan.num_rows, 3), plan, slot_weights)
    (y.sum() + slot_weights.sum() + weights.sum()).backward()
    assert logits.grad is not None and logits.grad.shape == (0, 4)


@pytest.mark.parametrize("call", ["plan_routing", "fused_moe", "expert_counts", "lora_moe", "load_balancing_loss"])
def test_k_zero_rejected_at_the_first_op(call):
    """topk_ids [T, 0] is a ValueError naming topk_ids, consistently, before anything runs."""
    T, E, H = 3, 4, 8
    ids = torch.empty(T, 0, dtype=torch.int32)
    w = torch.empty(T, 0)
    x = torch.randn(T, H)
    calls = {
        "plan_routing": lambda: mk.plan_routing(ids, E),
        "fused_moe": lambda: mk.fused_moe(x, torch.randn(E, 4, H), torch.randn(E, H, 2), w, ids),
        "expert_counts": lambda: mk.expert_counts(ids, E),
        "lora_moe": lambda: mk.lora_moe(x, torch.randn(5, H), torch.randn(E, 2, H), torch.randn(E, 5, 2), w, ids),
        "load_balancing_loss": lambda: mk.load_balancing_loss(torch.randn(T, E), ids, E),
    }
    with pytest.raises(ValueError, match=r"topk_ids.*k"):
        calls[call]()


def test_compile_with_data_dependent_token_count():
    """fullgraph compile where T comes from tensor data (an unbacked size): the checks guard on nothing."""
    E, k, H = 6, 2, 16
    x, ids, w = torch.randn(9, H), random_ids(9, k, E, drop=0.2), torch.rand(9, k)
    w13, w2 = torch.randn(E, 8, H) / 4, torch.randn(E, H, 4) / 2

    def f(n, x, ids, w):
        m = n.item()
        torch._check(m >= 0)
        torch._check(m <= x.shape[0])
        xm, idm, wm = x[:m], ids[:m], w[:m]
        plan = mk.plan_routing(idm, E, block_size=2, backend="torch")
        y = mk.unpermute(mk.permute(xm, plan, backend="torch"), plan, wm, backend="torch")
        out = mk.fused_moe(xm, w13, w2, wm, idm, backend="torch")
        h = mk.grouped_gemm(mk.permute(xm, plan, backend="torch"), w13, plan, backend="torch")
        dw = mk.grouped_gemm_wgrad(h, mk.permute(xm, plan, backend="torch"), plan, backend="torch")
        loss = mk.load_balancing_loss(xm[:, :E], idm, E)  # (torch.logsumexp itself guards on numel == 0)
        return y, out, mk.expert_counts(idm, E, backend="torch"), h, dw, loss

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        g = torch.compile(f, fullgraph=True, backend="aot_eager")
        for m in (7, 3):
            n = torch.tensor(m)
            got, want = g(n, x, ids, w), f(n, x, ids, w)
            for i, (a, b) in enumerate(zip(got, want)):
                if i == 1:  # fused_moe: the registered op's GEMMs compiled, the CPU path's C kernels eager
                    assert_close("fused_moe", a, b, rms_tol=1e-6)
                else:
                    assert torch.equal(a, b)


def test_compile_dynamic_shapes_two_sizes():
    E, k, H = 5, 2, 8

    def f(x, ids, w):
        plan = mk.plan_routing(ids, E, capacity=3, drop_policy="position", backend="torch")
        return mk.unpermute(mk.permute(x, plan, backend="torch"), plan, w, backend="torch")

    g = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (6, 11):
        x, ids, w = torch.randn(T, H), random_ids(T, k, E), torch.rand(T, k)
        assert torch.equal(g(x, ids, w), f(x, ids, w))


# ----- expert ids: sentinels, -1 and integer dtypes --------------------------------------------------


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_out_of_range_ids_are_dropped_on_every_backend(backend):
    """vLLM / Hugging Face EP sentinels (>= E) and -1 are dropped slots, as if they were -1."""
    backend_or_skip(backend)
    E, k = 6, 3
    ids = random_ids(10, k, E).to(torch.int64)
    sentinel = ids.clone()
    sentinel[0, 0], sentinel[3, 1], sentinel[5, 2], sentinel[7, 0] = E, E + 9, -1, 2**40
    dropped = torch.where((sentinel >= 0) & (sentinel < E), sentinel, -1)
    for kw in (dict(), dict(block_size=4, capacity=3)):
        plans_equal(mk.plan_routing(sentinel, E, backend=backend, **kw), mk.plan_routing(dropped, E, backend="torch", **kw))
    assert torch.equal(mk.expert_counts(sentinel, E), mk.expert_counts(dropped, E))


def test_out_of_range_ids_fused_moe_and_strict_mode(monkeypatch):
    T, E, k, H, I = 7, 4, 2, 16, 8
    x, w = torch.randn(T, H), torch.rand(T, k)
    w13, w2 = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 3
    ids = random_ids(T, k, E).long()
    sentinel = ids.clone()
    sentinel[1, 0], sentinel[4, 1] = E, 1000
    dropped = torch.where(sentinel < E, sentinel, -1)
    assert torch.equal(mk.fused_moe(x, w13, w2, w, sentinel), mk.fused_moe(x, w13, w2, w, dropped))
    # expert_map callers: global ids the map does not cover are dropped too
    emap = torch.tensor([0, -1, 1, -1, 2, 3], dtype=torch.int32)
    g = torch.tensor([[0, 2], [5, 7], [4, -1], [6, 1], [3, 2], [0, 9], [4, 5]])
    want = torch.where(g < 6, g, -1)
    assert torch.equal(mk.fused_moe(x, w13, w2, w, g, expert_map=emap), mk.fused_moe(x, w13, w2, w, want, expert_map=emap))
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")
    for fn in (lambda: mk.plan_routing(sentinel, E), lambda: mk.fused_moe(x, w13, w2, w, sentinel),
               lambda: mk.expert_counts(sentinel, E)):
        with pytest.raises(ValueError, match="topk_ids must hold values"):
            fn()


@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_any_integer_id_dtype(dtype, backend):
    """MegaBlocks routes with int16 ids; int8/uint8 save bandwidth for E <= 127/255."""
    backend_or_skip(backend)
    T, E, k, H, I = 9, 5, 2, 16, 8
    ids64 = random_ids(T, k, E, drop=0.0 if dtype == torch.uint8 else 0.2).long()
    ids = ids64.to(dtype)
    plans_equal(mk.plan_routing(ids, E, block_size=2, capacity=3, backend=backend),
                mk.plan_routing(ids64, E, block_size=2, capacity=3, backend="torch"))
    assert torch.equal(mk.expert_counts(ids, E), mk.expert_counts(ids64, E))
    x, w = torch.randn(T, H), torch.rand(T, k)
    w13, w2 = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 3
    assert_close("fused_moe", mk.fused_moe(x, w13, w2, w, ids, backend=backend),
                 mk.fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids64), rms_tol=1e-5)
    assert_close("lora_moe", mk.lora_moe(x, torch.randn(6, H), torch.randn(E, 2, H), torch.randn(E, 6, 2), w, ids),
                 torch.zeros(T, 6), rms_tol=float("inf"))
    stats = mk.routing_stats(ids, E)
    assert torch.equal(stats.tokens_per_expert, mk.expert_counts(ids64, E))
    emap = torch.tensor([1, -1, 0, 2, -1], dtype=dtype if dtype != torch.uint8 else torch.int16)
    plans_equal(mk.plan_routing(ids, 3, expert_map=emap, backend=backend),
                mk.plan_routing(ids64, 3, expert_map=emap.long(), backend="torch"))


def test_vllm_fused_experts_takes_int16_and_sentinels():
    T, E, k, H, I = 6, 4, 2, 16, 8
    x = torch.randn(T, H)
    w1, w2 = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 3
    w, ids, _ = mkv.fused_topk(x, torch.randn(T, E), k, True, indices_type=torch.int16)
    assert ids.dtype == torch.int16
    sentinel = ids.clone()
    sentinel[2, 1] = E
    out = mkv.fused_experts(x, w1, w2, w, sentinel)
    assert torch.equal(out, mkv.fused_experts(x, w1, w2, w, torch.where(sentinel < E, sentinel, -1).long()))


# ----- capacity drop policies ------------------------------------------------------------------------


def megatron_kept(topk_ids, topk_weights, E, capacity, policy):
    """Megatron's token dropping (``apply_router_token_dropping``) as a [T, k] kept mask: per expert, the
    ``capacity`` routed tokens with the highest probability (``probs``; NaN last) or the first ones
    (``position``); ties to the lower token (the tests draw distinct ids per token, so slots are (token, expert) pairs)."""
    T, k = topk_ids.shape
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    probs = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])
            if 0 <= e < E:
                routing_map[t, e] = True
                probs[t, e] = float(topk_weights[t, j])
    keep = torch.zeros(T, E, dtype=torch.bool)
    for e in range(E):
        tokens = [t for t in range(T) if routing_map[t, e]]
        if policy == "probs":
            tokens = sorted(tokens, key=lambda t: (float("inf") if probs[t, e].isnan() else -float(probs[t, e]), t))
        for t in tokens[:capacity]:
            keep[t, e] = True
    return torch.tensor([[bool(0 <= int(topk_ids[t, j]) < E and keep[t, int(topk_ids[t, j])]) for j in range(k)]
                         for t in range(T)], dtype=torch.bool).view(T, k)


def gshard_kept(topk_ids, E, capacity):
    T, k = topk_ids.shape
    used, kept = [0] * E, torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(topk_ids[t, j])
            if 0 <= e < E and used[e] < capacity:
                used[e] += 1
                kept[t, j] = True
    return kept


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("policy", ["gshard", "position", "probs"])
@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
def test_drop_policies_match_the_peers(backend, policy, capacity):
    backend_or_skip(backend)
    T, E, k = 17, 5, 2
    ids = random_ids(T, k, E, drop=0.1)
    w = torch.rand(T, k)
    ids[3] = torch.tensor([0, 2])
    ids[5] = torch.tensor([1, 0])
    ids[8] = torch.tensor([0, 3])
    w[3, 0] = w[5, 1] = w[8, 0] = 0.5  # a three-way tie at expert 0: the lower slots win
    w[9, 1] = float("nan")  # NaN ranks last
    plan = mk.plan_routing(ids, E, block_size=2, capacity=capacity, drop_policy=policy, topk_weights=w, backend=backend)
    want = gshard_kept(ids, E, capacity) if policy == "gshard" else megatron_kept(ids, w, E, capacity, policy)
    assert torch.equal(plan.slot_to_row.view(T, k) >= 0, want)
    # the kept slots form an ordinary plan: stable by slot within each expert
    plans_equal(plan, mk.plan_routing(torch.where(want, ids, -1), E, block_size=2, backend="torch"))
    assert int(plan.tokens_per_expert.max()) <= capacity


def test_drop_policy_through_fused_moe_and_moe_layer():
    T, E, k, H, I = 12, 4, 2, 16, 8
    x, ids, w = torch.randn(T, H), random_ids(T, k, E), torch.rand(T, k)
    w13, w2 = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 3
    for policy in ("position", "probs"):
        kept = megatron_kept(ids, w, E, 3, policy)
        got = mk.fused_moe(x, w13, w2, w, ids, capacity=3, drop_policy=policy)
        assert torch.equal(got, mk.fused_moe(x, w13, w2, w, torch.where(kept, ids, -1)))
    moe = mk.MoE(H, I, num_experts=E, top_k=k, capacity_factor=0.5, drop_policy="probs")
    out = moe(torch.randn(2, 6, H))
    assert out.shape == (2, 6, H) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="drop_policy"):
        mk.plan_routing(ids, E, capacity=2, drop_policy="random")
    with pytest.raises(ValueError, match="topk_weights"):
        mk.plan_routing(ids, E, capacity=2, drop_policy="probs")
    with pytest.raises(ValueError, match="drop_policy"):
        mk.MoE(H, I, num_experts=E, top_k=k, drop_policy="tokens")


def test_drop_policy_refused_by_the_cuda_plan_with_a_reason():
    ids = random_ids(4, 2, 4)
    with pytest.raises(ValueError, match="drop_policy='position'.*backend 'cuda'"):
        mk.plan_routing(ids, 4, capacity=1, drop_policy="position", backend="cuda")
    mk.plan_routing(ids, 4, capacity=1, drop_policy="position", backend="auto")  # auto falls back


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_drop_policy_with_expert_map(backend):
    backend_or_skip(backend)
    E_global, E = 6, 3
    emap = torch.tensor([-1, 0, 1, -1, 2, -1], dtype=torch.int32)
    g = random_ids(11, 2, E_global)
    local = torch.where(g >= 0, emap.long()[g.long().clamp(min=0)], -1)
    w = torch.rand(11, 2)
    for policy in ("position", "probs"):
        plan = mk.plan_routing(g.to(torch.int16), E, capacity=2, drop_policy=policy, topk_weights=w, expert_map=emap,
                               backend=backend)
        assert torch.equal(plan.slot_to_row.view(11, 2) >= 0, megatron_kept(local, w, E, 2, policy))


# ----- routing maps and num_out_tokens (TransformerEngine) -------------------------------------------


def te_permute_mask(tokens, routing_map, probs):
    """TE's ``moe_permute_with_probs`` for a mask map: rows grouped by expert, by token within one."""
    T, E = routing_map.shape
    sorted_indices = torch.arange(T).expand(E, T).masked_select(routing_map.t())
    return tokens[sorted_indices], probs.t().masked_select(routing_map.t()), sorted_indices


def te_unpermute_mask(rows, sorted_indices, permuted_probs, num_tokens):
    out = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float64)
    return out.index_add_(0, sorted_indices, rows.double() * permuted_probs.double()[:, None])


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_plan_from_routing_map_matches_te(backend):
    backend_or_skip(backend)
    T, E, k, H = 10, 6, 2, 8
    ids = random_ids(T, k, E, drop=0.15)
    routing_map = torch.zeros(T, E, dtype=torch.bool)
    probs = torch.zeros(T, E)
    for t in range(T):
        for j in range(k):
            if ids[t, j] >= 0:
                routing_map[t, ids[t, j]] = True
                probs[t, ids[t, j]] = torch.rand(())
    x = torch.randn(T, H)
    n = int(routing_map.sum())
    plan = mk.plan_routing(routing_map, E, num_out_tokens=n, backend=backend)
    assert plan.num_rows == n and plan.top_k == E
    xs, rw = mk.permute(x, plan, topk_weights=probs, backend=backend)
    te_rows, te_probs, sorted_indices = te_permute_mask(x, routing_map, probs)
    assert torch.equal(xs, te_rows) and torch.equal(rw, te_probs)
    y = torch.randn(n, H)
    assert_close("unpermute", mk.unpermute(y, plan, probs, backend=backend),
                 te_unpermute_mask(y, sorted_indices, te_probs, T), rms_tol=1e-6)
    # the plan of the map equals the plan of the equivalent ids: expert order, token order within one
    plans_equal(mk.plan_routing(routing_map, E), mk.plan_routing(torch.where(routing_map, torch.arange(E), -1), E))
    with pytest.raises(ValueError, match="topk_ids"):
        mk.plan_routing(routing_map[:, :4], E)


def te_permute_index(tokens, indices, num_out_tokens):
    """TE's ``moe_permute`` for an index map: a stable sort of the flat ids, the first ``num_out_tokens`` rows
    kept (the highest experts' rows go first when it is short), zero rows when it is long."""
    T, k = indices.shape
    flat = indices.reshape(-1).long()
    valid = flat >= 0
    order = torch.sort(torch.where(valid, flat, 2**40), stable=True).indices[: int(valid.sum())]
    order = order[:num_out_tokens]
    rows = torch.zeros(num_out_tokens, tokens.shape[1], dtype=tokens.dtype)
    rows[: order.shape[0]] = tokens[order // k]
    row_of_slot = torch.full((T * k,), -1)
    row_of_slot[order] = torch.arange(order.shape[0])
    return rows, row_of_slot


@pytest.mark.parametrize("n_out", [0, 5, 13, 30])
def test_num_out_tokens_truncates_or_pads_as_te(n_out):
    T, E, k, H = 9, 4, 2, 8
    ids = random_ids(T, k, E, drop=0.2)
    x = torch.randn(T, H)
    plan = mk.plan_routing(ids, E, num_out_tokens=n_out)
    rows, row_of_slot = te_permute_index(x, ids, n_out)
    assert plan.num_rows == n_out
    assert torch.equal(mk.permute(x, plan), rows)
    assert torch.equal(plan.slot_to_row.long(), row_of_slot)
    assert int(plan.tokens_per_expert.sum()) == int((row_of_slot >= 0).sum()) == int(plan.expert_offsets[-1])
    w = torch.rand(T, k)
    y = torch.randn(n_out, H)
    want = torch.zeros(T, H, dtype=torch.float64)
    for s, r in enumerate(row_of_slot.tolist()):
        if r >= 0:
            want[s // k] += w[s // k, s % k].double() * y[r].double()
    assert_close("unpermute", mk.unpermute(y, plan, w), want, rms_tol=1e-6)
    h = mk.grouped_gemm(mk.permute(x, plan), torch.randn(E, 5, H), plan)
    assert h.shape == (n_out, 5)
    with pytest.raises(ValueError, match="num_out_tokens"):
        mk.plan_routing(ids, E, num_out_tokens=-1)


# ----- auxiliary losses ------------------------------------------------------------------------------


def test_load_balancing_loss_te_normaliser():
    """TE's ``fused_moe_aux_loss``: ``E * coeff / (k * T^2) * sum_e (sum_t probs[t, e]) * tokens_per_expert[e]``."""
    T, E, k = 11, 6, 2
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    ids = random_ids(T, k, E, drop=0.2)
    probs = torch.softmax(logits, -1)
    tokens_per_expert = torch.stack([(ids == e).sum() for e in range(E)]).double()
    te = E / (k * T * T) * (probs.sum(0) * tokens_per_expert).sum()
    got = mk.load_balancing_loss(logits, ids, E, fraction="all_slots")
    assert_close("aux", got, te, rms_tol=1e-12)
    w, i, stats = mk.topk_gating(logits, k, return_stats=True)
    te2 = E / (k * T * T) * (probs.sum(0) * torch.stack([(i == e).sum() for e in range(E)]).double()).sum()
    assert_close("aux(stats)", mk.load_balancing_loss(stats=stats, fraction="all_slots"), te2, rms_tol=1e-12)
    g1, = torch.autograd.grad(got, logits)
    g2, = torch.autograd.grad(te, logits)
    assert_close("grad", g1, g2, rms_tol=1e-12)
    routed = mk.load_balancing_loss(logits, ids, E)  # default: share of the routed pairs
    assert_close("routed", routed, te * (k * T) / (ids >= 0).sum(), rms_tol=1e-12)
    with pytest.raises(ValueError, match="fraction"):
        mk.load_balancing_loss(logits, ids, E, fraction="tokens")


def deepseek_seq_aux(logits, topk_idx, scoring):
    """DeepSeek-V3 (eqs. 17-20): per sequence, f_i = N_r/(K_r T) sum_t 1(i in topk(t)), P_i = 1/T sum_t s'_{i,t},
    loss = sum_i f_i P_i, averaged over the batch (as DeepSeek's own MoEGate computes ``seq_aux``)."""
    B, S, E = logits.shape
    k = topk_idx.shape[-1]
    scores = {"softmax": lambda x: x.softmax(-1), "sigmoid": torch.sigmoid,
              "sqrtsoftplus": lambda x: torch.nn.functional.softplus(x).sqrt()}[scoring](logits)
    scores = scores / scores.sum(-1, keepdim=True) if scoring != "softmax" else scores
    ce = torch.zeros(B, E, dtype=logits.dtype)
    for b in range(B):
        for t in range(S):
            for j in range(k):
                e = int(topk_idx[b, t, j])
                if 0 <= e < E:
                    ce[b, e] += 1
    ce = ce / (S * k / E)
    return (ce * scores.mean(dim=1)).sum(dim=1).mean()


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax", "sqrtsoftplus"])
def test_seq_aux_loss_matches_deepseek(scoring):
    B, S, E, k = 3, 7, 8, 2
    logits = torch.randn(B, S, E, dtype=torch.float64, requires_grad=True)
    ids = random_ids(B * S, k, E).view(B, S, k)
    ids[1, 2, 0] = -1
    want = deepseek_seq_aux(logits, ids, scoring)
    got = mk.seq_aux_loss(logits, ids, scoring=scoring)
    assert_close("seq_aux", got, want, rms_tol=1e-12)
    assert_close("seq_aux 2-D", mk.seq_aux_loss(logits.reshape(B * S, E), ids.reshape(B * S, k), E, seq_len=S,
                                                scoring=scoring), want, rms_tol=1e-12)
    g1, = torch.autograd.grad(got, logits)
    g2, = torch.autograd.grad(want, logits)
    assert_close("grad", g1, g2, rms_tol=1e-10)
    even = torch.zeros(1, 4, 4, dtype=torch.float64)
    assert_close("even", mk.seq_aux_loss(even, torch.arange(4).view(1, 4, 1)), torch.tensor(1.0, dtype=torch.float64),
                 rms_tol=1e-12)
    with pytest.raises(ValueError, match="seq_len"):
        mk.seq_aux_loss(logits.reshape(B * S, E), ids.reshape(B * S, k))
    with pytest.raises(ValueError, match="topk_ids"):
        mk.seq_aux_loss(logits, ids[:, :, :0])


# ----- vLLM view -------------------------------------------------------------------------------------


def vllm_align_block_size(topk_ids, block_size, num_experts, pad_sorted_ids=False):
    """vLLM's ``moe_align_block_size`` (current kernel): ids >= num_experts skipped, pad value ``numel``,
    ``expert_ids`` of length ``ceil(max_num_tokens_padded / block)`` with -1 for the inactive trailing blocks,
    and the shrink ``min(numel * block, ...)`` when ``numel < num_experts``."""
    numel = topk_ids.numel()
    M = numel + num_experts * (block_size - 1)
    if pad_sorted_ids:
        M = (M + block_size - 1) // block_size * block_size
    if numel < num_experts:
        M = min(numel * block_size, M)
    sorted_ids = torch.full((M,), numel, dtype=torch.int32)
    expert_ids = torch.full(((M + block_size - 1) // block_size,), -1, dtype=torch.int32)
    flat = topk_ids.flatten().tolist()
    pos = blk = 0
    for e in range(num_experts):
        slots = [i for i, v in enumerate(flat) if v == e]
        if not slots:
            continue
        sorted_ids[pos: pos + len(slots)] = torch.tensor(slots, dtype=torch.int32)
        nb = (len(slots) + block_size - 1) // block_size
        expert_ids[blk: blk + nb] = e
        pos += nb * block_size
        blk += nb
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32)


def per_expert_sets(sorted_ids, expert_ids, block_size, valid_length, total):
    groups = {}
    for b in range(valid_length // block_size):
        blk = sorted_ids[b * block_size:(b + 1) * block_size]
        groups.setdefault(int(expert_ids[b]), set()).update(int(v) for v in blk if v < total)
    return groups


@pytest.mark.parametrize("T,k,E,block", [(1, 1, 32, 16), (3, 2, 257, 8), (40, 2, 8, 4), (64, 4, 16, 16), (0, 2, 4, 4)])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_vllm_view_matches_moe_align_block_size(T, k, E, block, pad, backend):
    backend_or_skip(backend)
    ids = random_ids(T, k, E)
    plan = mk.plan_routing(ids, E, block_size=block, backend=backend)
    sorted_ids, expert_ids, n_post = plan.vllm_view(pad_sorted_ids=pad)
    ref_sorted, ref_experts, ref_n = vllm_align_block_size(ids, block, E, pad)
    assert sorted_ids.shape == ref_sorted.shape and sorted_ids.dtype == torch.int32
    assert torch.equal(expert_ids, ref_experts) and torch.equal(n_post, ref_n)
    # within an expert vLLM's order is unspecified (atomics): compare per expert as sets, as vLLM's test does
    got = per_expert_sets(sorted_ids, expert_ids, block, int(n_post), T * k)
    assert got == per_expert_sets(ref_sorted, ref_experts, block, int(ref_n), T * k)
    assert torch.equal(sorted_ids[int(n_post):], ref_sorted[int(ref_n):])
    assert torch.equal(sorted_ids, ref_sorted)  # ours is stable by slot, which vLLM's golden also gives


def test_vllm_view_compiles_without_guards_on_tokens():
    E, block = 8, 4

    def f(ids):
        plan = mk.plan_routing(ids, E, block_size=block, backend="torch")
        return plan.vllm_view(pad_sorted_ids=True) + plan.vllm_permute_view(ids)

    g = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (1, 3, 17):  # T*k < E and T*k >= E
        ids = random_ids(T, 2, E)
        for a, b in zip(g(ids), f(ids)):
            assert torch.equal(a, b)


def test_vllm_view_with_sentinels_and_expert_map():
    """EP: vLLM's ``ignore_invalid_experts`` layout sized by the global expert count."""
    E_global, block = 8, 4
    emap = torch.full((E_global,), -1, dtype=torch.int32)
    emap[0::2] = torch.arange(4, dtype=torch.int32)
    ids = random_ids(12, 2, E_global)
    plan = mk.plan_routing(ids, 4, block_size=block, expert_map=emap)
    sorted_ids, expert_ids, n_post = plan.vllm_view(num_experts=E_global)
    local = torch.where(emap.long()[ids.long()] >= 0, emap.long()[ids.long()], E_global)  # sentinel: skipped
    ref = vllm_align_block_size(local, block, E_global)
    for a, b in zip((sorted_ids, expert_ids, n_post), ref):
        assert torch.equal(a, b)


def vllm_moe_permute(topk_ids, n_expert, expert_map):
    """vLLM's ``moe_permute`` index maps (its test's ``torch_permute``, with a general expert_map): local slots
    sorted by local expert, the others after them by global expert (+ n_expert), stable by slot."""
    T, k = topk_ids.shape
    g = topk_ids.long()
    local = expert_map.long()[g]
    key = torch.where(local >= 0, local, g + n_expert)
    order = torch.sort(key.flatten(), stable=True).indices
    n_local = int((local >= 0).sum())
    inv = torch.empty(T * k, dtype=torch.int64)
    inv[order] = torch.arange(T * k)
    n_local_experts = int(expert_map.max()) + 1
    offsets = torch.zeros(n_local_experts + 1, dtype=torch.int64)
    for e in range(n_local_experts):
        offsets[e + 1] = offsets[e] + int((local == e).sum())
    permuted_idx = order.clone()
    permuted_idx[n_local:] = T * k
    return offsets, inv.to(torch.int32), permuted_idx.to(torch.int32)


def test_vllm_permute_view_inverse_map_in_ep():
    E_global = 8
    emap = torch.tensor([-1, -1, 0, 1, 2, -1, -1, -1], dtype=torch.int32)  # rank 1 of 3-ish uneven shards
    ids = random_ids(13, 3, E_global)
    plan = mk.plan_routing(ids, 3, expert_map=emap)
    offsets, inv, permuted_idx = plan.vllm_permute_view(ids)
    ref_offsets, ref_inv, ref_perm = vllm_moe_permute(ids, E_global, emap)
    assert torch.equal(offsets, ref_offsets) and torch.equal(inv, ref_inv) and torch.equal(permuted_idx, ref_perm)
    # without ids, the other ranks' slots still land at or past expert_first_token_offset[-1], each once
    _, inv2, _ = plan.vllm_permute_view()
    out = inv2[plan.slot_to_row < 0]
    assert bool((out >= offsets[-1]).all()) and out.unique().numel() == out.numel()


# ----- vLLM routing entry points ---------------------------------------------------------------------


def vllm_grouped_topk(gating_output, topk, renormalize, num_expert_group, topk_group, scoring_func,
                      routed_scaling_factor, e_score_correction_bias):
    """vLLM's ``grouped_topk`` torch implementation (ties: lower index, as our kernels and a stable sort)."""
    scores = gating_output.softmax(-1) if scoring_func == "softmax" else gating_output.sigmoid()
    T, E = scores.shape
    original = scores
    if e_score_correction_bias is not None:
        scores = scores + e_score_correction_bias
        group_scores = scores.view(T, num_expert_group, -1).topk(2, dim=-1)[0].sum(-1)
    else:
        group_scores = scores.view(T, num_expert_group, -1).max(dim=-1).values
    group_idx = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, num_expert_group, E // num_expert_group).reshape(T, -1)
    tmp = scores.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.sort(tmp, dim=-1, descending=True, stable=True).indices[:, :topk]
    w = original.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return (w * routed_scaling_factor).float(), ids.int()


@pytest.mark.parametrize("scoring,bias", [("softmax", False), ("sigmoid", True)])
def test_vllm_grouped_topk(scoring, bias):
    T, E, G, TG, k = 9, 16, 4, 2, 4
    x = torch.randn(T, 8)
    logits = torch.randn(T, E, dtype=torch.float64)
    b = torch.randn(E, dtype=torch.float64) / 10 if bias else None
    w, ids = mkv.grouped_topk(x, logits, k, True, num_expert_group=G, topk_group=TG, scoring_func=scoring,
                              routed_scaling_factor=2.5, e_score_correction_bias=b)
    rw, rids = vllm_grouped_topk(logits, k, True, G, TG, scoring, 2.5, b)
    assert torch.equal(ids, rids)
    assert_close("weights", w, rw.double(), rms_tol=1e-6)


def test_vllm_fused_topk_bias_both_signatures():
    """``(hs, logits, bias, topk, renormalize[, scoring_func, indices_type])`` and newer vLLM's
    ``(hs, logits, scoring_func, bias, topk, renormalize, indices_type)``."""
    T, E, k = 7, 12, 3
    x, logits, b = torch.randn(T, 8), torch.randn(T, E), torch.randn(E) / 5
    scores = logits.sigmoid()
    ids_ref = torch.sort(scores + b, dim=-1, descending=True, stable=True).indices[:, :k]
    w_ref = scores.gather(1, ids_ref)
    w_ref = w_ref / w_ref.sum(-1, keepdim=True)
    w, ids = mkv.fused_topk_bias(x, logits, b, k, True, "sigmoid")
    assert torch.equal(ids.long(), ids_ref) and ids.dtype == torch.int32
    assert_close("weights", w, w_ref.double(), rms_tol=1e-6)
    w2, ids2, tei = mkv.fused_topk_bias(x, logits, "sigmoid", b, k, True, torch.int64)
    assert torch.equal(ids2, ids_ref) and torch.equal(w2, w)
    assert torch.equal(tei, torch.arange(k)[None, :].int() * T + torch.arange(T)[:, None].int())


# ----- ragged-K GEMM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grouped_gemm_wgrad_public(backend):
    backend_or_skip(backend)
    T, E, k, A, B = 11, 5, 2, 6, 7
    ids = random_ids(T, k, E)
    ids[ids == 3] = 1  # expert 3 has no rows
    plan = mk.plan_routing(ids, E, block_size=4)
    a = torch.randn(plan.num_rows, A, requires_grad=True)
    b = torch.randn(plan.num_rows, B, requires_grad=True)
    out = mk.grouped_gemm_wgrad(a, b, plan, backend=backend)
    want = torch.zeros(E, A, B, dtype=torch.float64)
    offs = plan.expert_offsets.tolist()
    for e in range(E):
        for r in range(offs[e], offs[e + 1]):
            if plan.sorted_slots[r] >= 0:  # padding rows do not count
                want[e] += a[r].double()[:, None] * b[r].double()[None, :]
    assert_close("wgrad", out, want, rms_tol=1e-5)
    # with offsets only, every row of a segment counts
    raw = mk.grouped_gemm_wgrad(a, b, plan.expert_offsets, backend=backend)
    want_raw = torch.stack([a[offs[e]:offs[e + 1]].double().t() @ b[offs[e]:offs[e + 1]].double() for e in range(E)])
    assert_close("wgrad(offsets)", raw, want_raw, rms_tol=1e-5)
    # it is the weight gradient of grouped_gemm, and differentiable itself
    g = torch.randn(E, A, B)
    ga, gb = torch.autograd.grad((out * g).sum(), (a, b))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = torch.zeros(E, A, B, dtype=torch.float64)
    mask = (plan.sorted_slots >= 0).double()[:, None]
    for e in range(E):
        ref[e] = (a64[offs[e]:offs[e + 1]] * mask[offs[e]:offs[e + 1]]).t() @ b64[offs[e]:offs[e + 1]]
    ra, rb = torch.autograd.grad((ref * g.double()).sum(), (a64, b64))
    assert_close("da", ga, ra, rms_tol=1e-5)
    assert_close("db", gb, rb, rms_tol=1e-5)
    with pytest.raises(ValueError, match="b"):
        mk.grouped_gemm_wgrad(a, b[:-1], plan)
    with pytest.raises(TypeError, match="b"):
        mk.grouped_gemm_wgrad(a, b.double(), plan)
    with pytest.raises(ValueError, match="a"):
        mk.grouped_gemm_wgrad(a[:-1], b[:-1], plan)


def test_grouped_gemm_wgrad_opcheck():
    plan = mk.plan_routing(random_ids(6, 2, 3), 3, block_size=2)
    a, b = torch.randn(plan.num_rows, 4), torch.randn(plan.num_rows, 5)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_gemm_wgrad.default, (a, b, plan.expert_offsets, plan.sorted_slots))
    torch.library.opcheck(torch.ops.moe_kernels.capacity_drop.default,
                          (random_ids(6, 2, 3), 3, 2, "probs", torch.rand(6, 2), None))
