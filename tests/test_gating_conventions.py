"""topk_gating against the conventions of peer projects, each written here as a reference (not imported):
TransformerEngine/Megatron (softmax of the selected logits, sqrtsoftplus, group score = sum of the top
k/topk_groups), DeepSeek-V2/V3 (group max / top-2 sum), vLLM (finite weights for non-finite logits);
plus the k=1 gradient, N-D logits and the issue's 0/0 example. Every backend that runs here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from moe_kernels.testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + [b for b in ("triton", "cuda") if mk.backends()[b].available]
INF, NAN = math.inf, math.nan


def _call(backend, logits, k, **kw):
    try:
        return mk.topk_gating(logits, k, backend=backend, **kw)
    except ValueError as exc:
        if backend != "torch" and "cannot serve" in str(exc):
            pytest.skip(str(exc))
        raise


# ----- peer references (float64, plain torch) -----------------------------------------------------------


def te_router(logits, topk, score_function, *, use_pre_softmax=False, num_groups=1, group_topk=1, scaling=1.0,
              expert_bias=None):
    """TransformerEngine / Megatron ``topk_routing_with_score_function`` (float64): softmax either
    before the top-k or of the k selected logits; sigmoid / sqrtsoftplus scores selected with the
    bias, weighted without it, normalised by ``sum + 1e-20`` when topk > 1; groups scored by the sum of
    their top ``topk // group_topk`` (biased) scores. Returns ``(probs [T, k], ids [T, k])``."""
    x = logits.double()
    T, E = x.shape
    if score_function == "softmax":
        scores = torch.softmax(x, -1) if use_pre_softmax else x
    elif score_function == "sigmoid":
        scores = torch.sigmoid(x)
    else:
        scores = F.softplus(x).sqrt()
    sel = scores + expert_bias.double() if expert_bias is not None and score_function != "softmax" else scores
    if num_groups > 1:
        gs = E // num_groups
        group_scores = sel.view(T, num_groups, gs).topk(topk // group_topk, dim=-1).values.sum(-1)
        keep = torch.zeros(T, num_groups, dtype=torch.bool).scatter_(1, group_scores.topk(group_topk, -1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(gs, 1), -INF)
    ids = sel.topk(topk, dim=-1).indices
    probs = scores.gather(1, ids)
    if score_function == "softmax" and not use_pre_softmax:
        probs = torch.softmax(probs, -1)
    elif score_function != "softmax" and topk > 1:
        probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
    return probs * scaling, ids


def deepseek_grouped(logits, topk, num_groups, topk_groups, rule, bias=None):
    """DeepSeek-V2 (``rule="max"``: a group's score is its best expert's) and V3 (``"top2_sum"``: the sum
    of its two best biased scores) group-limited selection, sigmoid scores. Returns the ids."""
    s = torch.sigmoid(logits.double())
    sel = s + bias.double() if bias is not None else s
    T, E = sel.shape
    g = sel.view(T, num_groups, E // num_groups)
    group_scores = g.max(-1).values if rule == "max" else g.topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, num_groups, dtype=torch.bool).scatter_(1, group_scores.topk(topk_groups, -1).indices, True)
    return sel.masked_fill(~keep.repeat_interleave(E // num_groups, 1), -INF).topk(topk, -1).indices


def vllm_rule(logits, topk):
    """The non-finite contract, written per row: NaN ranks last and weighs 0; +inf experts rank first and
    share the weight (the others then score 0 and tie, to the lower id); otherwise the softmax of the
    finite logits; weights renormalised over the k."""
    T, E = logits.shape
    w_out, id_out = [], []
    for row in logits.double().tolist():
        n_inf = sum(v == INF for v in row)
        finite = [v for v in row if math.isfinite(v)]
        m = max(finite) if finite else 0.0

        def score(v):
            if math.isnan(v):
                return 0.0
            if n_inf:
                return 1.0 if v == INF else 0.0
            return math.exp(v - m) if v != -INF else 0.0

        rank = sorted(range(E), key=lambda e: (math.isnan(row[e]), -score(row[e]), e))  # by score, ties to the lower id
        ids = rank[:topk]
        w = [score(row[e]) for e in ids]
        d = sum(w)
        w_out.append([v / d if d > 0 else 0.0 for v in w])
        id_out.append(ids)
    return torch.tensor(w_out, dtype=torch.float64), torch.tensor(id_out)


# ----- Numerics: softmax renormalisation is the softmax of the selected logits ---------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_renormalised_softmax_never_divides_zero_by_zero(backend):
    """fp32 probabilities of the bias-selected experts underflow to 0: the old 0/0 gave [nan, nan]."""
    logits = torch.tensor([[0.0, -200.0, -200.0, -200.0]], device=DEV)
    bias = torch.tensor([-10.0, 0.0, 0.0, 0.0], device=DEV)
    w, ids = _call(backend, logits, 2, correction_bias=bias)
    assert ids.tolist() == [[1, 2]]
    assert w.tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pre_softmax", [False, True])
def test_softmax_matches_transformer_engine(backend, pre_softmax):
    """TE without pre-softmax: the weights are the softmax of the k selected logits (our renormalised
    softmax). With pre-softmax: the unnormalised probabilities, here with groups scored on them."""
    T, E, k = 23, 32, 4
    groups, tg = (4, 2) if pre_softmax else (1, 1)
    logits = torch.randn(T, E, device=DEV) * 3
    w, ids = _call(backend, logits, k, renormalize=not pre_softmax, num_groups=groups, topk_groups=tg,
                   group_score="topk_sum", scaling_factor=2.5)
    ew, eids = te_router(logits.cpu(), k, "softmax", use_pre_softmax=pre_softmax, num_groups=groups, group_topk=tg,
                         scaling=2.5)
    assert torch.equal(ids.cpu().long(), eids)
    assert_close("topk_weights", w, ew, rms_tol=1e-6)


# ----- k = 1 with renormalisation: the weight is the constant 1 ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_k1_renormalised_weight_is_one_and_its_gradient_exactly_zero(backend, scoring):
    logits = (torch.randn(19, 12, device=DEV) * 2).requires_grad_()
    w, _ = _call(backend, logits, 1, scoring=scoring, scaling_factor=1.5)
    assert torch.equal(w, torch.full_like(w, 1.5))
    (w * torch.randn_like(w)).sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad)), logits.grad.abs().max()


# ----- N-D logits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nd_logits_keep_their_leading_dims(backend):
    B, S, E, k = 3, 5, 16, 3
    logits = torch.randn(B, S, E, device=DEV, requires_grad=True)
    bias = torch.randn(E, device=DEV) * 0.1
    kw = dict(scoring="sigmoid", correction_bias=bias, num_groups=4, topk_groups=2, return_stats=backend != "cuda")
    out = _call(backend, logits, k, **kw)
    flat = logits.detach().reshape(B * S, E).requires_grad_()
    ref = _call(backend, flat, k, **kw)
    assert out[0].shape == (B, S, k) and out[1].shape == (B, S, k)
    assert torch.equal(out[1].reshape(-1, k), ref[1]) and torch.equal(out[0].reshape(-1, k), ref[0])
    g = torch.randn(B, S, k, device=DEV)
    loss = (out[0] * g).sum()
    loss_ref = (ref[0] * g.reshape(-1, k)).sum()
    if kw["return_stats"]:
        assert out[2].num_tokens == B * S
        assert torch.equal(out[2].tokens_per_expert, ref[2].tokens_per_expert)
        assert torch.equal(out[2].score_sums, ref[2].score_sums)
        loss = loss + mk.load_balancing_loss(stats=out[2])
        loss_ref = loss_ref + mk.load_balancing_loss(stats=ref[2])
    loss.backward()
    loss_ref.backward()
    assert torch.equal(logits.grad.reshape(-1, E), flat.grad)
    one = _call(backend, torch.randn(E, device=DEV), k)  # a single token: [E] -> [k]
    assert one[0].shape == (k,) and one[1].shape == (k,)


# ----- non-finite logits ---------------------------------------------------------------------------------


def _adversarial(T=8, E=12):
    logits = torch.randn(T, E)
    logits[0, [1, 4]] = NAN  # some NaN
    logits[1, :] = NAN  # no number at all
    logits[2, 7] = INF  # one +inf
    logits[3, [2, 9, 10]] = INF  # several +inf
    logits[4, :] = -INF  # no finite logit
    logits[5, :] = torch.tensor([NAN, -INF] * (E // 2))  # NaN and -inf only
    logits[6, 3] = INF
    logits[6, 5] = NAN
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_follow_the_rule(backend):
    logits = _adversarial().to(DEV)
    k = 4
    w, ids = _call(backend, logits, k)
    ew, eids = vllm_rule(logits.cpu(), k)
    assert torch.isfinite(w).all(), w
    assert ((ids >= 0) & (ids < logits.shape[1])).all() and (ids.sort(1).values.diff(dim=1) > 0).all()
    assert torch.equal(ids.cpu().long(), eids), (ids, eids)
    assert_close("topk_weights", w, ew, rms_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_non_finite_logits_give_finite_weights_and_gradients(backend, scoring, renormalize):
    logits = _adversarial().to(DEV).requires_grad_()
    k = 4
    w, ids = _call(backend, logits, k, scoring=scoring, renormalize=renormalize, num_groups=2, topk_groups=2)
    assert torch.isfinite(w).all(), w
    assert ((ids >= 0) & (ids < 12)).all() and (ids.sort(1).values.diff(dim=1) > 0).all()
    nan_chosen = torch.isnan(logits.detach().gather(1, ids.long()))
    assert (w[nan_chosen] == 0).all(), "a NaN logit weighs 0"
    inf_rows = (logits.detach() == INF).any(1)
    first = logits.detach().gather(1, ids.long()[:, :1])[:, 0]
    assert (first[inf_rows] == INF).all(), "+inf ranks first"
    if backend == "cuda":
        return  # the backward runs on the triton or torch backend
    (w * torch.randn_like(w)).sum().backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    assert (g[~torch.isfinite(logits.detach())] == 0).all(), "no gradient reaches a non-finite logit"
    x64 = logits.detach().double().requires_grad_()
    w64, ids64 = mk.topk_gating(x64, k, scoring=scoring, renormalize=renormalize, num_groups=2, topk_groups=2,
                                backend="torch")
    assert torch.equal(ids.cpu(), ids64.cpu())
    assert_close("topk_weights", w, w64, rms_tol=1e-6)


# ----- scoring="sqrtsoftplus" ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,groups,with_bias", [(1, 1, False), (4, 1, True), (6, 4, True), (8, 8, False)])
def test_sqrtsoftplus_matches_megatron(backend, k, groups, with_bias):
    T, E = 21, 64
    logits = (torch.randn(T, E, device=DEV) * 4).requires_grad_()
    bias = torch.randn(E, device=DEV) * 0.3 if with_bias else None
    tg = 2 if groups > 1 else 1
    kw = dict(scoring="sqrtsoftplus", renormalize=k > 1, correction_bias=bias, num_groups=groups, topk_groups=tg,
              group_score="topk_sum", scaling_factor=1.5)
    w, ids = _call(backend, logits, k, **kw)
    x64 = logits.detach().cpu().double().requires_grad_()
    ew, eids = te_router(x64, k, "sqrtsoftplus", num_groups=groups, group_topk=tg, scaling=1.5,
                         expert_bias=None if bias is None else bias.cpu())
    assert torch.equal(ids.cpu().long(), eids)
    assert_close("topk_weights", w, ew, rms_tol=1e-6)
    if backend == "cuda":
        return
    g = torch.randn(T, k, device=DEV)
    (w * g).sum().backward()
    (ew * g.cpu().double()).sum().backward()
    assert_close("grad logits", logits.grad, x64.grad, rms_tol=1e-5)


def test_sqrtsoftplus_tiny_and_huge_logits_are_accurate():
    x = torch.tensor([[-90.0, -40.0, -15.0, -1e-3, 0.0, 19.5, 20.5, 1e30]])
    want = F.softplus(x.double()).sqrt()
    for backend in BACKENDS:
        w, ids = _call(backend, x.to(DEV), 8, scoring="sqrtsoftplus", renormalize=False)
        got = torch.empty(1, 8, dtype=torch.float64).scatter_(1, ids.cpu().long(), w.cpu().double())
        assert_close(f"sqrtsoftplus scores ({backend})", got, want, rms_tol=1e-6)


# ----- group score rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["max", "top2_sum", "topk_sum"])
def test_group_score_rules_match_their_peers(backend, rule):
    T, E, k, G, tg = 29, 64, 8, 8, 3
    logits = torch.randn(T, E, device=DEV) * 2
    bias = torch.randn(E, device=DEV) * 0.2
    _, ids = _call(backend, logits, k, scoring="sigmoid", correction_bias=bias, num_groups=G, topk_groups=tg,
                   group_score=rule)
    if rule == "topk_sum":
        _, want = te_router(logits.cpu(), k, "sigmoid", num_groups=G, group_topk=tg, expert_bias=bias.cpu())
    else:
        want = deepseek_grouped(logits.cpu(), k, G, tg, rule, bias.cpu())
    assert torch.equal(ids.cpu().long(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_score_default_is_unchanged(backend):
    logits = torch.randn(17, 32, device=DEV)
    bias = torch.randn(32, device=DEV) * 0.2
    kw = dict(scoring="sigmoid", num_groups=4, topk_groups=2)
    base = _call(backend, logits, 4, correction_bias=bias, **kw)[1]
    assert torch.equal(base, _call(backend, logits, 4, correction_bias=bias, group_score="top2_sum", **kw)[1])
    assert torch.equal(_call(backend, logits, 4, **kw)[1], _call(backend, logits, 4, group_score="max", **kw)[1])


def test_group_score_and_scoring_arguments_are_checked():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="group_score"):
        mk.topk_gating(x, 2, num_groups=4, topk_groups=2, group_score="mean")
    with pytest.raises(ValueError, match="topk_sum"):
        mk.topk_gating(x, 2, num_groups=4, topk_groups=3, group_score="topk_sum")
    with pytest.raises(ValueError, match="scoring"):
        mk.topk_gating(x, 2, scoring="softplus")
    with pytest.raises(ValueError, match="group_score"):
        mk.MoE(16, 32, 16, 2, group_score="sum")


def test_moe_layer_passes_scoring_and_group_score():
    torch.manual_seed(0)
    moe = mk.MoE(16, 32, 16, 4, scoring="sqrtsoftplus", num_groups=4, topk_groups=2, group_score="topk_sum",
                 correction_bias=True, aux_loss_coef=0.01)
    with torch.no_grad():
        moe.correction_bias.normal_(0, 0.2)
    x = torch.randn(2, 5, 16)
    logits, w, ids, _ = moe.route(x.reshape(-1, 16))
    ew, eids = mk.topk_gating(logits, 4, scoring="sqrtsoftplus", correction_bias=moe.correction_bias, num_groups=4,
                              topk_groups=2, group_score="topk_sum")
    assert torch.equal(ids, eids) and torch.equal(w, ew)
    out = moe(x)
    (out.square().mean() + moe.aux_loss).backward()
    assert torch.isfinite(moe.router.weight.grad).all()
