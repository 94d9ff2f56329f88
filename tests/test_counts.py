"""What the fused MoE paths run, counted on CPU (interpreter launches, computing torch ops, tl.dot FLOPs):
the goals of the speed design pinned as tests. Counts are of the registered op, which is what runs on a
GPU (the public function's value checks run on CPU tensors only)."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.triton_kernels import plan as plan_kernels
from moe_kernels.triton_kernels import schedule

from counting import count_device_ops

if not mk.backends()["triton"].available or torch.cuda.is_available():
    pytest.skip("counts run the triton kernels in the interpreter", allow_module_level=True)

OP = torch.ops.moe_kernels.fused_moe_triton.default


def inputs(T, H, I, E, k, ids=None, bias=False):
    x = torch.randn(T, H)
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    w, top = mk.topk_gating(torch.randn(T, E), k, backend="torch")
    b13 = torch.randn(E, 2 * I) if bias else None
    b2 = torch.randn(E, H) if bias else None
    return x, w13, w2, w, (top if ids is None else ids), b13, b2


def test_decode_forward_in_six_device_ops():
    """plan (histogram, scan, rank + tile schedule), GEMM1, GEMM2, combine; no torch glue (was 52)."""
    x, w13, w2, w, ids, _, _ = inputs(4, 64, 32, 8, 2)
    OP(x, w13, w2, w, ids, "silu", True, None, None, False, None, None, False, False)  # compile nothing twice
    with count_device_ops() as c:
        OP(x, w13, w2, w, ids, "silu", True, None, None, False, None, None, False, False)
    assert c.torch_ops == [], c.torch_ops
    assert c.device_ops <= 6, c.launches
    assert c.launches.count("grouped_gemm_kernel") == 2


@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("on_input,bias", [(False, True), (True, False)])
def test_backward_ops_and_gemm_flops(save, on_input, bias):
    """Backward: <= 20 device ops (was 127), none of them a torch op (no elementwise pass over [P, *]);
    tl.dot FLOPs 4.0 F1 with the recompute, 3.0 F1 with the saved pre-activation (was 4.5), F1 = 2 S H 2I.
    Shapes where every tile is full, so the FLOPs counted are the useful ones."""
    T, H, I, E, k = 32, 64, 32, 2, 2
    ids = torch.tensor([[0, 1]] * T, dtype=torch.int32)  # 32 rows per expert: whole 32-row tiles
    x, w13, w2, w, ids, b13, b2 = inputs(T, H, I, E, k, ids, bias)
    leaves = [t.requires_grad_() for t in (x, w13, w2, w) + ((b13, b2) if bias else ())]
    b13, b2 = (leaves[4], leaves[5]) if bias else (None, None)
    with count_device_ops() as fwd:
        out = mk.fused_moe(*leaves[:4], ids, w13_bias=b13, w2_bias=b2, apply_router_weight_on_input=on_input,
                           save_preactivation=save, backend="triton")
    g = torch.randn_like(out)
    with count_device_ops() as c:
        out.backward(g)
    F1 = 2 * T * k * H * 2 * I
    assert fwd.dot_flops == 1.5 * F1
    assert c.torch_ops == [], c.torch_ops
    # plan (3), [GEMM1 recompute], dA, dX, combine, dW13, dW2: far under the goal of 20
    assert c.device_ops <= (8 if save else 9), c.launches
    assert c.dot_flops == (3.0 if save else 4.0) * F1
    assert "permute_kernel" not in c.launches  # rows gathered through the plan, no permuted copies


def test_max_tiles_bound_is_tight_at_small_batches():
    assert schedule.max_tiles(16 * 8, 256, 16) == 128  # DeepSeek-V3 decode: was cdiv(P, 16) + E + 1 = 265
    assert schedule.max_tiles(4 * 2, 8, 16) == 8
    assert schedule.max_tiles(16384 * 8, 256, 128) == 256 + (131072 - 256 + 127) // 128


def _expected_schedule(offsets, P, tile_m):
    E = len(offsets) - 1
    segs = [(offsets[e], offsets[e + 1]) for e in range(E)] + [(offsets[E], P)]
    seg, row = [], []
    for s, (lo, hi) in enumerate(segs):
        for r in range(lo, hi, tile_m):
            seg.append(s)
            row.append(r)
    return seg, row


@pytest.mark.parametrize("sizes,tail,tile_m", [([3, 0, 17, 1, 0, 70], 5, 16), ([0, 0, 0], 4, 16), ([40], 0, 32),
                                               ([1] * 37, 3, 16), ([0] * 300 + [9], 0, 16)])
def test_tile_schedule_kernel(sizes, tail, tile_m):
    offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
    P = offsets[-1] + tail
    empty = lambda shape, dtype, device: torch.full(shape, 0x5A5A, dtype=dtype, device=device)  # noqa: E731
    sched = schedule.tile_schedule(torch.tensor(offsets, dtype=torch.int32), P, tile_m, empty=empty)
    seg, row = _expected_schedule(offsets, P, tile_m)
    n = int(sched.num_tiles)
    assert n == len(seg) <= sched.max_tiles
    assert sched.tile_segment[:n].tolist() == seg and sched.tile_row[:n].tolist() == row


@pytest.mark.parametrize("T,E,k,cap,bs", [(4, 8, 2, None, 1), (37, 5, 3, 6, 1), (50, 33, 4, None, 16), (200, 3, 2, None, 1)])
def test_plan_writes_the_schedule(T, E, k, cap, bs):
    """The plan's rank pass writes the same schedule the standalone kernel builds from its offsets."""
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    ids.view(-1)[::5] = -1
    empty = lambda shape, dtype, device: torch.full(shape, 0x5A5A, dtype=dtype, device=device)  # noqa: E731
    slots, offsets, counts, s2r, sched = plan_kernels.plan_schedule(ids, E, bs, cap, None, 16, empty=empty)
    ref = mk.plan_routing(ids, E, block_size=bs, capacity=cap, backend="torch")
    assert torch.equal(slots, ref.sorted_slots) and torch.equal(offsets, ref.expert_offsets)
    seg, row = _expected_schedule(offsets.tolist(), slots.shape[0], 16)
    n = int(sched.num_tiles)
    assert n == len(seg) <= sched.max_tiles
    assert sched.tile_segment[:n].tolist() == seg and sched.tile_row[:n].tolist() == row


def test_account_model_of_the_fused_paths():
    """bench's account (a model): launch counts and GEMM FLOPs of each path, and the GROUP_M tile order
    reading far fewer HBM bytes than the m-tile-fastest order for Mixtral's second GEMM at prefill."""
    from bench import costs
    from bench.shapes import select_shapes

    s = select_shapes(["mixtral-8x7b"], "cuda", False, [1024])[0][0]
    F1 = 2 * s.T * s.k * s.H * s.I2
    for path, launches, f1 in (("fwd", 6, 1.5), ("bwd", 9, 4.0), ("bwd_saved", 8, 3.0)):
        acc = costs.fused_account(s, path)
        assert len(acc) == launches and sum(r["flops"] for r in acc) == f1 * F1
        assert costs.roofline_ms(acc) > 0
    rows_e = [4096] * 8  # Mixtral GEMM2 at T=16384 (k=2): [4096, 14336] x [4096, 14336]^T per expert, bf16
    grouped = costs.gemm_hbm_bytes(rows_e, 4096, 14336, 128, 256, 2, group_m=9)
    m_fastest = costs.gemm_hbm_bytes(rows_e, 4096, 14336, 128, 256, 2, group_m=0)
    assert grouped * 2 < m_fastest  # model: 6.2 GB vs 16.2 GB (minimum about 2.2 GB)
