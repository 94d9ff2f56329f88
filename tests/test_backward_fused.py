"""The triton fused MoE training backward (dA GEMM with the activation backward and router-weight dots in
its epilogue, dX through the transposed weight, gathered dW kernels with the bias gradients) against the
float64 torch reference: every activation, bias, capacity, expert_map, router weight on the input, and
both memory modes (recompute, ``save_preactivation``). fp32 under the interpreter; bf16 too on a GPU."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _alloc
from moe_kernels.testing import assert_close
from moe_kernels.triton_kernels import grouped_gemm as gg
from moe_kernels.triton_kernels import schedule

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not mk.backends()["triton"].available:
    pytest.skip("no triton backend here", allow_module_level=True)
NAMES = ("hidden", "w13", "w2", "topk_weights", "w13_bias", "w2_bias")


def grads(backend, dtype, tensors, ids, g, **kw):
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    out = mk.fused_moe(leaves[0], leaves[1], leaves[2], leaves[3], ids, w13_bias=leaves[4], w2_bias=leaves[5],
                       backend=backend, **kw)
    out.backward(g.to(dtype))
    return out, [None if t is None else t.grad for t in leaves]


CASES = [  # activation, gated, bias, on_input, capacity, expert_map (, gate_up_interleaved)
    ("silu", True, True, False, None, False),
    ("swiglu_oai", True, True, False, None, "interleaved"),  # gpt-oss: gate and up rows alternate
    ("gelu", True, False, True, None, False),
    ("relu", True, True, False, 3, False),
    ("swiglu_oai", True, True, False, None, True),
    ("silu", False, True, True, None, False),
    ("gelu", False, False, False, 2, True),
    ("relu", False, True, False, None, False),
]


@pytest.mark.parametrize("activation,gated,bias,on_input,capacity,use_map", CASES)
def test_fused_backward_matches_float64(activation, gated, bias, on_input, capacity, use_map):
    T, H, I, E, k = 13, 32, 24, 5, 2
    x = torch.randn(T, H, device=DEV) * (3 if activation == "swiglu_oai" else 1)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, device=DEV) / H**0.5
    w2 = torch.randn(E, H, I, device=DEV) / I**0.5
    w, ids = mk.topk_gating(torch.randn(T, E + 2 if use_map is True else E, device=DEV), k, backend="torch")
    ids[0, 1] = -1  # a dropped slot
    kw = dict(activation=activation, gated=gated, apply_router_weight_on_input=on_input, capacity=capacity)
    if use_map == "interleaved":
        kw["gate_up_interleaved"], use_map = True, False
    if use_map:  # 7 global experts, 5 here (global 2 and 5 live elsewhere)
        kw["expert_map"] = torch.tensor([0, 1, -1, 2, 3, -1, 4], dtype=torch.int32, device=DEV)
    b13 = torch.randn(E, w13.shape[1], device=DEV) if bias else None
    b2 = torch.randn(E, H, device=DEV) if bias else None
    tensors = (x, w13, w2, w, b13, b2)
    g = torch.randn(T, H, device=DEV)
    ref_out, expected = grads("torch", torch.float64, tensors, ids, g, **kw)
    for save in (False, True):
        out, got = grads("triton", torch.float32, tensors, ids, g, save_preactivation=save, **kw)
        assert_close("out", out, ref_out, rms_tol=1e-5)
        for name, a, e in zip(NAMES, got, expected):
            if e is not None:
                assert_close(f"grad {name} (save_preactivation={save})", a, e, rms_tol=1e-5)


def test_fused_backward_deterministic_and_empty_batch():
    T, H, I, E, k = 9, 32, 16, 4, 3
    x, g = torch.randn(T, H, device=DEV), torch.randn(T, H, device=DEV)
    w13, w2 = torch.randn(E, 2 * I, H, device=DEV) / 6, torch.randn(E, H, I, device=DEV) / 4
    w, ids = mk.topk_gating(torch.randn(T, E, device=DEV), k, backend="torch")
    first = grads("triton", torch.float32, (x, w13, w2, w, None, None), ids, g)[1]
    again = grads("triton", torch.float32, (x, w13, w2, w, None, None), ids, g)[1]
    assert all(torch.equal(a, b) for a, b in zip(first[:4], again[:4]))
    out, empty = grads("triton", torch.float32, (x[:0], w13, w2, w[:0], None, None), ids[:0], g[:0])
    assert out.shape == (0, H) and (empty[1] == 0).all() and (empty[2] == 0).all() and empty[3].shape == (0, k)


@pytest.mark.parametrize("group_m,persistent", [(1, False), (3, False), (8, True), (2, True)])
def test_gemm_tile_orders_agree(group_m, persistent):
    """Every tile order (GROUP_M) and the persistent variant write the same result, with the last real tile
    inside a group and experts with no rows."""
    sizes = [3, 0, 40, 1, 0, 70, 0]
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    P, K, N = sum(sizes) + 5, 48, 80
    x = torch.randn(P, K, device=DEV)
    w = torch.randn(len(sizes), N, K, device=DEV) / K**0.5
    empty = lambda shape, dtype, device: _alloc.empty(*shape, dtype=dtype, device=device)  # noqa: E731  (poisoned)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, GROUP_M=group_m, PERSISTENT=persistent,
               NUM_PROGS=3)
    y = gg.grouped_gemm(x, w, offsets, None, None, True, config=cfg, empty=empty)
    expected = mk.grouped_gemm(x.double(), w.double(), offsets, backend="torch")
    assert_close("y", y, expected, rms_tol=1e-5)


@pytest.mark.parametrize("gather,scale,bias,progs", [(False, False, True, 1), (True, True, True, 3), (True, False, False, 64)])
def test_wgrad_gathered_persistent(gather, scale, bias, progs):
    """dW with the b rows gathered through the plan (and scaled by the routing weight), bias sums from the
    same pass, persistent over (expert, tile) with any number of programs."""
    T, k, E, A, B = 30, 2, 6, 40, 24
    ids = torch.randint(0, E, (T, k), dtype=torch.int32, device=DEV)
    ids[:, 0] = torch.where(ids[:, 0] == 1, 0, ids[:, 0])  # expert 1 gets few rows, maybe none
    plan = mk.plan_routing(ids, E, block_size=4, backend="torch")  # padding rows must not count
    rw = torch.rand(T * k, device=DEV)
    a = torch.randn(plan.num_rows, A, device=DEV)
    tok = torch.randn(T, B, device=DEV)
    slots = plan.sorted_slots
    live = (slots >= 0)[:, None]
    rows_b = torch.where(live, tok[(slots.clamp(min=0) // k).long()], 0.0) if gather else torch.randn(plan.num_rows, B, device=DEV)
    if scale:
        rows_b = rows_b * torch.where(slots >= 0, rw[slots.clamp(min=0).long()], 0.0)[:, None]
    empty = lambda shape, dtype, device: _alloc.empty(*shape, dtype=dtype, device=device)  # noqa: E731  (poisoned)
    cfg = dict(BLOCK_A=32, BLOCK_B=16, BLOCK_M=16, num_warps=4, num_stages=2, NUM_PROGS=progs)
    out = gg.grouped_wgrad(a, tok if gather else rows_b, plan.expert_offsets, slots, gather_top_k=k, gather_b=gather,
                           row_weights=rw, scale_b=scale, bias_a=bias, config=cfg, empty=empty)
    dw, db = out if bias else (out, None)
    a_live = torch.where(live, a, 0.0).double()
    bounds = list(zip(plan.expert_offsets[:-1].tolist(), plan.expert_offsets[1:].tolist()))
    expected = torch.stack([a_live[lo:hi].t() @ rows_b.double()[lo:hi] for lo, hi in bounds])
    assert_close("dW", dw, expected, rms_tol=1e-5)
    if bias:
        assert_close("bias grad", db, torch.stack([a_live[lo:hi].sum(0) for lo, hi in bounds]), rms_tol=1e-5)


def test_schedule_bound_covers_every_tile():
    """The bound from shapes holds for the worst distributions (one row per expert, all rows in one)."""
    for P, E, tm in ((128, 256, 16), (1000, 7, 64), (5, 1, 16), (300, 300, 16)):
        for sizes in ([1] * min(E, P) + [0] * (E - min(E, P)), [P] + [0] * (E - 1)):
            sizes = sizes[:E]
            sizes[0] += P - sum(sizes)
            tiles = sum((s + tm - 1) // tm for s in sizes)
            assert tiles <= schedule.max_tiles(P, E, tm), (P, E, tm, sizes)
