"""The torch backend's fused_moe (moe_kernels._torch_moe) against the reference op, forward and backward."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _torch_moe
from moe_kernels import reference as ref
from moe_kernels.testing import assert_close


def _inputs(T, H, I, E, k, dtype, bias):
    x = torch.randn(T, H, dtype=dtype)
    w13 = torch.randn(E, 2 * I, H, dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, dtype=dtype) / I**0.5
    b13 = torch.randn(E, 2 * I, dtype=dtype) if bias else None
    b2 = torch.randn(E, H, dtype=dtype) if bias else None
    w = torch.rand(T, k, dtype=dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if T > 2:
        ids[1, 0] = -1
    return x, w13, w2, w, ids, b13, b2


@pytest.mark.parametrize("case", [
    dict(T=9, E=5, k=2), dict(T=1, E=16, k=4), dict(T=0, E=3, k=1), dict(T=7, E=3, k=3, bias=True),
    dict(T=8, E=4, k=2, on_input=True), dict(T=12, E=4, k=2, capacity=3), dict(T=10, E=3, k=2, expert_map=True),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(case, dtype):
    T, E, k = case["T"], case["E"], case["k"]
    x, w13, w2, w, ids, b13, b2 = _inputs(T, 32, 16, E, k, dtype, case.get("bias", False))
    on_input, cap = case.get("on_input", False), case.get("capacity")
    emap = None
    if case.get("expert_map"):
        emap = torch.tensor([0, -1, 1, 2, -1], dtype=torch.int32)
        ids = torch.randint(0, 5, (T, k))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w13, w2, w, b13, b2)]
    out = _torch_moe.fused_moe(leaves[0], leaves[1], leaves[2], leaves[3], ids, "silu", True, leaves[4], leaves[5],
                               on_input, cap, emap)
    args = [t.detach().double() if t is not None else None for t in (x, w13, w2, w, ids.double(), b13, b2)]
    want = ref.fused_moe(args[0], args[1], args[2], args[3], ids, "silu", True, args[5], args[6], on_input, cap, emap)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close("out", out, want, rms_tol=tol)
    g = torch.randn_like(want)
    out.backward(g.to(dtype))
    grads = ref.fused_moe_backward(g, args[0], args[1], args[2], args[3], ids, "silu", True, args[5], args[6],
                                   on_input, cap, emap)
    for name, got, exp in zip(("hidden", "w13", "w2", "weights", "b13", "b2"),
                              (leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad,
                               leaves[4].grad if leaves[4] is not None else None,
                               leaves[5].grad if leaves[5] is not None else None), grads):
        if exp is not None and exp.numel():
            assert_close(f"grad {name}", got, exp, rms_tol=tol)


def test_opcheck():
    x, w13, w2, w, ids, b13, b2 = _inputs(6, 32, 16, 4, 2, torch.float32, True)
    for save in (False, True):
        args = (x.requires_grad_(save), w13, w2, w, ids, "silu", True, b13, b2, False, None, None, False, save)
        torch.library.opcheck(torch.ops.moe_kernels.fused_moe_torch.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_dynamic():
    f = torch.compile(lambda x, a, b, w, i: mk.fused_moe(x, a, b, w, i, backend="torch"), fullgraph=True, dynamic=True)
    for T in (5, 11):
        x, w13, w2, w, ids, _, _ = _inputs(T, 32, 16, 4, 2, torch.float32, False)
        x.requires_grad_()
        out = f(x, w13, w2, w, ids)
        want = ref.fused_moe(x.detach(), w13, w2, w, ids)
        assert_close("out", out, want.double(), rms_tol=1e-5)
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
