"""The eager CPU path of the torch backend (moe_kernels._cpu_moe) against the reference and against the registered
op it stands in for, forward and backward, on the shapes that break plans; and what it runs, counted."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels as mk
from moe_kernels import _cpu_gemm, _cpu_moe, _torch_moe
from moe_kernels import reference as ref
from moe_kernels.testing import assert_close, tolerance


def _inputs(T, H, I, E, k, dtype, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    I2 = 2 * I if gated else I
    x = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    w13 = (torch.randn(E, I2, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, dtype=torch.float64) / I**0.5).to(dtype)
    b13 = torch.randn(E, I2, generator=g, dtype=torch.float64).to(dtype) if bias else None
    b2 = torch.randn(E, H, generator=g, dtype=torch.float64).to(dtype) if bias else None
    w = torch.rand(T, k, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    return x, w13, w2, w, ids, b13, b2


class _Ops(TorchDispatchMode):
    """The aten ops of a call, and the C kernels' calls (``cpu_gemm``, ``cpu_wgrad``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __enter__(self):
        fn = self._fn = _cpu_gemm._fn
        _cpu_gemm._fn = lambda name, dtype: self.ops.append(f"cpu_{name}") or fn(name, dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        _cpu_gemm._fn = self._fn
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


GEMMS = ("mm", "addmm", "_grouped_mm", "cpu_gemm", "cpu_wgrad")


@pytest.fixture(params=["c", "blas"])
def gemm(request, monkeypatch):
    """The CPU path's GEMMs: the C kernels (skipped where they cannot be built) or torch's (BLAS)."""
    if request.param == "c":
        if _cpu_gemm.lib() is None:
            pytest.skip("the CPU grouped GEMM kernels cannot be built here")
    else:
        monkeypatch.setitem(_cpu_gemm._state, "lib", None)
    return request.param


_VIEWS = {"view", "reshape", "_reshape_alias", "slice", "select", "transpose", "t", "unsqueeze", "as_strided", "alias",
          "detach", "expand", "_local_scalar_dense", "empty", "empty_strided", "empty_like", "squeeze", "lift_fresh",
          "promote_types", "split", "chunk"}


def _computing(ops):
    """The ops that compute (``fill_``: the suite's NaN poisoning of fresh outputs, not part of the call)."""
    return [o for o in ops if o not in _VIEWS and o != "fill_"]


def _run(path, leaves, ids, kw, grad_out):
    """Output and gradients of one call on ``path`` ("cpu": the eager CPU path, "op": the registered op)."""
    x, w13, w2, w, b13, b2 = leaves
    serves = _cpu_moe.serves
    try:
        if path == "op":
            _cpu_moe.serves = lambda *a: False
        out = _torch_moe.fused_moe(x, w13, w2, w, ids, kw.get("act", "silu"), kw.get("gated", True), b13, b2,
                                   kw.get("on_input", False), kw.get("capacity"), kw.get("expert_map"),
                                   kw.get("interleaved", False))
    finally:
        _cpu_moe.serves = serves
    want = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, want, grad_out.to(out.dtype), allow_unused=True) if want and out.requires_grad else ()
    return out, list(grads)


CASES = {
    "plain": dict(T=9, E=5, k=2),
    "one_token": dict(T=1, E=16, k=4),
    "zero_tokens": dict(T=0, E=3, k=1),
    "k1": dict(T=7, E=4, k=1),
    "k_eq_E": dict(T=6, E=3, k=3, bias=True),
    "E_odd_many": dict(T=40, E=7, k=3),
    "dropped": dict(T=8, E=4, k=2, drop=True),
    "all_dropped": dict(T=3, E=4, k=2, all_dropped=True),
    "bias": dict(T=7, E=3, k=2, bias=True),
    "on_input": dict(T=8, E=4, k=2, on_input=True, drop=True),
    "capacity": dict(T=12, E=4, k=2, capacity=3),
    "expert_map": dict(T=10, E=3, k=2, expert_map=True),
    "relu_plain": dict(T=9, E=5, k=2, act="relu", gated=False, bias=True),
    "gelu": dict(T=9, E=5, k=2, act="gelu"),
    "oai_interleaved": dict(T=9, E=5, k=2, act="swiglu_oai", interleaved=True, bias=True, drop=True),
    "oai_concat": dict(T=9, E=5, k=2, act="swiglu_oai"),
    "silu_interleaved": dict(T=9, E=5, k=2, interleaved=True),
    "transposed": dict(T=9, E=5, k=2, transposed=True, bias=True),
    "int32_ids": dict(T=9, E=5, k=2, id_dtype=torch.int32, drop=True),
    "uint8_ids": dict(T=9, E=5, k=2, id_dtype=torch.uint8),
    "mixed_sizes": dict(T=40, E=6, k=2, bias=True, mixed=True),  # experts over the row limit (BLAS) beside small ones
    "mixed_transposed": dict(T=40, E=6, k=2, transposed=True, mixed=True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path,gemm", [("cpu", "c"), ("cpu", "blas"), ("op", "c")], indirect=["gemm"])
def test_matches_reference(name, path, gemm, monkeypatch):
    c = CASES[name]
    T, E, k = c["T"], c["E"], c["k"]
    gated = c.get("gated", True)
    x, w13, w2, w, ids, b13, b2 = _inputs(T, 16, 8, E, k, torch.float64, gated, c.get("bias", False))
    if c.get("mixed"):  # the row limit at the median count: the C kernels take half the experts, BLAS the rest
        counts = torch.bincount(ids.flatten(), minlength=E).sort().values
        assert counts[E // 2 - 1] < counts[E // 2] < counts[-1], counts
        monkeypatch.setattr(_cpu_gemm, "MAX_ROWS", int(counts[E // 2]))
    if c.get("drop"):
        ids[1, 0], ids[2, k - 1] = -1, E + 3  # a dropped slot and an expert-parallel sentinel
    if c.get("all_dropped"):
        ids.fill_(-1)
    if c.get("act") == "swiglu_oai":
        x = x * 4  # past the clamps
    emap = torch.tensor([0, -1, 1, 2, -1], dtype=torch.int32) if c.get("expert_map") else None
    if emap is not None:
        ids = torch.randint(0, 5, (T, k), generator=torch.Generator().manual_seed(1))
    if "id_dtype" in c:
        ids = ids.clamp(min=0).to(c["id_dtype"]) if c["id_dtype"] == torch.uint8 else ids.to(c["id_dtype"])
    kw = dict(act=c.get("act", "silu"), gated=gated, on_input=c.get("on_input", False), capacity=c.get("capacity"),
              expert_map=emap, interleaved=c.get("interleaved", False))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w13, w2, w, b13, b2)]
    if c.get("transposed"):  # transformers' is_transposed weights: a transposed view of a contiguous parameter
        base13 = w13.transpose(1, 2).contiguous().requires_grad_()
        base2 = w2.transpose(1, 2).contiguous().requires_grad_()
        leaves[1], leaves[2] = base13.transpose(1, 2), base2.transpose(1, 2)
    g = torch.randn(T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, grads = _run(path, leaves, ids, kw, g)
    want = ref.fused_moe(x, w13, w2, w, ids, kw["act"], gated, b13, b2, kw["on_input"], kw["capacity"], emap,
                         kw["interleaved"])
    assert_close("out", out, want, rms_tol=1e-12)
    if T == 0:
        return
    exp = ref.fused_moe_backward(g, x, w13, w2, w, ids, kw["act"], gated, b13, b2, kw["on_input"], kw["capacity"], emap,
                                 kw["interleaved"])
    names = [n for n, t in zip(("hidden", "w13", "w2", "weights", "b13", "b2"), leaves) if t is not None]
    for n, got, e in zip(names, grads, [e for e, t in zip(exp, leaves) if t is not None]):
        assert got is not None, f"grad {n} missing"
        assert_close(f"grad {n}", got, e, rms_tol=1e-12)
        if c.get("transposed") and n in ("w13", "w2"):
            assert got.transpose(1, 2).is_contiguous(), f"grad {n} is not laid out as the transposed parameter"


@pytest.mark.parametrize("kind", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_fast_activations_match_the_reference(kind, interleaved):
    """The CPU path's SwiGLU and clamped SwiGLU (forward kept for the backward, and in place) against the
    reference's forward and backward in float64, at the clamp limits, past them, at +-inf and NaN."""
    h = torch.randn(37, 48, dtype=torch.float64) * 6
    lim = ref.OAI_LIMIT
    for (r, c), v in {(0, 0): float("nan"), (1, 3): lim, (2, 5): -lim, (3, 1): float("inf"), (4, 30): -float("inf"),
                      (5, 31): float("nan"), (6, 40): lim, (7, 41): -lim, (8, 2): 1e30}.items():
        h[r, c] = v
    g_a = torch.randn(37, 24, dtype=torch.float64)
    a, saved = _cpu_moe._activation(h, kind, True, interleaved, True)
    a_inplace, none = _cpu_moe._activation(h.clone(), kind, True, interleaved, False)
    want = ref.activation(h, kind, True, interleaved)
    assert saved is not None and none is None
    for got in (a, a_inplace):
        assert torch.allclose(got, want, rtol=1e-13, atol=1e-13, equal_nan=True)
    g_h = _cpu_moe._activation_backward(g_a, h, saved, kind, True, interleaved)
    assert torch.allclose(g_h, ref.activation_backward(g_a, h, kind, True, interleaved), rtol=1e-13, atol=1e-13,
                          equal_nan=True)


@pytest.mark.parametrize("gemm,loop,dtype", [("c", False, torch.float32), ("c", "mixed", torch.float32)] + [
    ("blas", loop, dtype) for loop in (True, False) for dtype in (torch.float32, torch.bfloat16)], indirect=["gemm"])
def test_grouped_mm_and_loop_agree(monkeypatch, gemm, loop, dtype):
    """Every GEMM strategy (the C kernels, alone and beside BLAS; BLAS: a loop over the experts with rows, one
    grouped_mm) on fp32 and bf16 (BLAS: the C kernels take fp32 and fp64), with the reference's tolerance; NaN in
    one token stays in that token."""
    monkeypatch.setattr(_cpu_moe, "LOOP_FRACTION", 10**6 if loop is True else 0)
    x, w13, w2, w, ids, b13, b2 = _inputs(24, 32, 16, 6, 2, dtype, bias=True)
    if loop == "mixed":  # the row limit at the median count: half the experts in C, the others in BLAS (fp32)
        counts = torch.bincount(ids.flatten(), minlength=6).sort().values
        assert counts[2] < counts[3] < counts[-1], counts
        monkeypatch.setattr(_cpu_gemm, "MAX_ROWS", int(counts[3]))
    ids[3, 1] = -1
    x[5, 7] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (x, w13, w2, w, b13, b2)]
    g = torch.randn(24, 32, dtype=torch.float64)
    g[5] = 0
    out, grads = _run("cpu", leaves, ids, {}, g)
    d = [t.double() for t in (x, w13, w2, w, b13, b2)]
    want = ref.fused_moe(d[0], d[1], d[2], d[3], ids, "silu", True, d[4], d[5])
    assert torch.isnan(out[5]).all() and torch.isfinite(torch.cat([out[:5], out[6:]])).all()
    tol = tolerance(dtype)
    keep = torch.ones(24, dtype=torch.bool)
    keep[5] = False
    assert_close("out", out[keep], want[keep], rms_tol=tol)
    x2 = x.clone()
    x2[5, 7] = 0
    d[0] = x2.double()
    exp = ref.fused_moe_backward(g, d[0], d[1], d[2], d[3], ids, "silu", True, d[4], d[5])
    assert_close("grad hidden", grads[0][keep], exp[0][keep], rms_tol=tol)
    assert_close("grad weights", grads[3][keep], exp[3][keep], rms_tol=tol)


def test_only_router_gradient(gemm):
    """Frozen experts: only the routing weights get a gradient, and the weight GEMMs do not run."""
    x, w13, w2, w, ids, _, _ = _inputs(10, 16, 8, 4, 2, torch.float64)
    wl = w.clone().requires_grad_()
    g = torch.randn(10, 16, dtype=torch.float64)
    with _Ops() as rec:
        out = _torch_moe.fused_moe(x, w13, w2, wl, ids, "silu", True, None, None, False, None, None)
        (gw,) = torch.autograd.grad(out, [wl], g)
    exp = ref.fused_moe_backward(g, x, w13, w2, w, ids)[3]
    assert_close("grad weights", gw, exp, rms_tol=1e-12)
    active = int(ids.unique().numel())
    gemms = [o for o in rec.ops if o in GEMMS]
    want = ["cpu_gemm"] * 2 if gemm == "c" else ["mm"] * (2 * active)
    assert gemms == want, rec.ops  # the forward's GEMMs only


def test_deterministic():
    x, w13, w2, w, ids, b13, b2 = _inputs(33, 32, 16, 5, 2, torch.float32, bias=True)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w13, w2, w, b13, b2)]
        out, grads = _run("cpu", leaves, ids, {}, torch.ones(33, 32))
        runs.append([out, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_errors_kept():
    x, w13, w2, w, ids, _, _ = _inputs(4, 16, 8, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.fused_moe(x, w13, w2, w, ids[:3])
    with pytest.raises(TypeError, match="w13"):
        mk.fused_moe(x, w13.double(), w2, w, ids)
    with pytest.raises(ValueError, match="w2"):
        mk.fused_moe(x, w13, w2[:, :, :4], w, ids)


def test_traced_calls_take_the_op():
    x, w13, w2, w, ids, _, _ = _inputs(4, 16, 8, 3, 2, torch.float32)
    assert _cpu_moe.serves(x, w13, w2)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert not _cpu_moe.serves(fx, mode.from_tensor(w13), mode.from_tensor(w2))


def _hf_grouped_mm_ops(x, w13, w2, w, ids):
    """The aten ops of transformers' grouped_mm experts on the same call (None without transformers >= 5)."""
    try:
        from transformers import MixtralConfig
        from transformers.integrations.moe import grouped_mm_experts_forward
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None
    E, I2, H = w13.shape
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I2 // 2, num_local_experts=E, num_experts_per_tok=ids.shape[1])
    ex = MixtralExperts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.copy_(w13)
        ex.down_proj.copy_(w2)
    with torch.no_grad(), _Ops() as rec:
        grouped_mm_experts_forward(ex, x, ids, w)
    return rec.ops


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (64, 8, 2), (16, 64, 8)])
def test_forward_runs_no_more_ops_than_transformers_grouped_mm(T, E, k, gemm):
    """Counted, not timed: the forward runs a fixed handful of ops around its GEMMs (one per expert with rows,
    or one grouped_mm), no more than transformers' grouped_mm experts run on the same call."""
    x, w13, w2, w, ids, _, _ = _inputs(T, 64, 32, E, k, torch.float32)
    ids = ids.long()
    with torch.no_grad():
        mk.fused_moe(x, w13, w2, w, ids)  # the first call caches the searchsorted boundaries
        with _Ops() as rec:
            mk.fused_moe(x, w13, w2, w, ids)
    ops = _computing(rec.ops)
    gemms = sum(o in GEMMS for o in ops)
    active = int(ids.unique().numel())
    assert gemms == 2 if gemm == "c" else gemms in (2, 2 * active), ops
    assert len(ops) - gemms <= 10, ops  # sort, searchsorted, //, 2 index_select, silu, mul, mul, zeros, index_add_
    hf = _hf_grouped_mm_ops(x, w13, w2, w, ids)
    if hf is not None:
        hf_ops = _computing(hf)
        hf_gemms = sum(o in GEMMS for o in hf_ops)
        assert len(ops) - gemms <= len(hf_ops) - hf_gemms, (ops, hf_ops)


def _mixtral_experts():
    """transformers' Mixtral experts (E = 4, H = 32, I = 16, fp64, random weights) on the registered backend."""
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moe_kernels.integrations.transformers import register

    register()
    cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "moe_kernels"
    ex = MixtralExperts(cfg).double()
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.2)
    return ex


@pytest.mark.parametrize("strict", ["0", "1"])
def test_hf_sentinels_dropped_in_both_value_modes(monkeypatch, strict):
    """transformers' expert-parallel sentinels (ids >= E) are dropped slots, also where the strict value mode
    rejects ids outside [0, E) and -1."""
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", strict)
    ex = _mixtral_experts()
    x = torch.randn(5, 32, dtype=torch.float64)
    ids = torch.tensor([[0, 4], [1, 2], [7, 3], [4, 5], [2, 0]])
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    out = ex(x, ids, w)
    kept = ids < 4
    want = ref.fused_moe(x, ex.gate_up_proj.detach(), ex.down_proj.detach(), w.detach(), torch.where(kept, ids, -1))
    assert_close("out", out, want, rms_tol=1e-12)
    assert out[3].abs().max() == 0
    out.sum().backward()
    assert (w.grad[~kept] == 0).all()


def test_hf_checked_signature_still_rejects_bad_input():
    """The transformers experts skip fused_moe's checks only for a call shaped exactly as one that passed them."""
    from moe_kernels.integrations import hf_experts

    ex = _mixtral_experts()
    x = torch.randn(6, 32, dtype=torch.float64)
    ids = torch.randint(0, 4, (6, 2))
    w = torch.rand(6, 2, dtype=torch.float64)
    first = ex(x, ids, w)
    assert hf_experts._CHECKED_ATTR in ex.__dict__
    again = ex(x, ids, w)  # the checked signature: straight to the CPU path
    assert torch.equal(first, again)
    assert_close("out", again, ref.fused_moe(x, ex.gate_up_proj.detach(), ex.down_proj.detach(), w, ids), rms_tol=1e-12)
    with pytest.raises(ValueError, match=r"H=16"):
        ex(x[:, :16], ids, w)
    with pytest.raises(TypeError, match="topk_ids"):
        ex(x, ids.double(), w)
    with pytest.raises(ValueError, match="topk_ids"):
        ex(x[:5], ids, w)
