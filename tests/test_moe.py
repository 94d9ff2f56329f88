import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, tolerance

import naive


def make_inputs(T, H, I, E, k, *, dtype=torch.float32, device="cpu", gated=True, bias=False, ids=None):
    x = torch.randn(T, H, dtype=dtype, device=device)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, dtype=dtype, device=device) / H**0.5
    w2 = torch.randn(E, H, I, dtype=dtype, device=device) / I**0.5
    logits = torch.randn(T, E, device=device)
    weights, topk_ids = mk.topk_gating(logits, k, renormalize=False)
    if ids is not None:
        topk_ids = ids.to(device)
    b13 = torch.randn(E, w13.shape[1], dtype=dtype, device=device) if bias else None
    b2 = torch.randn(E, H, dtype=dtype, device=device) if bias else None
    return x, w13, w2, weights, topk_ids, b13, b2


def check_against_naive(x, w13, w2, weights, ids, b13=None, b2=None, **kw):
    out = mk.fused_moe(x, w13, w2, weights, ids, w13_bias=b13, w2_bias=b2, **kw)
    naive_kw = dict(activation=kw.get("activation", "silu"), gated=kw.get("gated", True),
                    on_input=kw.get("apply_router_weight_on_input", False), capacity=kw.get("capacity"),
                    expert_map=kw.get("expert_map"))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    expected = naive.moe(cpu(x), cpu(w13), cpu(w2), cpu(weights), cpu(ids), b13=cpu(b13), b2=cpu(b2), **naive_kw)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close("out", out, expected, rms_tol=tolerance(x.dtype) * 2)
    return out


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", True), ("relu", True), ("swiglu_oai", True),
                                              ("relu", False), ("gelu", False), ("silu", False)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_moe_activations(device, activation, gated, bias):
    inputs = make_inputs(13, 24, 20, 6, 2, device=device, gated=gated, bias=bias, dtype=torch.float64)
    if activation == "swiglu_oai":  # reach both clamps
        inputs = (inputs[0] * 8,) + inputs[1:]
    check_against_naive(*inputs, activation=activation, gated=gated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,I,E,k", [(1, 32, 16, 4, 1), (17, 111, 40, 8, 2), (9, 32, 16, 5, 5), (7, 16, 8, 1, 1), (23, 48, 32, 257, 8)])
def test_fused_moe_shapes_dtypes(device, dtype, T, H, I, E, k):
    check_against_naive(*make_inputs(T, H, I, E, k, dtype=dtype, device=device))


def test_fused_moe_zero_tokens(device):
    x, w13, w2, w, ids, _, _ = make_inputs(0, 16, 8, 4, 2, device=device)
    out = mk.fused_moe(x, w13, w2, w, ids)
    assert out.shape == (0, 16)


def test_fused_moe_empty_expert_and_dropped_ids(device):
    ids = torch.tensor([[0, 2], [2, -1], [0, 0 + 2], [-1, -1], [4, 0]])
    check_against_naive(*make_inputs(5, 16, 8, 5, 2, ids=ids, device=device, dtype=torch.float64))


@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
def test_fused_moe_capacity(device, capacity):
    ids = torch.randint(0, 3, (12, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 3
    check_against_naive(*make_inputs(12, 16, 8, 3, 2, ids=ids, device=device, dtype=torch.float64), capacity=capacity)


def test_fused_moe_expert_map(device):
    # 8 global experts, 3 local ones here: globals 1, 4, 6 -> local 0, 1, 2
    emap = torch.full((8,), -1, dtype=torch.int32)
    emap[1], emap[4], emap[6] = 0, 1, 2
    ids = torch.randint(0, 8, (15, 3))
    x, w13, w2, w, _, _, _ = make_inputs(15, 16, 8, 3, 3, device=device, dtype=torch.float64)
    check_against_naive(x, w13, w2, torch.rand(15, 3, device=device), ids.to(device), expert_map=emap.to(device))


def test_fused_moe_router_weight_on_input(device):
    check_against_naive(*make_inputs(10, 16, 8, 4, 2, device=device, dtype=torch.float64, bias=True),
                        apply_router_weight_on_input=True)


def test_fused_moe_noncontiguous_inputs(device):
    x, w13, w2, w, ids, _, _ = make_inputs(10, 16, 8, 4, 2, device=device, dtype=torch.float64)
    x_nc = torch.randn(16, 10, dtype=x.dtype, device=device).t()
    w2_nc = torch.randn(4, 8, 16, dtype=x.dtype, device=device).transpose(1, 2)
    check_against_naive(x_nc, w13, w2_nc, w, ids)


@pytest.mark.parametrize("activation,gated,on_input", [("silu", True, False), ("swiglu_oai", True, False),
                                                       ("gelu", False, True), ("relu", True, True)])
def test_fused_moe_gradcheck(activation, gated, on_input):
    T, H, I, E, k = 5, 6, 4, 3, 2
    x, w13, w2, w, ids, b13, b2 = make_inputs(T, H, I, E, k, dtype=torch.float64, gated=gated, bias=True)
    ids[0, 1] = -1  # a dropped slot
    if activation == "swiglu_oai":
        x = x * 3
    w = w.double()
    tensors = [t.detach().requires_grad_() for t in (x, w13, w2, w, b13, b2)]

    def f(x, w13, w2, w, b13, b2):
        return mk.fused_moe(x, w13, w2, w, ids, activation=activation, gated=gated, w13_bias=b13, w2_bias=b2,
                            apply_router_weight_on_input=on_input)

    assert torch.autograd.gradcheck(f, tuple(tensors))


def test_fused_moe_grads_match_naive_autograd():
    """Gradients of the op against autograd through the naive per-token implementation."""
    x, w13, w2, w, ids, b13, b2 = make_inputs(6, 8, 4, 3, 2, dtype=torch.float64, bias=True)
    w = w.double()
    leaves = [t.detach().requires_grad_() for t in (x, w13, w2, w, b13, b2)]
    g = torch.randn(6, 8, dtype=torch.float64)
    out = mk.fused_moe(leaves[0], leaves[1], leaves[2], leaves[3], ids, w13_bias=leaves[4], w2_bias=leaves[5])
    got = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().requires_grad_() for t in (x, w13, w2, w, b13, b2)]
    ref = naive.moe(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], ids, b13=ref_leaves[4], b2=ref_leaves[5])
    expected = torch.autograd.grad(ref, ref_leaves, g)
    for name, a, e in zip(("hidden", "w13", "w2", "topk_weights", "w13_bias", "w2_bias"), got, expected):
        assert_close(f"grad {name}", a, e, rms_tol=1e-10)


def test_fused_moe_opcheck():
    x, w13, w2, w, ids, b13, b2 = make_inputs(7, 16, 8, 4, 2, bias=True)
    args = (x.requires_grad_(), w13.requires_grad_(), w2, w.requires_grad_(), ids, "silu", True, b13, b2, False, None, None)
    torch.library.opcheck(torch.ops.moe_kernels.fused_moe.default, args)
    bwd_args = (torch.randn(7, 16),) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.moe_kernels.fused_moe_backward.default, bwd_args)
    h = torch.randn(9, 16, requires_grad=True)
    for kind in ("silu", "gelu", "relu", "swiglu_oai"):
        torch.library.opcheck(torch.ops.moe_kernels.activation.default, (h, kind, True))
        torch.library.opcheck(torch.ops.moe_kernels.activation_backward.default, (torch.randn(9, 8), h.detach(), kind, True))


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(hidden=torch.randn(5, 16, dtype=torch.float64)), TypeError, "w13 must have dtype"),
        (dict(w2=torch.randn(4, 16, 9)), ValueError, "w2 must have shape"),
        (dict(w13=torch.randn(4, 15, 16)), ValueError, "even number"),
        (dict(topk_ids=torch.randint(0, 4, (5, 2)).float()), TypeError, "topk_ids must have dtype"),
        (dict(topk_ids=torch.tensor([[0, 1]] * 4 + [[0, 4]])), ValueError, "topk_ids must hold values"),
        (dict(topk_weights=torch.rand(5, 3)), ValueError, "topk_weights must have shape"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(gated=False, activation="swiglu_oai"), ValueError, "activation"),
        (dict(w13_bias=torch.randn(4, 15)), ValueError, "w13_bias"),
        (dict(capacity=-1), ValueError, "capacity"),
        (dict(hidden=torch.randn(5, 16, device="meta")), ValueError, "device"),
    ],
)
def test_fused_moe_bad_input(change, err, match, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")  # strict mode: out-of-range ids raise
    args = dict(hidden=torch.randn(5, 16), w13=torch.randn(4, 16, 16), w2=torch.randn(4, 16, 8),
                topk_weights=torch.rand(5, 2), topk_ids=torch.randint(0, 4, (5, 2)))
    args.update(change)
    pos = [args.pop(n) for n in ("hidden", "w13", "w2", "topk_weights", "topk_ids")]
    with pytest.raises(err, match=match):
        mk.fused_moe(*pos, **args)


@pytest.mark.parametrize("kind,gated", [("silu", True), ("gelu", True), ("relu", False), ("swiglu_oai", True)])
def test_public_activation(kind, gated):
    h = torch.randn(9, 16, dtype=torch.float64) * 4
    a = mk.activation(h, kind, gated=gated)
    expected = torch.stack([naive.act(r, kind, gated) for r in h])
    assert_close("activation", a, expected, rms_tol=1e-12)
    with pytest.raises(ValueError, match="kind"):
        mk.activation(h, "tanh")
    with pytest.raises(ValueError, match="even number"):
        mk.activation(torch.randn(3, 5), "silu")
