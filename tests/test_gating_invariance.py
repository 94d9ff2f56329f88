"""Batch invariance of top-k gating: a token's weights, ids, statistics contribution and gradient are
bitwise the same whatever the batch size and whatever its neighbours.

On the Triton kernels this holds by construction: the tile (BLOCK_T, BLOCK_E, BLOCK_K) and so the GPU
reduction layout are functions of E and k only (``triton_kernels.gating._blocks``), and each row is
reduced on its own. The interpreter cannot show lane layouts; what it checks here is that nothing a
token gets depends on T or on the other rows."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.triton_kernels import gating as gating_kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("triton", "cuda") if mk.backends()[b].available]  # the torch reference makes no such claim
if not BACKENDS:
    pytest.skip("no gating kernel backend here", allow_module_level=True)
E, K = 60, 4  # BLOCK_E 64: BLOCK_T 64, so T = 130 spans three programs
BATCHES = [(1, 0), (3, 2), (37, 17), (130, 129)]  # (T, position of the token)
CONFIGS = [
    dict(scoring="softmax"),
    dict(scoring="sigmoid", num_groups=4, topk_groups=2, bias=True),
    dict(scoring="sqrtsoftplus", num_groups=6, topk_groups=3, group_score="topk_sum", scaling_factor=2.0),
]


def test_block_sizes_are_a_function_of_e_and_k_only():
    assert gating_kernels._blocks(60, 4) == (64, 64, 4)
    assert gating_kernels._blocks(256, 8) == (16, 256, 8)
    assert gating_kernels._blocks(8, 1) == (128, 16, 2)
    import inspect

    assert list(inspect.signature(gating_kernels._blocks).parameters)[:2] == ["E", "k"]


def _batch(row, T, pos, neighbours):
    x = neighbours(T).to(DEV)
    x[pos] = row
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["scoring"])
def test_a_token_gets_the_same_bits_in_any_batch(backend, cfg):
    cfg = dict(cfg)
    bias = torch.randn(E, device=DEV) * 0.1 if cfg.pop("bias", False) else None
    row = torch.randn(E, device=DEV) * 2
    g_row = torch.randn(K, device=DEV)
    c = torch.randn(E, device=DEV)
    stats = backend != "cuda"
    first = None
    for T, pos in BATCHES:
        x = _batch(row, T, pos, lambda n: torch.randn(n, E) * 3).requires_grad_()
        out = mk.topk_gating(x, K, correction_bias=bias, return_stats=stats, backend=backend, **cfg)
        g = torch.randn(T, K, device=DEV)
        g[pos] = g_row
        loss = (out[0] * g).sum()
        if stats:
            loss = loss + (out[2].score_sums * c).sum()  # the statistics' backward too
        loss.backward()
        got = (out[0][pos], out[1][pos], x.grad[pos] if x.grad is not None else None)
        if first is None:
            first = got
            continue
        assert torch.equal(got[1], first[1]), (T, got[1], first[1])
        assert torch.equal(got[0], first[0]), (T, got[0] - first[0])
        if got[2] is not None:
            assert torch.equal(got[2], first[2]), (T, (got[2] - first[2]).abs().max())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["scoring"])
def test_a_tokens_statistics_contribution_is_the_same_in_any_batch(backend, cfg):
    """Neighbours without a number (all NaN) contribute exactly 0 to the score sums, so the sums must
    be bitwise the token's own contribution whatever T and wherever the token sits."""
    cfg = dict(cfg)
    cfg.pop("bias", None)
    row = torch.randn(E, device=DEV) * 2
    first = None
    for T, pos in BATCHES:
        x = _batch(row, T, pos, lambda n: torch.full((n, E), float("nan")))
        w, ids, st = mk.topk_gating(x, K, return_stats=True, backend=backend, **cfg)
        others = torch.cat([ids[:pos], ids[pos + 1:]]).flatten().long()
        own = st.tokens_per_expert - torch.bincount(others, minlength=E).to(torch.int32)
        if first is None:
            first = (st.score_sums, own)
            continue
        assert torch.equal(st.score_sums, first[0]), (T, (st.score_sums - first[0]).abs().max())
        assert torch.equal(own, first[1])
