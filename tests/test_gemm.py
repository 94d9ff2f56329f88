import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, tolerance

import naive


def ragged_offsets(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)


SEGMENTS = {
    "ragged": [3, 0, 5, 1, 0, 7],
    "one_huge": [0, 0, 40, 0, 1, 0],
    "all_empty": [0, 0, 0],
    "single": [9],
}


@pytest.mark.parametrize("segments", list(SEGMENTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("K,N", [(16, 32), (111, 37)])
def test_grouped_gemm_matches_naive(device, segments, dtype, layout, K, N):
    sizes = SEGMENTS[segments]
    E, used = len(sizes), sum(sizes)
    P = used + 3  # trailing rows outside every segment must come out zero
    x = torch.randn(P, K, dtype=dtype, device=device)
    w = torch.randn(E, N, K, dtype=dtype, device=device) / K**0.5
    bias = torch.randn(E, N, dtype=dtype, device=device)
    wl = w if layout == "nk" else w.transpose(1, 2).contiguous()
    offsets = ragged_offsets(sizes).to(device)
    y = mk.grouped_gemm(x, wl, offsets, bias=bias, weight_layout=layout)
    expected = naive.grouped_gemm(x.cpu(), w.cpu(), offsets.cpu(), bias.cpu())
    assert y.dtype == dtype and y.shape == (P, N)
    assert_close("y", y, expected, rms_tol=tolerance(dtype))
    assert (y[used:] == 0).all()


def test_grouped_gemm_plan_padding_rows_zero(device):
    T, k, E, K, N = 11, 2, 5, 24, 40
    ids = torch.randint(0, E, (T, k), device=device)
    ids[:, :] = torch.where(ids == 3, 4, ids)  # expert 3 gets no tokens
    plan = mk.plan_routing(ids, E, block_size=4)
    x = torch.randn(T, K, device=device, dtype=torch.float64)
    xs = mk.permute(x, plan)
    w = torch.randn(E, N, K, device=device, dtype=torch.float64)
    b = torch.randn(E, N, device=device, dtype=torch.float64)
    y = mk.grouped_gemm(xs, w, plan, bias=b)
    pad = plan.sorted_slots < 0
    assert pad.any()
    assert (y[pad] == 0).all(), "padding rows must be zero even with a bias"
    expected = naive.grouped_gemm(xs.cpu(), w.cpu(), plan.expert_offsets.cpu(), b.cpu())
    expected[pad.cpu()] = 0
    assert_close("y", y, expected, rms_tol=1e-12)


def test_grouped_gemm_noncontiguous_weight(device):
    sizes = [4, 0, 6]
    x = torch.randn(10, 20, device=device)
    w_kn = torch.randn(3, 20, 12, device=device)
    w_nk_view = w_kn.transpose(1, 2)  # [E, N, K], not contiguous
    offsets = ragged_offsets(sizes).to(device)
    y = mk.grouped_gemm(x, w_nk_view, offsets)
    assert_close("y", y, naive.grouped_gemm(x.cpu(), w_nk_view.cpu(), offsets.cpu()), rms_tol=1e-5)


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_grouped_gemm_gradcheck(layout):
    sizes = [2, 0, 3, 1]
    E, K, N = len(sizes), 5, 3
    offsets = ragged_offsets(sizes)
    x = torch.randn(8, K, dtype=torch.float64, requires_grad=True)
    shape = (E, N, K) if layout == "nk" else (E, K, N)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, N, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: mk.grouped_gemm(x, w, offsets, bias=b, weight_layout=layout), (x, w, b))


def test_grouped_gemm_gradcheck_plan_padding():
    ids = torch.tensor([[0, 2], [2, 0], [2, 2]])
    plan = mk.plan_routing(ids, 3, block_size=4)
    x = torch.randn(plan.num_rows, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: mk.grouped_gemm(x, w, plan, bias=b), (x, w, b))


def test_grouped_gemm_opcheck():
    offsets = ragged_offsets([3, 0, 4])
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    b = torch.randn(3, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_gemm.default, (x, w, offsets, b, None, True))
    slots = torch.tensor([0, 1, -1, 2, 3, 4, -1, 5, 6], dtype=torch.int32)
    for s in (None, slots):
        torch.library.opcheck(torch.ops.moe_kernels.grouped_gemm_wgrad.default, (x.detach(), x.detach(), offsets, s))
        torch.library.opcheck(torch.ops.moe_kernels.segment_sum.default, (x.detach(), offsets, s))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 6, 7)), ValueError, "w must have shape"),
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 6, 8, dtype=torch.float64)), TypeError, "w must have dtype"),
        (dict(x=torch.randn(4), w=torch.randn(2, 6, 8)), ValueError, "x_sorted must be a 2-D"),
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 6, 8), offsets=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "plan_or_offsets"),
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 6, 8), offsets=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError, "offsets"),
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 6, 8), bias=torch.randn(2, 5)), ValueError, "bias"),
        (dict(x=torch.randn(4, 8), w=torch.randn(2, 6, 8), layout="mn"), ValueError, "weight_layout"),
    ],
)
def test_grouped_gemm_bad_input(kwargs, err, match):
    offsets = kwargs.get("offsets", torch.tensor([0, 1, 4], dtype=torch.int32))
    with pytest.raises(err, match=match):
        mk.grouped_gemm(kwargs["x"], kwargs["w"], offsets, bias=kwargs.get("bias"), weight_layout=kwargs.get("layout", "nk"))
