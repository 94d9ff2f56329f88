"""The fast permute / unpermute kernels against the float64 reference, forward and backward."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, tolerance

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in ("triton", "cuda") if mk.backends()[b].available]
if not FAST:
    pytest.skip("no fast permutation backend here", allow_module_level=True)


def routed(T, k, E, *, block_size=1, capacity=None, drop_every=0):
    ids = torch.randint(0, E, (T, k), device=DEV)
    if E > 2:
        ids = torch.where(ids == 1, 2, ids)  # expert 1 gets no tokens
    if drop_every:
        ids.view(-1)[::drop_every] = -1
    return mk.plan_routing(ids, E, block_size=block_size, capacity=capacity)


def implemented(backend, op):
    return backend in mk._backends._IMPLS.get(op, {})


CASES = [(0, 2, 4, 1, None), (1, 1, 1, 1, None), (7, 2, 8, 16, None), (37, 8, 60, 1, None), (50, 2, 257, 1, None),
         (33, 3, 5, 64, 4), (20, 4, 8, 1, 0)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T,k,E,block,capacity", CASES)
@pytest.mark.parametrize("dtype,H", [(torch.float32, 111), (torch.float16, 64), (torch.bfloat16, 40)])
def test_permute_unpermute_match_reference(backend, T, k, E, block, capacity, dtype, H):
    if not implemented(backend, "permute"):
        pytest.skip(f"{backend} has no permute")
    plan = routed(T, k, E, block_size=block, capacity=capacity, drop_every=5)
    x = torch.randn(T, H, device=DEV).to(dtype)
    xs = mk.permute(x, plan, backend=backend)
    assert xs.dtype == dtype and xs.shape == (plan.num_rows, H)
    assert torch.equal(xs.cpu(), mk.permute(x.double(), plan, backend="torch").to(dtype).cpu()), "a gather is exact"
    y_sorted = torch.randn(plan.num_rows, H + 3, device=DEV).to(dtype)
    w = torch.rand(T, k, device=DEV)
    for weights in (None, w):
        y = mk.unpermute(y_sorted, plan, weights, backend=backend)
        ref = mk.unpermute(y_sorted.double(), plan, None if weights is None else weights.double(), backend="torch")
        assert y.dtype == dtype
        assert_close("unpermute", y, ref, rms_tol=tolerance(dtype))


@pytest.mark.parametrize("backend", FAST)
def test_permute_unpermute_gradients(backend):
    if not implemented(backend, "permute"):
        pytest.skip(f"{backend} has no permute")
    T, k, E, H = 19, 3, 6, 24
    plan = routed(T, k, E, block_size=4, drop_every=7)
    x = torch.randn(T, H, device=DEV, requires_grad=True)
    y_sorted = torch.randn(plan.num_rows, H, device=DEV, requires_grad=True)
    w = torch.rand(T, k, device=DEV, requires_grad=True)
    g_perm = torch.randn(plan.num_rows, H, device=DEV)
    g_un = torch.randn(T, H, device=DEV)

    def grads(be, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, y_sorted, w)]
        a = mk.permute(leaves[0], plan, backend=be)
        b = mk.unpermute(leaves[1], plan, leaves[2], backend=be)
        torch.autograd.backward([a, b], [g_perm.to(dtype), g_un.to(dtype)])
        return [t.grad for t in leaves]

    for name, got, exp in zip(("x", "y_sorted", "topk_weights"), grads(backend, torch.float32), grads("torch", torch.float64)):
        assert_close(f"grad {name}", got, exp, rms_tol=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_unpermute_deterministic_and_batch_invariant(backend):
    if not implemented(backend, "unpermute"):
        pytest.skip(f"{backend} has no unpermute")
    T, k, E, H = 40, 4, 8, 32
    ids = torch.randint(0, E, (T, k), device=DEV)
    w = torch.rand(T, k, device=DEV)
    x = torch.randn(T, H, device=DEV)
    plan = mk.plan_routing(ids, E)
    y1 = mk.unpermute(mk.permute(x, plan, backend=backend) * 1.7, plan, w, backend=backend)
    y2 = mk.unpermute(mk.permute(x, plan, backend=backend) * 1.7, plan, w, backend=backend)
    assert torch.equal(y1, y2)
    half = mk.plan_routing(ids[:13], E)
    y_half = mk.unpermute(mk.permute(x[:13], half, backend=backend) * 1.7, half, w[:13], backend=backend)
    assert torch.equal(y_half, y1[:13]), "a token's result must not depend on the rest of the batch"


@pytest.mark.parametrize("backend", FAST)
def test_permute_expert_choice_plan(backend):
    if not implemented(backend, "permute"):
        pytest.skip(f"{backend} has no permute")
    logits = torch.randn(21, 6, device=DEV)
    weights, tokens = mk.expert_choice_gating(logits, 5, backend="torch")
    plan, slot_w = mk.expert_choice_plan(tokens, weights, 21)
    x = torch.randn(21, 16, device=DEV)
    xs = mk.permute(x, plan, backend=backend)
    assert torch.equal(xs, mk.permute(x, plan, backend="torch"))
    y = mk.unpermute(xs, plan, slot_w, backend=backend)
    assert_close("expert-choice combine", y, mk.unpermute(xs.double(), plan, slot_w.double(), backend="torch"), rms_tol=1e-6)


def assert_same_plan(a, b):
    for f in ("sorted_slots", "expert_offsets", "tokens_per_expert", "slot_to_row"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == torch.int32 and x.shape == y.shape, f
        assert torch.equal(x.cpu(), y.cpu()), f"{f}: {x.tolist()} != {y.tolist()}"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T,k,E,block,capacity", [
    (0, 2, 4, 1, None), (1, 1, 1, 1, None), (7, 2, 8, 16, None), (300, 8, 60, 1, None), (50, 2, 257, 64, None),
    (133, 3, 5, 128, 4), (20, 4, 8, 1, 0), (129, 2, 3, 1, 70), (1000, 8, 64, 16, 100), (40, 8, 1024, 1, None)])
@pytest.mark.parametrize("drops", [False, True])
def test_plan_routing_matches_reference(backend, T, k, E, block, capacity, drops):
    if not implemented(backend, "plan_routing"):
        pytest.skip(f"{backend} has no plan_routing")
    ids = torch.randint(0, E, (T, k), device=DEV, dtype=torch.int32)
    if E > 2:
        ids = torch.where(ids == 1, 2, ids)  # an expert with no tokens
    if drops:
        ids.view(-1)[::3] = -1
    got = mk.plan_routing(ids, E, block_size=block, capacity=capacity, backend=backend)
    assert_same_plan(got, mk.plan_routing(ids, E, block_size=block, capacity=capacity, backend="torch"))


@pytest.mark.parametrize("backend", FAST)
def test_plan_routing_expert_map_and_int64(backend):
    if not implemented(backend, "plan_routing"):
        pytest.skip(f"{backend} has no plan_routing")
    emap = torch.full((16,), -1, dtype=torch.int32, device=DEV)
    emap[3], emap[7], emap[8], emap[15] = 0, 1, 2, 3
    ids = torch.randint(-1, 16, (77, 4), device=DEV)  # int64 with -1 entries
    for cap in (None, 5):
        got = mk.plan_routing(ids, 4, block_size=8, capacity=cap, expert_map=emap, backend=backend)
        assert_same_plan(got, mk.plan_routing(ids, 4, block_size=8, capacity=cap, expert_map=emap, backend="torch"))
    empty_map = torch.empty(0, dtype=torch.int32, device=DEV)
    got = mk.plan_routing(torch.full((3, 2), -1, device=DEV), 2, expert_map=empty_map, backend=backend)
    assert (got.slot_to_row == -1).all() and (got.sorted_slots == -1).all()


def test_vllm_view():
    ids = torch.tensor([[2, 0], [2, 2], [0, 3]])
    plan = mk.plan_routing(ids, 4, block_size=4)
    sorted_ids, expert_ids, used = plan.vllm_view()
    assert used.tolist() == [12]  # experts 0, 2, 3 hold 2, 3, 1 rows, each padded to 4
    assert expert_ids.tolist()[:3] == [0, 2, 3] and all(e == -1 for e in expert_ids.tolist()[3:])
    assert sorted_ids.tolist()[:4] == [1, 4, 6, 6] and sorted_ids.tolist()[4:8] == [0, 2, 3, 6]
    assert sorted_ids.shape[0] == 6 + 4 * 3
