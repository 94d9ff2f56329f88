"""topk_gating against an independent per-token naive implementation written from the contract.

Contract (moe_kernels.topk_gating): scores s = softmax/sigmoid(logits) in fp32; selection by
s + correction_bias; optional group-limited selection; ids best first with ties to the lower index;
NaN logits and NaN selection scores rank below every number and weigh 0; weights are the unbiased s of
the chosen experts, renormalised if asked (softmax: the softmax of the selected logits; sigmoid: sum +
1e-20), times scaling_factor.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _backends
from moe_kernels.testing import assert_close, tolerance

NEAR_TIE = 1e-6  # relative gap below which fp32 vs fp64 scores may legitimately order differently
INF, NAN = math.inf, math.nan

# ----- naive implementation (plain Python per token, float64) ------------------------------------------


def _sigmoid(x: float) -> float:
    if math.isnan(x):
        return NAN
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softmax(row: list[float]) -> list[float]:
    """The non-finite rule: NaN weighs 0 and is left out; +inf entries share the mass; no finite or
    +inf entry: all 0."""
    vals = [v for v in row if not math.isnan(v)]
    n_inf = sum(v == INF for v in vals)
    if n_inf:
        return [1.0 / n_inf if v == INF else 0.0 for v in row]
    if not vals or all(v == -INF for v in vals):
        return [0.0] * len(row)
    m = max(vals)
    ex = [0.0 if math.isnan(v) else math.exp(v - m) for v in row]
    z = sum(ex)
    return [e / z for e in ex]


def naive_scores(row: list[float], scoring: str) -> list[float]:
    """Selection scores before the bias: NaN for a NaN logit (it ranks last), else the finite score."""
    s = _softmax(row) if scoring == "softmax" else [_sigmoid(v) for v in row]
    return [NAN if math.isnan(v) else x for v, x in zip(row, s)]


def _rank_key(v: float, idx: int):
    """Sort key: larger value first, NaN after every number, ties to the lower index."""
    return (1, 0.0, idx) if math.isnan(v) else (0, -v, idx)


def naive_group_scores(sel: list[float], num_groups: int, has_bias: bool) -> list[float]:
    n = len(sel) // num_groups
    out = []
    for g in range(num_groups):
        members = sorted((-INF if math.isnan(v) else v for v in sel[g * n:(g + 1) * n]), reverse=True)
        out.append(members[0] + members[1] if has_bias and n >= 2 else members[0])
    return out


def naive_select(sel: list[float], k: int, num_groups: int, topk_groups: int, has_bias: bool):
    E = len(sel)
    candidates = list(range(E))
    gscores: list[float] = []
    if num_groups > 1:
        n = E // num_groups
        gscores = naive_group_scores(sel, num_groups, has_bias)
        best = set(sorted(range(num_groups), key=lambda g: _rank_key(gscores[g], g))[:topk_groups])
        candidates = [e for e in range(E) if e // n in best]
    return sorted(candidates, key=lambda e: _rank_key(sel[e], e))[:k], gscores


def naive_weights(s: list[float], ids: list[int], scoring: str, renormalize: bool, scale: float,
                  row: list[float] | None = None) -> list[float]:
    """Unbiased scores of ``ids`` (NaN logits weigh 0); renormalised softmax weights are the softmax of
    the selected logits ``row[ids]``."""
    if renormalize and scoring == "softmax" and row is not None:
        return [x * scale for x in _softmax([row[e] for e in ids])]
    w = [0.0 if math.isnan(s[e]) else s[e] for e in ids]
    if renormalize:
        d = sum(w) + (1e-20 if scoring == "sigmoid" else 0.0)
        w = [x / d for x in w]
    return [x * scale for x in w]


def _has_near_tie(values: list[float]) -> bool:
    v = sorted(x for x in values if math.isfinite(x))
    return any(abs(a - b) <= NEAR_TIE * max(abs(a), abs(b)) for a, b in zip(v, v[1:]))


def check_gating(logits, k, w, ids, *, scoring="softmax", renormalize=True, bias=None, num_groups=1,
                 topk_groups=1, scale=1.0, allow_near_ties=True, check_weights=True):
    """Compare (w, ids) from topk_gating with the naive implementation on the same (quantized) inputs."""
    T, E = logits.shape
    assert ids.dtype == torch.int32, ids.dtype
    assert w.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32), w.dtype
    assert tuple(ids.shape) == (T, k) and tuple(w.shape) == (T, k)
    assert ids.device == logits.device and w.device == logits.device
    L = logits.detach().to(torch.float64).cpu().tolist()
    B = None if bias is None else bias.detach().to(torch.float64).cpu().tolist()
    got = ids.cpu().tolist()
    expected_w = []
    for t in range(T):
        row = got[t]
        assert all(0 <= e < E for e in row) and len(set(row)) == k, f"token {t}: invalid ids {row}"
        s = naive_scores(L[t], scoring)
        sel = s if B is None else [a + b for a, b in zip(s, B)]
        want, gscores = naive_select(sel, k, num_groups, topk_groups, B is not None)
        if row != want:
            tie = allow_near_ties and (_has_near_tie(sel) or _has_near_tie(gscores))
            assert tie, f"token {t}: topk_ids {row} != expected {want}"
            want = row  # a legitimate near-tie: check the weights of the ids actually chosen
        expected_w.append(naive_weights(s, want, scoring, renormalize, scale, L[t]))
    if check_weights:
        expected = torch.tensor(expected_w, dtype=torch.float64).reshape(T, k)
        assert_close("topk_weights", w, expected, rms_tol=tolerance(w.dtype))


def _bias(E: int, scoring: str, device, dtype=torch.float32) -> torch.Tensor:
    # Comparable to the score spread, so that the bias changes the selection without always dominating it.
    scale = 1.0 / E if scoring == "softmax" else 0.2
    return (torch.randn(E, dtype=torch.float64) * scale).to(dtype).to(device)


# ----- representative grid --------------------------------------------------------------------------


def _grid():
    rng = random.Random(1234)
    cases = []
    i = 0
    for E in (1, 2, 8, 60, 64, 257):
        for k in sorted({1, 2, 8, E}):
            if k > E:
                continue
            for scoring in ("softmax", "sigmoid"):
                T = (37, 3, 37, 1, 37, 0)[i % 6]
                groups, tg = 1, 1
                if E % 4 == 0 and E >= 8 and i % 2 == 0:
                    groups = 4
                    need = -(-k // (E // 4))
                    tg = rng.choice([t for t in range(max(need, 1), 5)])
                renorm = rng.random() < 0.5 if i % 3 else (i % 2 == 0)
                bias = i % 3 != 1
                scale = 2.5 if i % 4 in (1, 2) else 1.0
                cases.append((T, E, k, scoring, renorm, bias, groups, tg, scale))
                i += 1
    # DeepSeek-V3 style, groups of one expert with a bias, one group allowed, group scoring without bias
    cases += [
        (37, 256, 8, "sigmoid", True, True, 8, 4, 2.5),
        (11, 8, 3, "softmax", False, True, 8, 4, 1.0),
        (11, 8, 2, "sigmoid", True, False, 8, 2, 1.0),
        (19, 64, 8, "softmax", True, False, 4, 1, 1.0),
        (19, 60, 8, "sigmoid", False, True, 4, 1, 2.5),
    ]
    return cases


GRID = _grid()


@pytest.mark.parametrize("T,E,k,scoring,renorm,use_bias,groups,tg,scale", GRID,
                         ids=[f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-rn{int(c[4])}-b{int(c[5])}-g{c[6]}x{c[7]}-s{c[8]}" for c in GRID])
def test_topk_gating_matches_naive(device, T, E, k, scoring, renorm, use_bias, groups, tg, scale):
    logits = torch.randn(T, E, device=device) * 2
    bias = _bias(E, scoring, device) if use_bias else None
    w, ids = mk.topk_gating(logits, k, scoring=scoring, renormalize=renorm, correction_bias=bias,
                            num_groups=groups, topk_groups=tg, scaling_factor=scale)
    check_gating(logits, k, w, ids, scoring=scoring, renormalize=renorm, bias=bias, num_groups=groups,
                 topk_groups=tg, scale=scale)
    if renorm and T:
        assert_close("weight sums", w.sum(-1), torch.full((T,), scale, dtype=torch.float64), rms_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scoring,use_bias,groups,tg", [("softmax", False, 1, 1), ("sigmoid", True, 4, 2)])
def test_topk_gating_dtypes(device, dtype, scoring, use_bias, groups, tg):
    T, E, k = 37, 64, 8
    logits = (torch.randn(T, E, device=device) * 3).to(dtype)
    bias = _bias(E, scoring, device) if use_bias else None
    w, ids = mk.topk_gating(logits, k, scoring=scoring, correction_bias=bias, num_groups=groups,
                            topk_groups=tg, scaling_factor=2.5)
    # expected from the same quantized logits upcast to float64
    check_gating(logits, k, w, ids, scoring=scoring, bias=bias, num_groups=groups, topk_groups=tg, scale=2.5)


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float64])
def test_topk_gating_bias_dtypes(device, bias_dtype):
    T, E, k = 23, 16, 4
    logits = torch.randn(T, E, device=device)
    bias = _bias(E, "sigmoid", device, dtype=bias_dtype)
    w, ids = mk.topk_gating(logits, k, scoring="sigmoid", correction_bias=bias)
    check_gating(logits, k, w, ids, scoring="sigmoid", bias=bias)


def test_topk_gating_bias_changes_selection_not_weights(device):
    """The bias must steer the choice, yet the weights are the *unbiased* scores of the chosen experts."""
    T, E, k = 16, 8, 2
    logits = torch.randn(T, E, device=device)
    bias = torch.zeros(E, device=device)
    bias[E - 1] = 10.0  # force expert E-1 first
    bias[E - 2] = 5.0
    w, ids = mk.topk_gating(logits, k, scoring="sigmoid", renormalize=False, correction_bias=bias)
    assert ids[:, 0].eq(E - 1).all() and ids[:, 1].eq(E - 2).all()
    expected = torch.sigmoid(logits.double()[:, [E - 1, E - 2]])
    assert_close("topk_weights", w, expected, rms_tol=1e-6)
    check_gating(logits, k, w, ids, scoring="sigmoid", renormalize=False, bias=bias)


def test_topk_gating_groups_restrict_selection(device):
    """Group-limited routing differs from plain routing and every chosen expert lies in an allowed group."""
    T, E, G, tg, k = 37, 64, 8, 2, 6
    logits = torch.randn(T, E, device=device)
    bias = _bias(E, "sigmoid", device)
    w, ids = mk.topk_gating(logits, k, scoring="sigmoid", correction_bias=bias, num_groups=G, topk_groups=tg)
    _, plain = mk.topk_gating(logits, k, scoring="sigmoid", correction_bias=bias)
    assert not torch.equal(ids, plain), "grouping had no effect on 37 random tokens"
    assert all(len({e // (E // G) for e in row}) <= tg for row in ids.tolist())
    check_gating(logits, k, w, ids, scoring="sigmoid", bias=bias, num_groups=G, topk_groups=tg)


# ----- adversarial logits ----------------------------------------------------------------------------


def _valid(ids: torch.Tensor, E: int) -> None:
    for t, row in enumerate(ids.tolist()):
        assert all(0 <= e < E for e in row), f"token {t}: ids {row} out of [0, {E})"
        assert len(set(row)) == len(row), f"token {t}: repeated ids {row}"


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,use_bias", [(1, False), (1, True), (4, False), (4, True)])
def test_topk_gating_all_equal_logits(device, scoring, groups, use_bias):
    T, E, k = 5, 16, 6
    logits = torch.full((T, E), 0.37, device=device)
    bias = torch.zeros(E, device=device) if use_bias else None
    tg = min(groups, 2)
    w, ids = mk.topk_gating(logits, k, scoring=scoring, correction_bias=bias, num_groups=groups, topk_groups=tg)
    assert ids.tolist() == [list(range(k))] * T  # ties to the lower index (and lower group index)
    assert_close("topk_weights", w, torch.full((T, k), 1.0 / k, dtype=torch.float64), rms_tol=1e-6)
    check_gating(logits, k, w, ids, scoring=scoring, bias=bias, num_groups=groups, topk_groups=tg,
                 allow_near_ties=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_gating_ties_go_to_lower_index(device, scoring):
    T, E, k = 9, 12, 5
    logits = torch.randn(T, E, device=device)
    top = logits.max(dim=1).values + 1.0
    for t in range(T):  # three tied leaders at varying positions, the lowest index must come first
        pos = torch.randperm(E)[:3]
        logits[t, pos] = top[t]
    logits[T - 1] = logits[0]  # and an identical row
    w, ids = mk.topk_gating(logits, k, scoring=scoring)
    for t in range(T):
        leaders = sorted(torch.nonzero(logits[t] == logits[t].max()).flatten().tolist())
        assert len(leaders) == 3
        assert ids[t, :3].tolist() == leaders
    assert torch.equal(ids[0], ids[T - 1]) and torch.equal(w[0], w[T - 1])
    check_gating(logits, k, w, ids, scoring=scoring, allow_near_ties=False)


def test_topk_gating_group_ties_go_to_lower_group(device):
    T, E, G, k = 4, 16, 4, 2
    logits = torch.randn(T, E, device=device) - 5
    logits[:, 13] = 3.0  # group 3 and group 1 tie on their best score; group 1 must win with tg = 1
    logits[:, 6] = 3.0
    w, ids = mk.topk_gating(logits, k, num_groups=G, topk_groups=1)
    assert ids[:, 0].eq(6).all() and (ids // (E // G)).eq(1).all()
    check_gating(logits, k, w, ids, num_groups=G, topk_groups=1, allow_near_ties=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_gating_minus_inf(device, scoring, k):
    T, E = 7, 10
    logits = torch.randn(T, E, device=device)
    logits[torch.rand(T, E, device=device) < 0.4] = -INF
    logits[:, 4] = -INF
    logits[2, :] = -INF
    logits[2, 9] = 0.5  # a single finite logit
    w, ids = mk.topk_gating(logits, k, scoring=scoring)
    _valid(ids, E)
    check_gating(logits, k, w, ids, scoring=scoring, allow_near_ties=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_gating_plus_inf(device, scoring):
    T, E, k = 6, 10, 4
    logits = torch.randn(T, E, device=device)
    logits[0, 3] = INF
    logits[1, [2, 7]] = INF
    logits[2, :] = INF
    logits[3, 5], logits[3, 6] = INF, -INF
    w, ids = mk.topk_gating(logits, k, scoring=scoring)
    _valid(ids, E)
    if scoring == "sigmoid":  # sigmoid(+inf) = 1 is well defined: exact ids and weights
        check_gating(logits, k, w, ids, scoring=scoring, allow_near_ties=False)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,use_bias", [(1, False), (1, True), (2, True), (5, False)])
def test_topk_gating_nan(device, scoring, groups, use_bias):
    T, E, k = 8, 10, 3
    logits = torch.randn(T, E, device=device)
    logits[0, 0] = NAN
    logits[1, [1, 4, 8]] = NAN
    logits[2, :] = NAN
    logits[3, :-1] = NAN  # only the last logit is a number
    bias = _bias(E, scoring, device) if use_bias else None
    tg = {1: 1, 2: 1, 5: 2}[groups]  # groups of 10, 5 and 2 experts
    w, ids = mk.topk_gating(logits, k, scoring=scoring, correction_bias=bias, num_groups=groups, topk_groups=tg)
    _valid(ids, E)
    if groups == 1:  # NaN scores rank below every number, ties (NaN rows) to the lower index
        check_gating(logits, k, w, ids, scoring=scoring, bias=bias, allow_near_ties=False, check_weights=False)
        if scoring == "sigmoid":
            assert ids[3, 0].item() == E - 1
            assert all(e not in (1, 4, 8) for e in ids[1].tolist())
        assert ids[2].tolist() == list(range(k))


def test_topk_gating_nan_bias(device):
    T, E, k = 6, 8, 3
    logits = torch.randn(T, E, device=device)
    bias = torch.zeros(E, device=device)
    bias[[0, 5]] = NAN
    w, ids = mk.topk_gating(logits, k, scoring="sigmoid", correction_bias=bias)
    assert not (ids == 0).any() and not (ids == 5).any()
    check_gating(logits, k, w, ids, scoring="sigmoid", bias=bias, allow_near_ties=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_topk_gating_nan_ranks_below_minus_inf(device, backend):
    logits = torch.tensor([[NAN, 0.0, 0.0]], device=device)
    bias = torch.tensor([0.0, -INF, 0.0], device=device)
    _, ids = _call_or_skip(mk.topk_gating, logits, 3, scoring="sigmoid", correction_bias=bias, backend=backend)
    assert ids.tolist() == [[2, 1, 0]]  # selection scores [NaN, -inf, 0.5]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,use_bias", [(1, False), (4, True)])
def test_topk_gating_huge_magnitudes(device, scoring, groups, use_bias):
    T, E, k = 9, 16, 4
    logits = torch.randn(T, E, device=device) * 1e30
    logits[0] = 1e30
    logits[1] = -1e30
    logits[2, :8] = 1e30
    logits[2, 8:] = -1e30
    bias = _bias(E, scoring, device) if use_bias else None
    tg = min(groups, 2)
    w, ids = mk.topk_gating(logits, k, scoring=scoring, correction_bias=bias, num_groups=groups, topk_groups=tg)
    _valid(ids, E)
    assert torch.isfinite(w).all()
    check_gating(logits, k, w, ids, scoring=scoring, bias=bias, num_groups=groups, topk_groups=tg,
                 allow_near_ties=False)


def test_topk_gating_t0_and_e1(device):
    w, ids = mk.topk_gating(torch.randn(0, 8, device=device), 3, correction_bias=torch.randn(8, device=device),
                            num_groups=4, topk_groups=2)
    assert w.shape == (0, 3) and ids.shape == (0, 3) and ids.dtype == torch.int32 and w.dtype == torch.float32
    logits = torch.randn(5, 1, device=device)
    for scoring in ("softmax", "sigmoid"):
        w, ids = mk.topk_gating(logits, 1, scoring=scoring, renormalize=False)
        assert ids.eq(0).all()
        check_gating(logits, 1, w, ids, scoring=scoring, renormalize=False, allow_near_ties=False)


def test_topk_gating_noncontiguous_logits(device):
    base = torch.randn(20, 24, device=device)
    logits = base.t()[::2]  # [12, 20], non-contiguous
    bias = _bias(20, "sigmoid", device)
    w, ids = mk.topk_gating(logits, 3, scoring="sigmoid", correction_bias=bias)
    w2, ids2 = mk.topk_gating(logits.contiguous(), 3, scoring="sigmoid", correction_bias=bias)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)
    check_gating(logits, 3, w, ids, scoring="sigmoid", bias=bias)


def test_topk_gating_batch_invariant_and_deterministic(device):
    logits = torch.randn(37, 64, device=device)
    bias = _bias(64, "sigmoid", device)
    kw = dict(scoring="sigmoid", correction_bias=bias, num_groups=4, topk_groups=2, scaling_factor=2.5)
    w, ids = mk.topk_gating(logits, 8, **kw)
    w_again, ids_again = mk.topk_gating(logits, 8, **kw)
    assert torch.equal(w, w_again) and torch.equal(ids, ids_again)
    sub = [3, 17, 36]
    ws, ids_s = mk.topk_gating(logits[sub], 8, **kw)
    assert torch.equal(ws, w[sub]) and torch.equal(ids_s, ids[sub])


# ----- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("use_bias,groups,scale", [(False, 1, 1.0), (True, 4, 2.5)])
def test_topk_gating_gradcheck(device, scoring, renorm, use_bias, groups, scale):
    T, E, k = 4, 8, 3
    logits = torch.randn(T, E, dtype=torch.float64, device=device, requires_grad=True)
    bias = _bias(E, scoring, device, dtype=torch.float64) if use_bias else None

    def f(x):
        return mk.topk_gating(x, k, scoring=scoring, renormalize=renorm, correction_bias=bias,
                              num_groups=groups, topk_groups=min(groups, 2), scaling_factor=scale)[0]

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_gating_grad_low_precision(device, dtype):
    """The gradient for fp32/bf16 logits matches the float64 gradient (same selection) and keeps the dtype."""
    T, E, k = 13, 16, 4
    logits = torch.randn(T, E, device=device).to(dtype).requires_grad_()
    g = torch.randn(T, k, device=device)
    w, ids = mk.topk_gating(logits, k, scoring="sigmoid")
    (grad,) = torch.autograd.grad(w, logits, g)
    assert grad.dtype == dtype
    x64 = logits.detach().double().requires_grad_()
    w64, ids64 = mk.topk_gating(x64, k, scoring="sigmoid")
    assert torch.equal(ids, ids64)
    (grad64,) = torch.autograd.grad(w64, x64, g.double())
    assert_close("d logits", grad, grad64, rms_tol=tolerance(dtype))


def test_topk_gating_no_grad_to_bias(device):
    logits = torch.randn(5, 8, device=device, requires_grad=True)
    bias = _bias(8, "sigmoid", device).requires_grad_()
    w, _ = mk.topk_gating(logits, 2, scoring="sigmoid", correction_bias=bias)
    gl, gb = torch.autograd.grad(w.square().sum(), (logits, bias), allow_unused=True, materialize_grads=True)
    assert gl.abs().sum() > 0
    assert gb.eq(0).all()


# ----- opcheck ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias,groups,scoring,with_stats", [(False, 1, "softmax", False), (True, 4, "sigmoid", True),
                                                                 (False, 2, "softmax", True)])
def test_opcheck_topk_gating(device, use_bias, groups, scoring, with_stats):
    logits = torch.randn(6, 8, device=device, requires_grad=True)
    bias = _bias(8, scoring, device) if use_bias else None
    torch.library.opcheck(torch.ops.moe_kernels.topk_gating.default,
                          (logits, bias, 3, scoring, True, groups, 2, 2.5, with_stats, 2 if use_bias else 1))


def test_opcheck_topk_gating_backward(device):
    logits = torch.randn(6, 8, device=device)
    _, ids = mk.topk_gating(logits, 3)
    for scoring in ("softmax", "sigmoid"):
        for sums_grad in (None, torch.randn(8, device=device)):
            torch.library.opcheck(torch.ops.moe_kernels.topk_gating_backward.default,
                                  (torch.randn(6, 3, device=device), sums_grad, logits, ids, scoring, True, 2.5))


# ----- argument checks -------------------------------------------------------------------------------


def test_topk_gating_bad_arguments(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(TypeError, match="logits"):
        mk.topk_gating(torch.randint(0, 5, (4, 8), device=device), 2)
    with pytest.raises(TypeError, match="logits"):
        mk.topk_gating(x.tolist(), 2)
    with pytest.raises(ValueError, match="logits"):
        mk.topk_gating(torch.tensor(1.0, device=device), 1)  # [..., E] needs at least the expert dim
    with pytest.raises(ValueError, match="logits"):
        mk.topk_gating(torch.randn(4, 0, device=device), 1)
    for k in (0, -1, 9):
        with pytest.raises(ValueError, match="top_k"):
            mk.topk_gating(x, k)
    with pytest.raises(TypeError, match="top_k"):
        mk.topk_gating(x, 2.0)
    with pytest.raises(ValueError, match="scoring"):
        mk.topk_gating(x, 2, scoring="relu")
    with pytest.raises(ValueError, match="correction_bias"):
        mk.topk_gating(x, 2, correction_bias=torch.randn(7, device=device))
    with pytest.raises(ValueError, match="correction_bias"):
        mk.topk_gating(x, 2, correction_bias=torch.randn(1, 8, device=device))
    with pytest.raises(TypeError, match="correction_bias"):
        mk.topk_gating(x, 2, correction_bias=torch.ones(8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="num_groups"):
        mk.topk_gating(x, 2, num_groups=3)
    with pytest.raises(ValueError, match="num_groups"):
        mk.topk_gating(x, 2, num_groups=0)
    with pytest.raises(ValueError, match="topk_groups"):
        mk.topk_gating(x, 2, num_groups=4, topk_groups=5)
    with pytest.raises(ValueError, match="topk_groups"):
        mk.topk_gating(x, 2, num_groups=4, topk_groups=0)
    with pytest.raises(ValueError, match="topk_groups"):
        mk.topk_gating(x, 5, num_groups=4, topk_groups=2)  # 2 groups of 2 experts cannot hold 5
    with pytest.raises(TypeError, match="scaling_factor"):
        mk.topk_gating(x, 2, scaling_factor="2")
    with pytest.raises(ValueError, match="backend"):
        mk.topk_gating(x, 2, backend="numpy")


def test_topk_gating_mixed_devices():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="correction_bias"):
        mk.topk_gating(x, 2, correction_bias=torch.randn(8, device="meta"))


def test_topk_gating_unavailable_backends(device, monkeypatch):
    x = torch.randn(4, 8, device=device)
    info = mk.backends()
    if not info["cuda"].available or device.type != "cuda":
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve") as err:
            mk.topk_gating(x, 2, backend="cuda")
        assert len(str(err.value).split("cannot serve these inputs:")[1].strip()) > 10  # says why
    if device.type == "cpu":
        # without the interpreter, Triton cannot run on CPU tensors
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        _backends._triton_status.cache_clear()
        try:
            with pytest.raises(ValueError, match="backend 'triton' cannot serve") as err:
                mk.topk_gating(x, 2, backend="triton")
            assert len(str(err.value).split("cannot serve these inputs:")[1].strip()) > 10
        finally:
            _backends._triton_status.cache_clear()


def _call_or_skip(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        if "cannot serve these inputs" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("T,E,k", [(9, 64, 8), (0, 8, 2), (1, 1, 1), (5, 257, 8), (4, 64, 64), (6, 16, 1)])
def test_topk_gating_every_backend(device, backend, T, E, k):
    """Each backend that serves these inputs meets the contract (skipped where it cannot serve them)."""
    logits = torch.randn(T, E, device=device)
    if T >= 4:
        logits[1] = 0.25  # an all-equal row: ties to the lower index
        logits[2, E // 2] = NAN
        logits[3, :] = -INF
        logits[3, E - 1] = 1.0
    bias = _bias(E, "sigmoid", device)
    G = 4 if E % 4 == 0 else 1
    configs = (dict(scoring="softmax"),
               dict(scoring="sigmoid", correction_bias=bias, num_groups=G, topk_groups=max(min(G, 2), -(-k * G // E)),
                    scaling_factor=2.5),
               dict(scoring="softmax", renormalize=False, num_groups=E if E <= 64 else 1,
                    topk_groups=min(E, max(k, 3)) if E <= 64 else 1))
    for kw in configs:
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            w, ids, st = _call_or_skip(mk.topk_gating, x, k, backend=backend, return_stats=True, **kw)
            _valid(ids, E)
            ok = torch.ones(T, dtype=torch.bool)
            if kw["scoring"] == "softmax" and T >= 4:
                ok[2] = False  # a NaN logit makes the whole softmax row NaN: ids validity only
            check_gating(x[ok], k, w[ok], ids[ok], scoring=kw["scoring"], renormalize=kw.get("renormalize", True),
                         bias=kw.get("correction_bias"), num_groups=kw.get("num_groups", 1),
                         topk_groups=kw.get("topk_groups", 1), scale=kw.get("scaling_factor", 1.0))
            if "correction_bias" not in kw and T > 1:
                assert ids[1].tolist() == list(range(k))
            counts = [0] * E
            for e in ids.flatten().tolist():
                counts[e] += 1
            assert st.tokens_per_expert.tolist() == counts
