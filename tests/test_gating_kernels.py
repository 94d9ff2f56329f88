"""The fast top-k gating kernels (Triton: interpreter on CPU, GPU where present; CUDA: where a GPU and
the extension are present) against the float64 reference."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import reference as ref
from moe_kernels.testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in ("triton", "cuda") if mk.backends()[b].available]
if not FAST:
    pytest.skip("no fast gating backend here: " + "; ".join(f"{b}: {mk.backends()[b].reason}" for b in ("triton", "cuda")),
                allow_module_level=True)

# (T, E, k, num_groups, topk_groups): the grid, trimmed for the interpreter
CASES = [
    (0, 8, 2, 1, 1), (1, 1, 1, 1, 1), (3, 2, 2, 1, 1), (1000, 8, 2, 1, 1), (37, 60, 4, 4, 2), (3, 64, 8, 8, 4),
    (5, 128, 8, 4, 1), (1000, 64, 8, 1, 1), (9, 256, 8, 8, 4), (3, 257, 8, 1, 1), (2, 257, 257, 1, 1),
    (4, 384, 8, 1, 1), (3, 512, 2, 8, 8), (1, 512, 512, 1, 1), (6, 60, 60, 4, 4),
]


def expected(logits, k, scoring, renormalize, bias, groups, topk_groups, scaling):
    return ref.topk_gating(logits.double(), k, scoring, renormalize, None if bias is None else bias.double(),
                           groups, topk_groups, scaling)


def check_ids(ids, exp_ids, sel):
    """Ids equal, except where the two candidates' selection scores are within 1e-6 relative."""
    assert ids.dtype == torch.int32
    diff = ids.cpu() != exp_ids.cpu()
    if diff.any():
        rows = diff.any(1).nonzero().flatten()
        for t in rows.tolist():
            a = sel[t, ids[t].long().cpu()]
            b = sel[t, exp_ids[t].long().cpu()]
            close = ((a - b).abs() <= 1e-6 * torch.maximum(a.abs(), b.abs())) | (a == b)
            assert close.all(), f"row {t}: ids {ids[t].tolist()} != {exp_ids[t].tolist()}"


@pytest.mark.parametrize("T,E,k,groups,topk_groups", CASES)
@pytest.mark.parametrize("scoring,renormalize,with_bias,scaling", [
    ("softmax", True, False, 1.0), ("sigmoid", True, True, 2.5), ("softmax", False, True, 1.0), ("sigmoid", False, False, 1.0)])
@pytest.mark.parametrize("backend", FAST)
def test_topk_gating_fast_matches_reference(backend, T, E, k, groups, topk_groups, scoring, renormalize, with_bias, scaling):
    logits = torch.randn(T, E, device=DEV) * 3
    bias = torch.randn(E, device=DEV) * 0.1 if with_bias else None
    w, ids = mk.topk_gating(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=bias,
                            num_groups=groups, topk_groups=topk_groups, scaling_factor=scaling, backend=backend)
    ew, eids = expected(logits, k, scoring, renormalize, bias, groups, topk_groups, scaling)
    s = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
    check_ids(ids, eids, (s + (bias.double() if bias is not None else 0)).cpu())
    if torch.equal(ids.cpu(), eids.cpu()):
        assert_close("topk_weights", w, ew, rms_tol=1e-6)
    assert w.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST)
def test_topk_gating_fast_low_precision_logits(backend, dtype):
    logits = (torch.randn(33, 60, device=DEV) * 2).to(dtype)
    w, ids = mk.topk_gating(logits, 4, num_groups=4, topk_groups=2, backend=backend)
    ew, eids = expected(logits, 4, "softmax", True, None, 4, 2, 1.0)
    check_ids(ids, eids, torch.softmax(logits.double(), -1).cpu())
    assert_close("topk_weights", w, ew, rms_tol=1e-6)


@pytest.mark.parametrize("kind", ["ties", "equal_rows", "neg_inf", "pos_inf", "nan", "huge", "all_nan"])
@pytest.mark.parametrize("scoring,groups", [("softmax", 1), ("sigmoid", 4)])
@pytest.mark.parametrize("backend", FAST)
def test_topk_gating_fast_adversarial(backend, kind, scoring, groups):
    T, E, k = 6, 16, 4
    logits = torch.randn(T, E, device=DEV)
    if kind == "ties":
        logits = torch.randint(0, 3, (T, E), device=DEV).float()
    elif kind == "equal_rows":
        logits = torch.full((T, E), 0.5, device=DEV)
    elif kind == "neg_inf":
        logits[:, ::3] = float("-inf")
    elif kind == "pos_inf":
        logits[:, 5] = float("inf")
    elif kind == "nan":
        logits[::2, 1::2] = float("nan")
    elif kind == "huge":
        logits = logits * 1e30
    elif kind == "all_nan":
        logits[:] = float("nan")
    bias = torch.zeros(E, device=DEV) if scoring == "sigmoid" else None
    w, ids = mk.topk_gating(logits, k, scoring=scoring, correction_bias=bias, num_groups=groups,
                            topk_groups=min(groups, 2), backend=backend)
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids.sort(1).values.diff(dim=1) > 0).all(), "ids of a token must be distinct"
    _, eids = expected(logits, k, scoring, True, bias, groups, min(groups, 2), 1.0)
    assert torch.equal(ids.cpu(), eids.cpu()), f"{kind}: {ids.tolist()} != {eids.tolist()}"


@pytest.mark.parametrize("scoring,renormalize,groups,with_bias", [
    ("softmax", True, 1, False), ("softmax", False, 4, False), ("sigmoid", True, 4, True), ("sigmoid", False, 1, True)])
@pytest.mark.parametrize("backend", FAST)
def test_topk_gating_fast_backward(backend, scoring, renormalize, groups, with_bias):
    T, E, k = 23, 32, 4
    logits = torch.randn(T, E, device=DEV, requires_grad=True)
    bias = torch.randn(E, device=DEV) * 0.1 if with_bias else None
    g = torch.randn(T, k, device=DEV)
    w, ids = mk.topk_gating(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=bias,
                            num_groups=groups, topk_groups=2 if groups > 1 else 1, scaling_factor=1.7, backend=backend)
    (w * g).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    ew, eids = mk.topk_gating(x64, k, scoring=scoring, renormalize=renormalize, correction_bias=bias,
                              num_groups=groups, topk_groups=2 if groups > 1 else 1, scaling_factor=1.7, backend="torch")
    assert torch.equal(ids, eids)
    (ew * g.double()).sum().backward()
    assert_close("grad logits", logits.grad, x64.grad, rms_tol=1e-6)


@pytest.mark.parametrize("backend", FAST)
def test_topk_gating_fast_backends_refuse_fp64(backend):
    with pytest.raises(ValueError, match="float64"):
        mk.topk_gating(torch.randn(3, 8, dtype=torch.float64, device=DEV), 2, backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_topk_gating_fast_noncontiguous_logits(backend):
    base = torch.randn(40, 24, device=DEV)
    logits = base.t()[:, :16]  # [24, 16] with strides (1, 24)
    w, ids = mk.topk_gating(logits, 3, backend=backend)
    ew, eids = expected(logits, 3, "softmax", True, None, 1, 1, 1.0)
    assert torch.equal(ids.cpu(), eids.cpu())
    assert_close("topk_weights", w, ew, rms_tol=1e-6)


def _schema_arity(op_name: str) -> int:
    """Arguments of a moe_kernels op's schema: the live op when registered, else (the CUDA ops without
    the extension) the schema text in csrc/torch_bindings.cpp."""
    packet = getattr(torch.ops.moe_kernels, op_name, None) if hasattr(torch.ops, "moe_kernels") else None
    if packet is not None:
        return len(packet.default._schema.arguments)
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "csrc" / "torch_bindings.cpp").read_text()
    joined = re.sub(r'"\s*"', "", text)  # join the C++ string literals split over lines
    schema = re.search(rf'"({op_name}\(.*?\) -> [^"]*)"', joined).group(1)
    return len(torch._C.parse_schema(schema).arguments)


def test_topk_gating_triton_compile_and_opcheck():
    """On a GPU: opcheck and torch.compile of the Triton op. Everywhere: the inputs are built and the
    argument list matches the op's schema, so a broken test body fails on CPU too."""
    logits = torch.randn(64, 128, device=DEV, requires_grad=True)
    bias = torch.randn(128, device=DEV)
    args = (logits, bias, 8, "sigmoid", True, 8, 4, 2.5, False, 2)
    assert len(args) == _schema_arity("topk_gating_triton")
    if "triton" not in FAST or not torch.cuda.is_available():
        pytest.skip("opcheck / torch.compile of a triton_op need a GPU (CPU tracing: tests/test_dynamic_shapes.py)")
    torch.library.opcheck(torch.ops.moe_kernels.topk_gating_triton.default, args)
    f = torch.compile(lambda x: mk.topk_gating(x, 8, backend="triton")[0].sum(), fullgraph=True, dynamic=True)
    for T in (17, 64):
        x = torch.randn(T, 128, device="cuda", requires_grad=True)
        f(x).backward()
        assert x.grad is not None


@pytest.mark.parametrize("backend", ["torch"] + [b for b in FAST if b == "triton"])
@pytest.mark.parametrize("scoring,groups", [("softmax", 1), ("sigmoid", 4)])
def test_gating_stats_fused(backend, scoring, groups):
    T, E, k = 301, 32, 4
    logits = torch.randn(T, E, device=DEV, requires_grad=True)
    w, ids, stats = mk.topk_gating(logits, k, scoring=scoring, num_groups=groups, topk_groups=min(groups, 2),
                                   return_stats=True, backend=backend)
    assert torch.equal(stats.tokens_per_expert.cpu(), torch.bincount(ids.flatten().long().cpu(), minlength=E).int())
    s = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
    q = s if scoring == "softmax" else s / s.sum(-1, keepdim=True)
    assert_close("score_sums", stats.score_sums, q.sum(0), rms_tol=1e-6)
    again = mk.topk_gating(logits, k, scoring=scoring, num_groups=groups, topk_groups=min(groups, 2),
                           return_stats=True, backend=backend)[2]
    assert torch.equal(again.score_sums, stats.score_sums), "stats must be bitwise reproducible"
    # The fused loss and the loss recomputed from the logits agree, gradients included.
    fused = mk.load_balancing_loss(stats=stats)
    plain = mk.load_balancing_loss(logits, ids, E, scoring=scoring)
    g_fused = torch.autograd.grad(fused + (w * 0.3).sum(), logits, retain_graph=True)[0]
    g_plain = torch.autograd.grad(plain + (w * 0.3).sum(), logits)[0]
    assert_close("loss", fused, plain, rms_tol=1e-6)
    assert_close("grad logits", g_fused, g_plain, rms_tol=1e-5)


def test_topk_gating_cuda_refusals_and_compile():
    """On a GPU with the extension: refusals, opcheck and torch.compile of the CUDA op. Everywhere: the
    inputs and the argument list against the schema in csrc/torch_bindings.cpp."""
    logits = torch.randn(32, 64, device=DEV)
    args = (logits, None, 4, "softmax", True, 1, 1, 1.0, 1)
    assert len(args) == _schema_arity("topk_gating_cuda")
    if "cuda" not in FAST:
        pytest.skip("needs the CUDA extension and a GPU")
    with pytest.raises(ValueError, match="num_groups <= 32"):
        mk.topk_gating(logits, 2, num_groups=64, topk_groups=2, backend="cuda")
    with pytest.raises(ValueError, match="triton kernel only"):
        mk.topk_gating(logits, 2, return_stats=True, backend="cuda")
    torch.library.opcheck(torch.ops.moe_kernels.topk_gating_cuda.default, args)
    f = torch.compile(lambda x: mk.topk_gating(x, 4, backend="cuda")[0], fullgraph=True)
    assert_close("compiled", f(logits), mk.topk_gating(logits, 4, backend="torch")[0], rms_tol=1e-6)


def test_cuda_gating_backward_chosen_at_call_time(monkeypatch):
    """The CUDA op's backward is looked up when backward runs: the Triton kernel once the triton backend
    is there, the reference op otherwise (not frozen at import, before the Triton op exists)."""
    from moe_kernels import _backends, _cuda

    ok = _backends.BackendInfo("triton", True, "")
    monkeypatch.setattr(_backends, "backends", lambda: {"triton": ok})
    assert _cuda.gating_backward_op() is torch.ops.moe_kernels.topk_gating_backward_triton.default
    gone = _backends.BackendInfo("triton", False, "not here")
    monkeypatch.setattr(_backends, "backends", lambda: {"triton": gone})
    assert _cuda.gating_backward_op() is torch.ops.moe_kernels.topk_gating_backward.default
