"""The TMA path of the grouped and FP8 GEMMs (sm_90 and newer): descriptors for the weights (and for x when its
rows are not gathered), checked against float64 references through the very code path the configs pick for
sm_90 (the interpreter runs ``tl.make_tensor_descriptor``), and the fallback to pointers whenever an operand's
layout does not fit a descriptor. Outputs are NaN-poisoned (conftest), so an unwritten element fails."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, assert_compiles_and_replays, tolerance
from moe_kernels.triton_kernels import _launch, configs, tma

import naive

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not mk.backends()["triton"].available:
    pytest.skip("no triton backend here", allow_module_level=True)


@pytest.fixture(autouse=True)
def _sm90(monkeypatch):
    """Configs chosen for sm_90 (TMA on) for CPU tensors; on a GPU its own architecture decides."""
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_90")
    monkeypatch.delenv("MOE_KERNELS_TMA", raising=False)


class Launches:
    """The GEMM launches made inside (run as usual), with their TMA flags."""

    def __enter__(self):
        self.seen = []
        self._remove = _launch.add_hook(lambda rec: self.seen.append(rec) and None)
        return self

    def __exit__(self, *exc):
        self._remove()

    def flags(self, name="grouped_gemm_kernel"):
        return [(r.kwargs.get("TMA_W", False), r.kwargs.get("TMA_A", False)) for r in self.seen if r.name == name]


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def tma_expected(on_gpu_arch=True):
    if DEV == "cuda":
        return configs.use_tma(torch.cuda.get_device_capability()) and on_gpu_arch
    return on_gpu_arch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("K,N", [(40, 48), (64, 40), (48, 24)])  # partial K tiles, partial N tiles, one of each
def test_grouped_gemm_through_descriptors(dtype, layout, K, N):
    sizes = [3, 0, 17, 1, 0, 40]  # empty experts, a segment over several m-tiles
    E, used = len(sizes), sum(sizes)
    P = used + 5  # rows past the last segment come out zero
    x = torch.randn(P, K, device=DEV).to(dtype)
    w = (torch.randn(E, N, K, device=DEV) / K**0.5).to(dtype)
    b = torch.randn(E, N, device=DEV).to(dtype)
    wl = w if layout == "nk" else w.transpose(1, 2).contiguous()
    with Launches() as seen:
        y = mk.grouped_gemm(x, wl, offsets_of(sizes), bias=b, weight_layout=layout, backend="triton")
    assert seen.flags() == [(tma_expected(), tma_expected())]
    expected = naive.grouped_gemm(x.cpu(), w.cpu(), offsets_of(sizes).cpu(), b.cpu())
    assert_close("y", y, expected, rms_tol=tolerance(dtype))
    assert (y[used:] == 0).all()


@pytest.mark.parametrize("why,K,N,layout", [
    ("K * 2 bytes not a multiple of 16", 111, 48, "nk"),
    ("N * 2 bytes not a multiple of 16 (N contiguous)", 64, 37, "kn"),
])
def test_grouped_gemm_falls_back_to_pointers(why, K, N, layout):
    sizes = [5, 0, 9]
    x = torch.randn(sum(sizes), K, device=DEV).half()
    w = (torch.randn(3, N, K, device=DEV) / K**0.5).half()
    wl = w if layout == "nk" else w.transpose(1, 2).contiguous()
    with Launches() as seen:
        y = mk.grouped_gemm(x, wl, offsets_of(sizes), weight_layout=layout, backend="triton")
    assert not seen.flags()[0][0], why
    assert_close("y", y, naive.grouped_gemm(x.cpu(), w.cpu(), offsets_of(sizes).cpu(), None), rms_tol=tolerance(torch.float16))


def test_unaligned_views_and_the_switches_take_the_pointer_path(monkeypatch):
    sizes = [6, 2]
    base = torch.randn(2 * 32 * 64 + 1, device=DEV).half()
    w = base[1:].view(2, 32, 64)  # starts 2 bytes into its storage: no descriptor
    x_big = torch.randn(sum(sizes), 65, device=DEV).half()
    x = x_big[:, 1:]  # rows of 130 bytes
    expected = naive.grouped_gemm(x.cpu(), w.cpu(), offsets_of(sizes).cpu(), None)
    with Launches() as seen:
        y = mk.grouped_gemm(x, w, offsets_of(sizes), backend="triton")
    assert seen.flags() == [(False, False)]
    assert_close("y", y, expected, rms_tol=tolerance(torch.float16))
    wc = w.contiguous()
    for env, value in (("MOE_KERNELS_TMA", "0"), ("MOE_KERNELS_ASSUME_DEVICE", "sm_80")):
        with monkeypatch.context() as m:
            m.setenv(env, value)
            with Launches() as seen:
                y = mk.grouped_gemm(x.contiguous(), wc, offsets_of(sizes), backend="triton")
            if DEV == "cpu":
                assert seen.flags() == [(False, False)], env
            assert_close("y", y, expected, rms_tol=tolerance(torch.float16))


def test_descriptor_rules():
    t = torch.empty(4, 8, 16, dtype=torch.float16)
    assert tma.descriptor_fits(t, t.stride(), t.shape)
    assert not tma.descriptor_fits(t, (128, 16, 2), t.shape)  # inner stride not 1
    assert not tma.descriptor_fits(t, (128, 12, 1), t.shape)  # 24 bytes
    assert not tma.descriptor_fits(t, (0, 16, 1), t.shape)  # a broadcast expert dim
    assert not tma.descriptor_fits(t, t.stride(), t.shape, base_offset=4)  # 8 bytes off
    assert tma.descriptor_fits(t, t.stride(), t.shape, base_offset=8)
    assert not tma.descriptor_fits(t, t.stride(), (4, 8, 2**31))  # int32 extents
    assert not tma.descriptor_fits(t, t.stride(), (4, 0, 16))
    assert tma.weight_fits(t, True, 4, 16, up_offset=4 * 16)  # gate rows [0, 4), up rows [4, 8)
    assert not tma.weight_fits(t, True, 4, 16, up_offset=4 * 16 + 1)
    assert tma.weight_fits(t, True, 4, 16, up_offset=16, n_stride=32)  # interleaved gate/up rows
    assert not tma.weight_fits(t, False, 8, 8, up_offset=1, n_stride=2)  # interleaved columns
    assert tma.weight_fits(t, False, 16, 8)


def moe_inputs(T, H, I, E, k, dtype, bias):
    x = torch.randn(T, H, device=DEV).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=DEV) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEV) / I**0.5).to(dtype)
    w, ids = mk.topk_gating(torch.randn(T, E, device=DEV), k, backend="torch")
    ids = torch.where(ids == 2, 3, ids)  # expert 2 gets no tokens
    ids.view(-1)[::7] = -1  # dropped slots
    b13 = torch.randn(E, 2 * I, device=DEV).to(dtype) if bias else None
    b2 = torch.randn(E, H, device=DEV).to(dtype) if bias else None
    return x, w13, w2, w, ids, b13, b2


@pytest.mark.parametrize("activation,interleaved,bias", [("silu", False, False), ("swiglu_oai", True, True),
                                                         ("gelu", False, True)])
def test_fused_moe_forward_and_backward_through_descriptors(activation, interleaved, bias):
    """Gated GEMM (gate and up descriptors, interleaved rows too), the GEMM with x not gathered, dA with the
    activation's backward and dX through the transposed weight: gradients against float64."""
    T, H, I, E, k = 19, 48, 40, 5, 2
    x, w13, w2, w, ids, b13, b2 = moe_inputs(T, H, I, E, k, torch.float32, bias)
    g = torch.randn_like(x)
    tensors = (x, w13, w2, w, b13, b2)

    def run(be, dtype):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
        out = mk.fused_moe(leaves[0], leaves[1], leaves[2], leaves[3], ids, activation=activation, w13_bias=leaves[4],
                           w2_bias=leaves[5], gate_up_interleaved=interleaved, backend=be)
        out.backward(g.to(dtype))
        return out, [None if t is None else t.grad for t in leaves]

    with Launches() as seen:
        out, grads = run("triton", torch.float32)
    flags = seen.flags()
    if tma_expected():
        assert flags and all(f[0] for f in flags), flags  # every GEMM reads its weight through a descriptor
        assert any(f[1] for f in flags), flags  # the GEMMs of rows in expert order read x through one too
    ref_out, ref_grads = run("torch", torch.float64)
    assert_close("out", out, ref_out, rms_tol=1e-5)
    for name, got, exp in zip(("hidden", "w13", "w2", "topk_weights", "w13_bias", "w2_bias"), grads, ref_grads):
        if exp is not None:
            assert_close(f"grad {name}", got, exp, rms_tol=1e-5)


def test_padding_rows_of_x_never_reach_real_rows():
    """x through a descriptor reads whole boxes: the plan's padding rows (NaN here) are loaded too and must stay
    in their own output rows."""
    ids = torch.randint(0, 4, (13, 2), device=DEV)
    plan = mk.plan_routing(ids, 4, block_size=8)
    K, N = 32, 48
    x = torch.randn(plan.num_rows, K, device=DEV).half()
    pad = plan.sorted_slots < 0
    x[pad] = float("nan")
    w = (torch.randn(4, N, K, device=DEV) / K**0.5).half()
    with Launches() as seen:
        y = mk.grouped_gemm(x, w, plan, backend="triton")
    assert seen.flags()[0] == (tma_expected(), tma_expected())
    expected = naive.grouped_gemm(torch.where(pad[:, None], 0, x).cpu(), w.cpu(), plan.expert_offsets.cpu(), None)
    assert_close("real rows", y[~pad], expected[~pad.cpu()], rms_tol=tolerance(torch.float16))


@pytest.mark.parametrize("layout", [{}, dict(block_shape=(64, 32)), dict(per_channel=True)])
def test_fp8_weights_through_descriptors(layout):
    sizes = [5, 0, 13, 1]
    K, N = 96, 80
    P = sum(sizes) + 3
    x = torch.randn(P, K, device=DEV).half()
    qw = mk.quantize(torch.randn(len(sizes), N, K, device=DEV) / K**0.5, **layout)
    with Launches() as seen:
        y = mk.grouped_gemm(x, qw, offsets_of(sizes), backend="triton")
    assert seen.flags("fp8_grouped_gemm_kernel") == [(tma_expected(), False)]
    expected = mk.grouped_gemm(x.double(), qw, offsets_of(sizes), backend="torch")
    assert_close("y", y, expected, rms_tol=1e-2)
    assert (y[sum(sizes):] == 0).all()


def test_fp8_fused_moe_gate_and_up_descriptors():
    x, w13, w2, w, ids, _, _ = moe_inputs(11, 64, 48, 5, 2, torch.float16, False)
    q13, q2 = mk.quantize(w13.float(), block_shape=(64, 32)), mk.quantize(w2.float(), block_shape=(64, 32))
    with Launches() as seen:
        y = mk.fused_moe(x, q13, q2, w, ids, backend="triton")
    assert [f[0] for f in seen.flags("fp8_grouped_gemm_kernel")] == [tma_expected()] * 2
    expected = mk.fused_moe(x.double(), q13, q2, w, ids, backend="torch")
    assert torch.isfinite(y).all()
    assert_close("y", y, expected, rms_tol=2e-2)


def test_tma_moe_under_compile_and_cuda_graph():
    """The descriptors' scratch allocation under torch.compile (fullgraph, dynamic token count) and CUDA-graph
    capture: results equal to eager, forward and backward."""
    moe = mk.MoE(256, 128, num_experts=8, top_k=2, dtype=torch.bfloat16, device=DEV, backend="triton")
    x = torch.randn(300, 256, device=DEV, dtype=torch.bfloat16)
    if DEV != "cuda" or not tma_expected():  # built on CPU too, so a broken test body shows in CI
        pytest.skip("torch.compile / CUDA graphs of the TMA path need an sm_90+ GPU")
    with Launches() as seen:
        ref = moe(x)
    assert all(f[0] for f in seen.flags()), seen.flags()
    assert_compiles_and_replays(moe, (300, 1024), x, rms_tol=2e-2)
    assert torch.isfinite(ref).all()
