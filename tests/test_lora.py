"""lora_moe (torch reference and Triton path), LoRAMoE and wrap_linear against a naive float64 loop.

The Triton path runs under the interpreter on CPU in fp32/fp16 (bf16 too on a GPU)."""

import pytest
import torch
from torch import nn

import moe_kernels as mk
from moe_kernels.testing import assert_close, tolerance

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if mk.backends()["triton"].available else [])
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def naive_lora_moe(x, w0, b0, a, b, weights, ids, scaling):
    """``y[t] = W0 x_t + b0 + scaling * sum_j w[t, j] * B[e_j] (A[e_j] x_t)``, one token and slot at a time, float64
    (differentiable: float64 CPU leaves keep their graph)."""
    d = lambda t: t.cpu().double()  # noqa: E731
    x, w0, a, b, weights = d(x), d(w0), d(a), d(b), d(weights)
    T, k = ids.shape
    y = torch.zeros(T, w0.shape[0], dtype=torch.float64)
    for t in range(T):
        y[t] = w0 @ x[t] + (d(b0) if b0 is not None else 0.0)
        for j in range(k):
            e = int(ids[t, j])
            if e >= 0:
                y[t] += scaling * weights[t, j] * (b[e] @ (a[e] @ x[t]))
    return y


def make(T, K, N, E, r, k, dtype=torch.float32, bias=True, ids=None, device=DEV):
    x = torch.randn(T, K, device=device).to(dtype)
    w0 = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b0 = torch.randn(N, device=device).to(dtype) if bias else None
    a = (torch.randn(E, r, K, device=device) / K**0.5).to(dtype)
    b = (torch.randn(E, N, r, device=device) / r**0.5).to(dtype)
    w, topk_ids = mk.topk_gating(torch.randn(T, E, device=device), k, backend="torch")
    if dtype == torch.float64:
        w = w.double()
    if ids is not None:
        topk_ids = ids.to(device=device, dtype=torch.int32)
    return x, w0, b0, a, b, w, topk_ids


SHAPES = {  # T, K, N, E, r, k
    "basic": (37, 48, 40, 8, 16, 2),
    "odd_rank5": (23, 111, 37, 6, 5, 3),
    "rank12": (19, 32, 48, 4, 12, 2),
    "k1": (17, 32, 24, 4, 8, 1),
    "k_is_E": (11, 24, 32, 4, 4, 4),
    "one_token": (1, 16, 16, 3, 4, 2),
    "zero_tokens": (0, 32, 16, 4, 8, 2),
    "many_experts": (25, 32, 16, 33, 4, 4),
    "single_expert": (7, 16, 8, 1, 4, 1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lora_moe_fp32(backend, shape):
    inputs = make(*SHAPES[shape])
    inputs[-1].view(-1)[::7] = -1  # dropped slots
    y = mk.lora_moe(*inputs[:2], *inputs[3:], scaling=0.5, base_bias=inputs[2], backend=backend)
    assert y.dtype == torch.float32 and y.shape == (inputs[0].shape[0], inputs[1].shape[0])
    assert_close("y", y, naive_lora_moe(*inputs, 0.5), rms_tol=2 * tolerance(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_lora_moe_low_precision(backend, dtype):
    inputs = make(29, 64, 40, 6, 12, 2, dtype)
    y = mk.lora_moe(*inputs[:2], *inputs[3:], scaling=2.0, base_bias=inputs[2], backend=backend)
    assert y.dtype == dtype
    assert_close("y", y, naive_lora_moe(*inputs, 2.0), rms_tol=2 * tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_moe_empty_experts_and_noncontiguous(backend):
    ids = torch.tensor([[0, 2], [2, -1], [0, 5], [-1, -1], [5, 0], [2, 0]])  # experts 1, 3, 4 get nothing
    x, w0, b0, a, b, w, ids = make(6, 40, 24, 6, 8, 2, ids=ids)
    x = torch.randn(40, 6, device=DEV).t()  # [T, K] with stride (1, T)
    a = torch.randn(6, 40, 8, device=DEV).transpose(1, 2) / 40**0.5  # [E, r, K], not contiguous
    y = mk.lora_moe(x, w0, a, b, w, ids, base_bias=b0, backend=backend)
    assert_close("y", y, naive_lora_moe(x, w0, b0, a, b, w, ids, 1.0), rms_tol=2 * tolerance(torch.float32))


def test_lora_moe_gradcheck_reference():
    x, w0, b0, a, b, w, ids = make(7, 6, 5, 4, 3, 2, torch.float64, ids=torch.tensor(
        [[0, 2], [2, -1], [0, 2], [3, 0], [2, 2], [0, 3], [3, 2]]))  # expert 1 empty, a dropped slot, a repeat
    leaves = [t.detach().requires_grad_() for t in (x, w0, b0, a, b, w)]

    def f(x, w0, b0, a, b, w):
        return mk.lora_moe(x, w0, a, b, w, ids, scaling=0.7, base_bias=b0, backend="torch")

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_moe_frozen_base_gets_no_grad(backend):
    x, w0, b0, a, b, w, ids = make(9, 16, 24, 3, 4, 2)
    leaves = [t.requires_grad_() for t in (x, a, b, w)]
    mk.lora_moe(leaves[0], w0, leaves[1], leaves[2], leaves[3], ids, base_bias=b0, backend=backend).sum().backward()
    assert w0.grad is None and b0.grad is None
    assert all(t.grad is not None for t in leaves)
    a2 = a.detach().requires_grad_()  # only the adapters train: no dx, no dw
    mk.lora_moe(x.detach(), w0, a2, b.detach(), w.detach(), ids, backend=backend).sum().backward()
    assert a2.grad is not None


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("shape", ["basic", "odd_rank5", "k_is_E", "zero_tokens"])
def test_lora_moe_kernel_backward(backend, shape):
    """Every gradient of the Triton path (fp32 under the interpreter) against the float64 reference."""
    T, K, N, E, r, k = SHAPES[shape]
    tensors = make(T, K, N, E, r, k)
    ids = tensors[-1]
    ids.view(-1)[::5] = -1
    g = torch.randn(T, N, device=DEV)
    names = ("x", "base_weight", "base_bias", "lora_a", "lora_b", "topk_weights")

    def grads(be, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors[:-1]]
        x, w0, b0, a, b, w = leaves
        y = mk.lora_moe(x, w0, a, b, w, ids, scaling=1.5, base_bias=b0, backend=be)
        y.backward(g.to(dtype))
        return [t.grad for t in leaves]

    for name, got, exp in zip(names, grads(backend, torch.float32), grads("torch", torch.float64)):
        assert_close(f"grad {name}", got, exp, rms_tol=1e-5)


def test_lora_moe_reference_backward_matches_naive_autograd():
    """The hand-written reference backward against autograd through the naive loop."""
    x, w0, b0, a, b, w, ids = make(9, 12, 10, 4, 3, 2, torch.float64)
    ids[2, 1] = -1
    leaves = [t.detach().requires_grad_() for t in (x, w0, b0, a, b, w)]
    g = torch.randn(9, 10, dtype=torch.float64, device=DEV)
    mk.lora_moe(leaves[0], leaves[1], leaves[3], leaves[4], leaves[5], ids, scaling=0.3, base_bias=leaves[2],
                backend="torch").backward(g)
    naive = [t.detach().cpu().requires_grad_() for t in (x, w0, b0, a, b, w)]
    y = naive_lora_moe(*naive, ids.cpu(), 0.3)
    y.backward(g.cpu())
    for name, got, exp in zip(("x", "w0", "b0", "a", "b", "w"), leaves, naive):
        assert_close(f"grad {name}", got.grad, exp.grad, rms_tol=1e-12)


def test_lora_moe_opcheck():
    x, w0, b0, a, b, w, ids = make(8, 16, 12, 3, 4, 2)
    args = [t.requires_grad_() for t in (x, w0, b0, a, b, w)]
    torch.library.opcheck(torch.ops.moe_kernels.lora_moe.default, (*args[:5], args[5], ids, 0.5))
    g = torch.randn(8, 12, device=DEV)
    plain = [t.detach() for t in args]
    torch.library.opcheck(torch.ops.moe_kernels.lora_moe_backward.default,
                          (g, *plain, ids, 0.5, [True, False, True, True, True, True]))


def test_lora_moe_compile_dynamic():
    x, w0, b0, a, b, w, ids = make(10, 16, 12, 4, 4, 2)
    torch._dynamo.reset()
    f = torch.compile(lambda x, a, w, ids: mk.lora_moe(x, w0, a, b, w, ids, base_bias=b0, backend="torch"),
                      fullgraph=True, dynamic=True)
    for T in (10, 23):
        x, _, _, _, _, w, ids = make(T, 16, 12, 4, 4, 2)
        x.requires_grad_()
        y = f(x, a, w, ids)
        y.sum().backward()
        assert_close("compiled", y, naive_lora_moe(x, w0, b0, a, b, w, ids, 1.0), rms_tol=1e-5)
        assert x.grad is not None


def test_lora_moe_triton_compile_and_opcheck():
    x, w0, b0, a, b, w, ids = make(64, 256, 128, 8, 16, 2, torch.bfloat16)
    a.requires_grad_()
    if DEV != "cuda" or "triton" not in BACKENDS:  # the inputs are built on CPU too
        pytest.skip("torch.compile / opcheck of triton ops need a GPU")
    torch.library.opcheck(torch.ops.moe_kernels.lora_moe_triton.default, (x, w0, b0, a, b, w, ids, 2.0))
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, ids: mk.lora_moe(x, w0, a, b, w, ids, scaling=2.0, base_bias=b0, backend="triton"),
                      fullgraph=True, dynamic=True)
    for T in (33, 256):
        x, _, _, _, _, w, ids = make(T, 256, 128, 8, 16, 2, torch.bfloat16)
        y = f(x.requires_grad_(), w, ids)
        y.float().square().mean().backward()
        assert_close("compiled", y, naive_lora_moe(x, w0, b0, a, b, w, ids, 2.0), rms_tol=2 * tolerance(torch.bfloat16))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_lora_moe_deterministic(backend):
    x, w0, b0, a, b, w, ids = make(40, 32, 24, 4, 8, 2)
    y1 = mk.lora_moe(x, w0, a, b, w, ids, backend=backend)
    y2 = mk.lora_moe(x, w0, a, b, w, ids, backend=backend)
    assert torch.equal(y1, y2)
    w0 = torch.zeros_like(w0)  # the adapters are batch-invariant (torch's base GEMM need not be)
    y_part = mk.lora_moe(x[:7], w0, a, b, w[:7], ids[:7], backend=backend)
    assert torch.equal(y_part, mk.lora_moe(x, w0, a, b, w, ids, backend=backend)[:7])


# ----- modules ---------------------------------------------------------------------------------------


def test_lora_moe_module_starts_as_base_and_trains_adapters():
    base = nn.Linear(16, 12)
    layer = mk.LoRAMoE(base, num_experts=4, rank=4, top_k=2, scaling=2.0, aux_loss_coef=0.01)
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == (2, 5, 12)
    assert_close("B = 0 start", y, base(x).double(), rms_tol=1e-6)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    with torch.no_grad():
        layer.lora_b.normal_()
    (layer(x).square().mean() + layer.aux_loss).backward()
    assert base.weight.grad is None
    assert all(p.grad is not None for p in (layer.lora_a, layer.lora_b, layer.router.weight))
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt(5)) on each [r, in]
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > bound / 2


def test_lora_moe_module_matches_formula():
    layer = mk.LoRAMoE(nn.Linear(12, 8, dtype=torch.float64), num_experts=3, rank=5, top_k=2, scaling=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(7, 12, dtype=torch.float64)
    logits = x @ layer.router.weight.T
    w, ids = mk.topk_gating(logits, 2)
    expected = naive_lora_moe(x, layer.base.weight, layer.base.bias, layer.lora_a, layer.lora_b, w, ids, 0.5)
    assert_close("LoRAMoE", layer(x), expected, rms_tol=1e-12)


def test_wrap_linear_sequential():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)))
    x = torch.randn(6, 16)
    before = model(x)
    out = mk.wrap_linear(model, ["0", "2.1"], num_experts=4, rank=4, top_k=2)
    assert out is model
    assert isinstance(model[0], mk.LoRAMoE) and isinstance(model[2][1], mk.LoRAMoE)
    assert isinstance(model[2][0], nn.Linear)
    assert_close("wrapped, B = 0", model(x), before.double(), rms_tol=1e-6)
    model(x).sum().backward()
    assert model[0].lora_a.grad is not None and model[0].base.weight.grad is None
    assert model[2][0].weight.grad is not None  # unwrapped layers are untouched


def test_wrap_linear_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no submodule 'proj'.*'0'"):
        mk.wrap_linear(model, ["0", "proj"], 2, 2, 1)
    assert isinstance(model[0], nn.Linear)  # nothing replaced when a name is bad
    with pytest.raises(TypeError, match="'1' is a ReLU"):
        mk.wrap_linear(model, "1", 2, 2, 1)
    with pytest.raises(ValueError, match="names is empty"):
        mk.wrap_linear(model, [], 2, 2, 1)
    with pytest.raises(ValueError, match="top_k"):
        mk.wrap_linear(model, "0", 2, 2, 3)
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        mk.LoRAMoE(nn.ReLU(), 2, 2, 1)


# ----- bad inputs ------------------------------------------------------------------------------------


def _bad(**over):
    x, w0, b0, a, b, w, ids = make(5, 8, 6, 3, 4, 2, device="cpu")  # CPU: ids are value-checked there
    args = dict(x=x, base_weight=w0, lora_a=a, lora_b=b, topk_weights=w, topk_ids=ids, base_bias=b0, scaling=1.0)
    args.update(over)
    return args


@pytest.mark.parametrize("over,err,match", [
    (dict(x=torch.randn(5, 8, 1)), ValueError, "x must be a 2-D"),
    (dict(x=torch.randn(5, 8, dtype=torch.float64)), TypeError, "base_weight must have dtype"),
    (dict(base_weight=torch.randn(6, 9)), ValueError, "base_weight must have shape"),
    (dict(lora_a=torch.randn(3, 4, 7)), ValueError, "lora_a must have shape"),
    (dict(lora_a=torch.randn(3, 4, 8).half()), TypeError, "lora_a must have dtype"),
    (dict(lora_b=torch.randn(3, 6, 5)), ValueError, r"lora_b must have shape \[3, 6, 4\].*rank r=4"),
    (dict(lora_b=torch.randn(2, 6, 4)), ValueError, "lora_b must have shape"),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int32)), ValueError, "topk_ids must have shape"),
    (dict(topk_ids=torch.zeros(5, 2)), TypeError, "topk_ids must have dtype"),
    (dict(topk_ids=torch.full((5, 2), 3, dtype=torch.int32)), ValueError, "topk_ids must hold values"),
    (dict(topk_weights=torch.rand(5, 3)), ValueError, "topk_weights must have shape"),
    (dict(base_bias=torch.randn(5)), ValueError, "base_bias must have shape"),
    (dict(scaling="2"), TypeError, "scaling must be a float"),
])
def test_lora_moe_bad_input(over, err, match, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")  # strict mode: out-of-range ids raise
    args = _bad(**over)
    with pytest.raises(err, match=match):
        mk.lora_moe(args.pop("x"), args.pop("base_weight"), args.pop("lora_a"), args.pop("lora_b"),
                    args.pop("topk_weights"), args.pop("topk_ids"), **args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no triton backend here")
def test_lora_moe_backend_refusal():
    x, w0, b0, a, b, w, ids = make(5, 8, 6, 3, 4, 2, torch.float64)
    with pytest.raises(ValueError, match="float64 inputs are served by the torch backend"):
        mk.lora_moe(x, w0, a, b, w, ids, base_bias=b0, backend="triton")


def test_dense_adapters_when_small():
    """auto runs all adapters densely when E*r is small next to K*N: same result as the routed reference."""
    from moe_kernels.lora import dense_is_cheaper

    T, K, N, E, r, k = 23, 256, 192, 4, 4, 2
    assert dense_is_cheaper(K, N, E, r)
    x = torch.randn(T, K, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(N, K, dtype=torch.float64)
    a = torch.randn(E, r, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, N, r, dtype=torch.float64, requires_grad=True)
    w, ids = mk.topk_gating(torch.randn(T, E), k)
    w = w.double().requires_grad_()
    ids[3, 1] = -1  # a dropped slot
    y = mk.lora_moe(x, w0, a, b, w, ids, scaling=0.5)
    y_ref = mk.lora_moe(x, w0, a, b, w, ids, scaling=0.5, backend="torch")  # the routed reference op
    assert_close("dense vs routed", y, y_ref, rms_tol=1e-12)
    g = torch.randn(T, N, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, a, b, w), g)
    exp = torch.autograd.grad(y_ref, (x, a, b, w), g)
    for name, u, v in zip(("x", "lora_a", "lora_b", "topk_weights"), got, exp):
        assert_close(f"grad {name}", u, v, rms_tol=1e-12)
