"""The fast grouped GEMM and fused MoE kernels against float64 references, forward and backward.

Under the interpreter (CPU) in fp32/fp16; bf16 too on a GPU."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, assert_compiles_and_replays, tolerance

import naive

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in ("triton", "cuda") if mk.backends()[b].available]
if not FAST:
    pytest.skip("no fast GEMM backend here", allow_module_level=True)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def need(backend, op):
    if backend not in mk._backends._IMPLS.get(op, {}):
        pytest.skip(f"{backend} has no {op}")


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


SEGMENTS = {"ragged": [3, 0, 17, 1, 0, 70], "one_huge": [0, 0, 130, 0, 1, 0], "all_empty": [0, 0, 0], "single": [9]}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("segments", list(SEGMENTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("K,N", [(32, 48), (111, 37)])
def test_grouped_gemm_kernel(backend, segments, dtype, layout, K, N):
    need(backend, "grouped_gemm")
    sizes = SEGMENTS[segments]
    E, used = len(sizes), sum(sizes)
    P = used + 5  # rows past the last segment must come out zero
    x = torch.randn(P, K, device=DEV).to(dtype)
    w = (torch.randn(E, N, K, device=DEV) / K**0.5).to(dtype)
    b = torch.randn(E, N, device=DEV).to(dtype)
    wl = w if layout == "nk" else w.transpose(1, 2).contiguous()
    y = mk.grouped_gemm(x, wl, offsets_of(sizes), bias=b, weight_layout=layout, backend=backend)
    expected = naive.grouped_gemm(x.cpu(), w.cpu(), offsets_of(sizes).cpu(), b.cpu())
    assert y.dtype == dtype
    assert_close("y", y, expected, rms_tol=tolerance(dtype))
    assert (y[used:] == 0).all()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_grouped_gemm_kernel_backward(backend, layout):
    need(backend, "grouped_gemm")
    ids = torch.randint(0, 5, (29, 2), device=DEV)
    ids = torch.where(ids == 3, 4, ids)
    plan = mk.plan_routing(ids, 5, block_size=4)
    K, N = 24, 40
    x = torch.randn(plan.num_rows, K, device=DEV)
    w = torch.randn(5, N, K, device=DEV) / K**0.5
    if layout == "kn":
        w = w.transpose(1, 2).contiguous()
    b = torch.randn(5, N, device=DEV)
    g = torch.randn(plan.num_rows, N, device=DEV)

    def grads(be, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        y = mk.grouped_gemm(leaves[0], leaves[1], plan, bias=leaves[2], weight_layout=layout, backend=be)
        y.backward(g.to(dtype))
        return [t.grad for t in leaves]

    for name, got, exp in zip(("x", "w", "bias"), grads(backend, torch.float32), grads("torch", torch.float64)):
        assert_close(f"grad {name}", got, exp, rms_tol=1e-5)


def moe_inputs(T, H, I, E, k, dtype, gated=True, bias=False):
    x = torch.randn(T, H, device=DEV).to(dtype)
    w13 = (torch.randn(E, (2 if gated else 1) * I, H, device=DEV) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEV) / I**0.5).to(dtype)
    w, ids = mk.topk_gating(torch.randn(T, E, device=DEV), k, backend="torch")
    b13 = torch.randn(E, w13.shape[1], device=DEV).to(dtype) if bias else None
    b2 = torch.randn(E, H, device=DEV).to(dtype) if bias else None
    return x, w13, w2, w, ids, b13, b2


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I,E,k,activation,gated,bias,on_input,capacity", [
    (1, 32, 16, 4, 1, "silu", True, False, False, None),
    (37, 48, 40, 8, 2, "silu", True, True, False, None),
    (23, 111, 37, 6, 3, "swiglu_oai", True, True, False, None),
    (19, 64, 32, 5, 5, "gelu", True, False, True, None),
    (30, 32, 48, 8, 1, "relu", False, True, False, 3),
    (0, 32, 16, 4, 2, "silu", True, False, False, None),
    (25, 32, 16, 33, 4, "silu", True, False, False, None),
])
def test_fused_moe_kernel(backend, dtype, T, H, I, E, k, activation, gated, bias, on_input, capacity):
    need(backend, "fused_moe")
    x, w13, w2, w, ids, b13, b2 = moe_inputs(T, H, I, E, k, dtype, gated, bias)
    if activation == "swiglu_oai":
        x = x * 4
    ids.view(-1)[::7] = -1  # dropped slots
    why = mk._backends.not_supported_reasons("fused_moe", x.device, x, w13, w2, w, ids, b13, b2).get(backend)
    if why:
        pytest.skip(why)  # e.g. the cuda decode path refuses batches with many rows per expert
    out = mk.fused_moe(x, w13, w2, w, ids, activation=activation, gated=gated, w13_bias=b13, w2_bias=b2,
                       apply_router_weight_on_input=on_input, capacity=capacity, backend=backend)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    expected = naive.moe(cpu(x), cpu(w13), cpu(w2), cpu(w), cpu(ids), activation, gated, cpu(b13), cpu(b2),
                         on_input=on_input, capacity=capacity)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close("out", out, expected, rms_tol=2 * tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,E,k,activation,gated,bias,on_input", [
    (1, 8, 2, "silu", True, False, False), (4, 64, 8, "silu", True, True, False), (3, 32, 4, "swiglu_oai", True, True, False),
    (2, 8, 1, "relu", False, False, True), (16, 128, 8, "gelu", True, False, False)])
def test_fused_moe_cuda_decode(dtype, T, E, k, activation, gated, bias, on_input):
    """The small-batch decode path: every expert's weight read once, against its few rows."""
    x, w13, w2, w, ids, b13, b2 = moe_inputs(T, 256, 128, E, k, dtype, gated, bias)
    if "cuda" not in FAST:  # the inputs are built everywhere: a broken test body shows on CPU
        pytest.skip("needs the CUDA extension and a GPU")
    with torch.no_grad():
        out = mk.fused_moe(x, w13, w2, w, ids, activation=activation, gated=gated, w13_bias=b13, w2_bias=b2,
                           apply_router_weight_on_input=on_input, backend="cuda")
        auto = mk.fused_moe(x, w13, w2, w, ids, activation=activation, gated=gated, w13_bias=b13, w2_bias=b2,
                            apply_router_weight_on_input=on_input)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    expected = naive.moe(cpu(x), cpu(w13), cpu(w2), cpu(w), cpu(ids), activation, gated, cpu(b13), cpu(b2), on_input=on_input)
    assert_close("decode out", out, expected, rms_tol=2 * tolerance(dtype))
    assert torch.equal(out, auto), "auto picks the decode path for a decode batch"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("activation,gated,on_input,bias", [("silu", True, False, True), ("swiglu_oai", True, True, False),
                                                            ("gelu", False, False, True)])
def test_fused_moe_kernel_backward(backend, activation, gated, on_input, bias):
    need(backend, "fused_moe")
    if backend == "cuda":
        pytest.skip("the cuda fused_moe path is inference-only")
    x, w13, w2, w, ids, b13, b2 = moe_inputs(21, 32, 24, 6, 2, torch.float32, gated, bias)
    ids[0, 1] = -1
    g = torch.randn_like(x)
    tensors = [t for t in (x, w13, w2, w, b13, b2)]

    def grads(be, dtype):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
        out = mk.fused_moe(leaves[0], leaves[1], leaves[2], leaves[3], ids, activation=activation, gated=gated,
                           w13_bias=leaves[4], w2_bias=leaves[5], apply_router_weight_on_input=on_input, backend=be)
        out.backward(g.to(dtype))
        return [None if t is None else t.grad for t in leaves]

    names = ("hidden", "w13", "w2", "topk_weights", "w13_bias", "w2_bias")
    for name, got, exp in zip(names, grads(backend, torch.float32), grads("torch", torch.float64)):
        if exp is not None:
            assert_close(f"grad {name}", got, exp, rms_tol=1e-5)


def test_moe_layer_triton_compile_and_cuda_graph():
    moe = mk.MoE(256, 128, num_experts=8, top_k=2, dtype=torch.bfloat16, device=DEV, backend="triton")
    torch.randn(33, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    if DEV != "cuda":  # built on CPU too, so a broken test body shows in CI
        pytest.skip("torch.compile / CUDA graphs of triton ops need a GPU")
    assert_compiles_and_replays(moe, (33, 256), torch.randn(64, 256, device="cuda", dtype=torch.bfloat16), rms_tol=2e-2)
