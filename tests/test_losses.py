"""Auxiliary losses and routing statistics against naive per-token implementations.

Covers load_balancing_loss, router_z_loss, expert_counts, routing_stats and update_correction_bias
(contracts: the docstrings in moe_kernels/gating.py).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close, tolerance

# ----- naive implementations (plain Python, float64) ---------------------------------------------------


def naive_counts(ids: list[list[int]], E: int) -> list[int]:
    c = [0] * E
    for row in ids:
        for e in row:
            if 0 <= e < E:
                c[e] += 1
    return c


def naive_probs(row: list[float], scoring: str) -> list[float]:
    if scoring == "softmax":
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        z = sum(ex)
        return [e / z for e in ex]
    s = [1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v)) for v in row]
    z = sum(s) + 1e-20
    return [x / z for x in s]


def naive_lbl(logits: torch.Tensor, ids: torch.Tensor, E: int, scoring: str) -> float:
    """E * sum_e f_e * P_e, f_e over the routed (non-dropped) pairs, P_e the mean probability."""
    L = logits.detach().double().cpu().tolist()
    I = ids.cpu().tolist()
    T = len(L)
    P = [0.0] * E
    for row in L:
        for e, p in enumerate(naive_probs(row, scoring)):
            P[e] += p / T
    counts = naive_counts(I, E)
    routed = sum(counts)
    if routed == 0:
        return 0.0
    return E * sum(c / routed * p for c, p in zip(counts, P))


def naive_z_loss(logits: torch.Tensor) -> float:
    L = logits.detach().double().cpu().tolist()
    if not L:
        return 0.0
    total = 0.0
    for row in L:
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse * lse
    return total / len(L)


def random_ids(T: int, k: int, E: int, device, *, drop: float = 0.0, dtype=torch.int32) -> torch.Tensor:
    """k distinct experts per token (like top-k), a fraction ``drop`` of them set to -1."""
    if T == 0:
        return torch.empty(0, k, dtype=dtype, device=device)
    ids = torch.rand(T, E).argsort(dim=1)[:, :k]
    if drop:
        ids[torch.rand(T, k) < drop] = -1
    return ids.to(dtype).to(device)


def _f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ----- expert_counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T,k,E,drop", [(0, 2, 8, 0.0), (1, 1, 1, 0.0), (3, 2, 2, 0.3), (37, 8, 60, 0.2),
                                        (37, 2, 257, 0.0), (37, 64, 64, 0.1)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_expert_counts_matches_naive(device, T, k, E, drop, dtype):
    ids = random_ids(T, k, E, device, drop=drop, dtype=dtype)
    got = mk.expert_counts(ids, E)
    assert got.dtype == torch.int32 and got.shape == (E,) and got.device == ids.device
    assert got.tolist() == naive_counts(ids.tolist(), E)


def test_expert_counts_noncontiguous(device):
    big = torch.randint(-1, 12, (10, 40), device=device)
    for ids in (big[:, ::5], big.t()[::3], big.t().contiguous().t()):
        assert not ids.is_contiguous()
        assert mk.expert_counts(ids, 12).tolist() == naive_counts(ids.tolist(), 12)


def test_expert_counts_bad_arguments(device, monkeypatch):
    with pytest.raises(TypeError, match="topk_ids"):
        mk.expert_counts(torch.rand(3, 2, device=device), 4)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.expert_counts(torch.zeros(6, dtype=torch.int32, device=device) + 1, 4)
    with pytest.raises(ValueError, match="num_experts"):
        mk.expert_counts(torch.ones(3, 2, dtype=torch.int32, device=device), 0)
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")  # strict mode: out-of-range ids raise
    with pytest.raises(ValueError, match="topk_ids"):
        mk.expert_counts(torch.tensor([[0, 4]], device=device), 4)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.expert_counts(torch.tensor([[0, -2]], device=device), 4)


def test_expert_counts_backends(device):
    ids = random_ids(9, 3, 8, device, drop=0.2)
    want = naive_counts(ids.tolist(), 8)
    for backend in ("auto", "torch", "triton", "cuda"):
        try:
            got = mk.expert_counts(ids, 8, backend=backend)
        except ValueError as exc:  # a backend that cannot serve CPU tensors must say so
            assert f"backend '{backend}' cannot serve these inputs:" in str(exc)
            assert backend in ("triton", "cuda")
            continue
        assert got.dtype == torch.int32 and got.tolist() == want, backend
    with pytest.raises(ValueError, match="backend"):
        mk.expert_counts(ids, 8, backend="numba")


def test_opcheck_expert_counts(device):
    ids = random_ids(9, 3, 8, device, drop=0.2)
    torch.library.opcheck(torch.ops.moe_kernels.expert_counts.default, (ids, 8))


# ----- load_balancing_loss ---------------------------------------------------------------------------

LBL_CASES = [(0, 2, 8), (1, 1, 1), (3, 2, 2), (37, 2, 8), (37, 8, 60), (37, 8, 257), (16, 64, 64)]


@pytest.mark.parametrize("T,k,E", LBL_CASES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_load_balancing_loss_matches_naive(device, T, k, E, scoring):
    logits = torch.randn(T, E, device=device) * 2
    ids = random_ids(T, k, E, device)
    loss = mk.load_balancing_loss(logits, ids, E, scoring=scoring)
    assert loss.dim() == 0 and loss.device == logits.device
    assert_close("load_balancing_loss", loss, _f64(naive_lbl(logits, ids, E, scoring)), rms_tol=tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_load_balancing_loss_dtypes(device, dtype):
    T, k, E = 37, 4, 16
    logits = (torch.randn(T, E, device=device) * 2).to(dtype)
    ids = random_ids(T, k, E, device, dtype=torch.int64)
    for scoring in ("softmax", "sigmoid"):
        loss = mk.load_balancing_loss(logits, ids, E, scoring=scoring)
        # the contract computes in fp32 (fp64 for fp64 logits), from the quantized logits
        tol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close("load_balancing_loss", loss, _f64(naive_lbl(logits, ids, E, scoring)), rms_tol=tol)


def test_load_balancing_loss_with_topk_gating_ids(device):
    T, E, k = 37, 64, 8
    logits = torch.randn(T, E, device=device)
    _, ids = mk.topk_gating(logits, k, scoring="sigmoid", num_groups=4, topk_groups=2)
    loss = mk.load_balancing_loss(logits, ids, E, scoring="sigmoid")
    assert_close("load_balancing_loss", loss, _f64(naive_lbl(logits, ids, E, "sigmoid")), rms_tol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_load_balancing_loss_even_routing_is_one(device, scoring):
    T, E = 12, 8  # k = 2: every expert gets T*k/E = 3 slots, every token uniform probabilities
    logits = torch.full((T, E), -0.8, device=device)
    ids = torch.tensor([[(2 * t) % E, (2 * t + 1) % E] for t in range(T)], dtype=torch.int32, device=device)
    loss = mk.load_balancing_loss(logits, ids, E, scoring=scoring)
    assert_close("even routing", loss, _f64(1.0), rms_tol=1e-6)
    # collapsing onto one expert that also has the highest probability costs more than even routing
    logits[:, 3] += 4.0
    collapsed = mk.load_balancing_loss(logits, torch.full_like(ids, 3), E, scoring=scoring)
    assert collapsed > 1.5
    assert_close("collapsed", collapsed, _f64(naive_lbl(logits, torch.full_like(ids, 3), E, scoring)), rms_tol=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_load_balancing_loss_dropped_ids_excluded(device, scoring):
    T, k, E = 37, 4, 16
    logits = torch.randn(T, E, device=device)
    ids = random_ids(T, k, E, device, drop=0.3)
    loss = mk.load_balancing_loss(logits, ids, E, scoring=scoring)
    assert_close("load_balancing_loss", loss, _f64(naive_lbl(logits, ids, E, scoring)), rms_tol=1e-5)


def test_load_balancing_loss_with_drops_is_finite_and_all_dropped(device):
    T, k, E = 8, 2, 4
    logits = torch.randn(T, E, device=device)
    ids = torch.full((T, k), -1, dtype=torch.int32, device=device)
    loss = mk.load_balancing_loss(logits, ids, E)
    assert loss.item() == 0.0  # nothing routed, no balancing pressure
    ids[0, 0] = 2
    loss = mk.load_balancing_loss(logits, ids, E)
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_load_balancing_loss_gradcheck(device, scoring):
    T, k, E = 5, 2, 6
    logits = torch.randn(T, E, dtype=torch.float64, device=device, requires_grad=True)
    ids = random_ids(T, k, E, device)
    assert torch.autograd.gradcheck(lambda x: mk.load_balancing_loss(x, ids, E, scoring=scoring), (logits,))


def test_load_balancing_loss_bad_arguments(device, monkeypatch):
    logits = torch.randn(4, 8, device=device)
    ids = random_ids(4, 2, 8, device)
    with pytest.raises(ValueError, match="logits"):
        mk.load_balancing_loss(logits[0], ids, 8)
    with pytest.raises(TypeError, match="logits"):
        mk.load_balancing_loss(logits.int(), ids, 8)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.load_balancing_loss(logits, ids[:3], 8)
    with pytest.raises(ValueError, match="topk_ids"):
        mk.load_balancing_loss(logits, ids[0], 8)
    with pytest.raises(TypeError, match="topk_ids"):
        mk.load_balancing_loss(logits, ids.float(), 8)
    with pytest.raises(ValueError, match="num_experts"):
        mk.load_balancing_loss(logits, ids, 7)
    with pytest.raises(ValueError, match="scoring"):
        mk.load_balancing_loss(logits, ids, 8, scoring="tanh")
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")  # strict mode: out-of-range ids raise
    with pytest.raises(ValueError, match="topk_ids"):
        mk.load_balancing_loss(logits, ids + 8, 8)


def test_load_balancing_loss_mixed_devices():
    logits = torch.randn(4, 8)
    ids = torch.zeros(4, 2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="topk_ids"):
        mk.load_balancing_loss(logits, ids, 8)


# ----- GatingStats: topk_gating(..., return_stats=True) and load_balancing_loss(stats=...) ------------


def naive_score_sums(logits: torch.Tensor, scoring: str) -> list[float]:
    L = logits.detach().double().cpu().tolist()
    E = logits.shape[1]
    sums = [0.0] * E
    for row in L:
        for e, p in enumerate(naive_probs(row, scoring)):
            sums[e] += p
    return sums


STATS_CASES = [(0, 8, 2, "softmax", 1, False), (1, 1, 1, "sigmoid", 1, False), (3, 2, 2, "softmax", 1, True),
               (37, 64, 8, "sigmoid", 4, True), (37, 60, 2, "softmax", 4, False), (37, 257, 8, "sigmoid", 1, True)]


@pytest.mark.parametrize("T,E,k,scoring,groups,use_bias", STATS_CASES)
def test_gating_stats_match_naive(device, T, E, k, scoring, groups, use_bias):
    logits = torch.randn(T, E, device=device) * 2
    bias = (torch.randn(E, device=device) * 0.1) if use_bias else None
    kw = dict(scoring=scoring, correction_bias=bias, num_groups=groups, topk_groups=min(groups, 2), scaling_factor=2.5)
    w, ids, st = mk.topk_gating(logits, k, return_stats=True, **kw)
    w0, ids0 = mk.topk_gating(logits, k, **kw)
    assert torch.equal(w, w0) and torch.equal(ids, ids0)  # the statistics do not change the routing
    assert isinstance(st, mk.GatingStats)
    assert (st.num_tokens, st.top_k, st.scoring) == (T, k, scoring)
    assert st.tokens_per_expert.dtype == torch.int32 and st.tokens_per_expert.tolist() == naive_counts(ids.tolist(), E)
    assert st.score_sums.dtype == torch.float32 and st.score_sums.shape == (E,)
    assert_close("score_sums", st.score_sums, _f64(naive_score_sums(logits, scoring)), rms_tol=1e-5)
    loss = mk.load_balancing_loss(stats=st)
    assert_close("load_balancing_loss(stats)", loss, _f64(naive_lbl(logits, ids, E, scoring)), rms_tol=1e-5)


def test_gating_stats_fp64(device):
    logits = torch.randn(13, 16, dtype=torch.float64, device=device)
    w, ids, st = mk.topk_gating(logits, 4, scoring="sigmoid", return_stats=True)
    assert st.score_sums.dtype == torch.float64
    assert_close("score_sums", st.score_sums, _f64(naive_score_sums(logits, "sigmoid")), rms_tol=1e-10)
    assert_close("loss", mk.load_balancing_loss(stats=st), _f64(naive_lbl(logits, ids, 16, "sigmoid")), rms_tol=1e-10)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gating_stats_gradcheck(device, scoring):
    """Gradients reach the logits through the weights and through the statistics' score sums."""
    T, E, k = 5, 8, 2
    logits = torch.randn(T, E, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(E, dtype=torch.float64, device=device) * 0.1

    def f(x):
        w, _, st = mk.topk_gating(x, k, scoring=scoring, correction_bias=bias, num_groups=2, return_stats=True)
        return w, mk.load_balancing_loss(stats=st), st.score_sums

    assert torch.autograd.gradcheck(f, (logits,))

    def only_loss(x):
        return mk.load_balancing_loss(stats=mk.topk_gating(x, k, scoring=scoring, return_stats=True)[2])

    assert torch.autograd.gradcheck(only_loss, (logits,))
    # and the same gradient as the two-pass loss
    _, ids = mk.topk_gating(logits.detach(), k, scoring=scoring)
    (g1,) = torch.autograd.grad(only_loss(logits), logits)
    (g2,) = torch.autograd.grad(mk.load_balancing_loss(logits, ids, E, scoring=scoring), logits)
    assert_close("d logits", g1, g2.detach(), rms_tol=1e-10)


def test_load_balancing_loss_stats_bad_arguments(device):
    with pytest.raises(TypeError, match="stats"):
        mk.load_balancing_loss(stats=(torch.ones(4), torch.ones(4)))
    with pytest.raises(ValueError, match="stats"):
        mk.load_balancing_loss(torch.randn(3, 4, device=device))


# ----- router_z_loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E", [(0, 8), (1, 1), (3, 2), (37, 60), (37, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_router_z_loss_matches_naive(device, T, E, dtype):
    logits = (torch.randn(T, E, device=device) * 3 + 1.5).to(dtype)
    loss = mk.router_z_loss(logits)
    assert loss.dim() == 0
    tol = tolerance(torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("router_z_loss", loss, _f64(naive_z_loss(logits)), rms_tol=tol)


def test_router_z_loss_large_logits(device):
    logits = torch.randn(9, 16, device=device) * 50 + 200  # exp overflows fp32 without max-subtraction
    loss = mk.router_z_loss(logits)
    assert torch.isfinite(loss)
    assert_close("router_z_loss", loss, _f64(naive_z_loss(logits)), rms_tol=1e-5)


def test_router_z_loss_gradcheck(device):
    logits = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(mk.router_z_loss, (logits,))


def test_router_z_loss_bad_arguments(device):
    with pytest.raises(ValueError, match="logits"):
        mk.router_z_loss(torch.randn(8, device=device))
    with pytest.raises(TypeError, match="logits"):
        mk.router_z_loss(torch.ones(3, 8, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="logits"):
        mk.router_z_loss([[1.0, 2.0]])


# ----- routing_stats ---------------------------------------------------------------------------------


def naive_stats(ids: list[list[int]], E: int):
    c = naive_counts(ids, E)
    total = sum(c)
    mean = total / E
    p = [x / total for x in c] if total else [0.0] * E
    entropy = -sum(q * math.log(q) for q in p if q > 0)
    return c, max(c), mean, entropy, (max(c) / mean if mean else 0.0)


@pytest.mark.parametrize("T,k,E,drop", [(1, 1, 1, 0.0), (3, 2, 8, 0.0), (37, 8, 60, 0.2), (37, 2, 257, 0.1)])
def test_routing_stats_matches_naive(device, T, k, E, drop):
    ids = random_ids(T, k, E, device, drop=drop)
    st = mk.routing_stats(ids, E)
    c, mx, mean, ent, imb = naive_stats(ids.tolist(), E)
    assert st.tokens_per_expert.dtype == torch.int32 and st.tokens_per_expert.tolist() == c
    for name, got, want in (("max_load", st.max_load, mx), ("mean_load", st.mean_load, mean),
                            ("load_entropy", st.load_entropy, ent), ("imbalance", st.imbalance, imb)):
        assert got.dtype == torch.float32 and got.dim() == 0, name
        assert got.device == ids.device, name
        assert_close(name, got, _f64(want), rms_tol=1e-5)


def test_routing_stats_even_and_collapsed(device):
    E = 8
    ids = torch.arange(32, device=device, dtype=torch.int32).remainder(E).view(16, 2)
    st = mk.routing_stats(ids, E)
    assert_close("entropy", st.load_entropy, _f64(math.log(E)), rms_tol=1e-6)
    assert_close("imbalance", st.imbalance, _f64(1.0), rms_tol=1e-6)
    st = mk.routing_stats(torch.full((16, 1), 5, dtype=torch.int32, device=device), E)
    assert abs(st.load_entropy.item()) < 1e-6
    assert_close("imbalance", st.imbalance, _f64(float(E)), rms_tol=1e-6)


# ----- update_correction_bias ------------------------------------------------------------------------


def naive_bias_update(bias: torch.Tensor, load: list[int], rate: float) -> torch.Tensor:
    """bias + rate * sign(mean load - load), the sign decided in exact arithmetic."""
    mean = Fraction(sum(load), len(load))
    b = bias.detach().double().cpu().tolist()
    return _f64([x + rate * ((mean > v) - (mean < v)) for x, v in zip(b, load)])


@pytest.mark.parametrize("E", [1, 2, 8, 60, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("load_dtype", [torch.int32, torch.int64])
def test_update_correction_bias_matches_naive(device, E, dtype, load_dtype):
    bias = (torch.randn(E, device=device) * 0.1).to(dtype)
    load = torch.randint(0, 3000, (E,), device=device)
    if E > 2:
        load[1] = load[0]  # make load[0] the exact mean: a zero sign
        load[2] = load[0] + 5
        load[3] = load[0] - 5
        load[4:] = load[0]
    load = load.to(load_dtype)
    expected = naive_bias_update(bias, load.tolist(), 1e-3)
    before = bias.data_ptr()
    out = mk.update_correction_bias(bias, load, 1e-3)
    assert out is bias and bias.data_ptr() == before and bias.dtype == dtype  # in place
    assert_close("bias", bias, expected, rms_tol=tolerance(dtype))


def test_update_correction_bias_sign_semantics(device):
    bias = torch.tensor([0.5, -0.25, 0.125, 1.0], device=device)
    load = torch.tensor([10, 30, 20, 20], device=device)  # mean 20
    mk.update_correction_bias(bias, load, 0.5)
    # underloaded experts get a larger bias, overloaded a smaller one, balanced ones stay
    assert bias.tolist() == [1.0, -0.75, 0.125, 1.0]
    bias2 = torch.tensor([0.3, 0.7, -0.1], device=device)
    mk.update_correction_bias(bias2, torch.tensor([7, 7, 7], device=device), 0.01)
    assert bias2.tolist() == torch.tensor([0.3, 0.7, -0.1]).tolist()  # even load: no change


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_correction_bias_low_precision_bias(device, dtype):
    bias = torch.tensor([0.5, -0.25, 0.125, 1.0], device=device).to(dtype)  # exact in bf16/fp16
    load = torch.tensor([3000, 3001, 3003, 2996], device=device)  # mean 3000
    expected = naive_bias_update(bias, load.tolist(), 0.125)
    mk.update_correction_bias(bias, load, 0.125)
    assert bias.double().cpu().tolist() == expected.tolist()


def test_update_correction_bias_drives_balance(device):
    """Iterating the update with topk_gating spreads the load (the purpose of the bias)."""
    T, E, k = 256, 8, 2
    logits = torch.randn(T, E, device=device)
    logits[:, 0] += 3.0  # expert 0 is hot
    bias = torch.zeros(E, device=device)
    first = None
    for _ in range(60):
        _, ids = mk.topk_gating(logits, k, scoring="sigmoid", correction_bias=bias)
        st = mk.routing_stats(ids, E)
        first = st.imbalance.item() if first is None else first
        mk.update_correction_bias(bias, st.tokens_per_expert, 0.01)
    assert st.imbalance.item() < 0.6 * first


def test_update_correction_bias_bad_arguments(device):
    bias = torch.randn(8, device=device)
    load = torch.randint(0, 10, (8,), device=device)
    with pytest.raises(ValueError, match="bias"):
        mk.update_correction_bias(bias.view(2, 4), load, 0.1)
    with pytest.raises(TypeError, match="bias"):
        mk.update_correction_bias(load, load, 0.1)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        mk.update_correction_bias(bias, load[:7], 0.1)
    with pytest.raises(TypeError, match="tokens_per_expert"):
        mk.update_correction_bias(bias, load.tolist(), 0.1)
    with pytest.raises(TypeError, match="rate"):
        mk.update_correction_bias(bias, load, "0.1")
    with pytest.raises(ValueError, match="tokens_per_expert"):
        mk.update_correction_bias(bias, torch.zeros(8, dtype=torch.int32, device="meta"), 0.1)


def test_opcheck_update_correction_bias(device):
    bias = torch.randn(8, device=device)
    torch.library.opcheck(torch.ops.moe_kernels.update_correction_bias.default,
                          (bias, torch.randint(0, 50, (8,), device=device, dtype=torch.int32), 0.01))
