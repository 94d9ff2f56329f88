"""Grouped GEMM tiles that depend on the epilogue: the swiglu_oai backward (dA GEMM) gets half the accumulator of
the other activations' dA tiles, and the biased GEMM with gathered rows on sm_90 runs one 128 x 256 tile a program
instead of persistent (both spilled registers: ``tests/triton_compile_check.py``). The rule is pinned per
architecture and row bucket, every other launch keeps its tile, the launcher passes what the rule reads, and the
fused backward is checked against float64 through the very tiles chosen for the GPU (run by the interpreter)."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close
from moe_kernels.triton_kernels import _launch, tiles

DEV = "cuda" if torch.cuda.is_available() else "cpu"
META = torch.device("meta")
if not mk.backends()["triton"].available:
    pytest.skip("no triton backend here", allow_module_level=True)


def acc_per_thread(cfg):
    return cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])


def dA_config(rows, activation, E=32, N=2880, K=2880):
    M = rows * E
    bm = tiles.gemm_config("gemm_gated", M, N, K, E, torch.bfloat16, META)["BLOCK_M"]  # the plan's row tile
    return tiles.gemm_config("gemm_act_bwd", M, N, K, E, torch.bfloat16, META, bm, activation=activation, bias=False,
                             gather=True)


# rows per expert -> the other activations' dA tile (BLOCK_M, BLOCK_N, num_warps) on both architectures
DA_TILES = {24: (32, 128, 4), 64: (64, 64, 4), 512: (128, 64, 8)}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("rows", sorted(DA_TILES))
def test_swiglu_oai_dA_tiles_halve_the_accumulator(monkeypatch, arch, rows):
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", arch)
    for act in ("silu", "gelu", "relu", "none"):
        cfg = dA_config(rows, act)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]) == DA_TILES[rows], act
        assert not cfg["PERSISTENT"]
    heavy, other = dA_config(rows, "swiglu_oai"), dA_config(rows, "silu")
    assert heavy["BLOCK_M"] == other["BLOCK_M"]  # the schedule's row tile is kept
    assert acc_per_thread(heavy) == 16 == acc_per_thread(other) // 2
    assert heavy["BLOCK_K"] == other["BLOCK_K"] and heavy["num_stages"] >= other["num_stages"]
    assert not heavy["PERSISTENT"]


def test_swiglu_oai_dA_keeps_a_forced_row_tile(monkeypatch):
    """A schedule with another row tile than the heuristic's (a caller's plan) still gets the narrow dA tile."""
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_90")
    for bm in (16, 32, 64, 128):
        cfg = tiles.gemm_config("gemm_act_bwd", 64 * 32, 2880, 2880, 32, torch.bfloat16, META, bm,
                                activation="swiglu_oai")
        assert cfg["BLOCK_M"] == bm and acc_per_thread(cfg) <= 16


@pytest.mark.parametrize("bias,gather,persistent", [(True, True, False), (True, False, True), (False, True, True),
                                                    (False, False, True)])
def test_biased_gathered_wide_gemm_is_not_persistent_on_sm90(monkeypatch, bias, gather, persistent):
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_90")
    M, N, K, E = 4096 * 4, 5760, 2880, 32  # gpt-oss-20b's recompute of the pre-activation at 4096 tokens
    cfg = tiles.gemm_config("gemm", M, N, K, E, torch.bfloat16, META, 128, bias=bias, gather=gather)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]) == (128, 256, 64, 8)
    assert cfg["PERSISTENT"] is persistent and cfg["TMA"]
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_80")  # not persistent there anyway: unchanged
    assert tiles.gemm_config("gemm", M, N, K, E, torch.bfloat16, META, 128, bias=bias, gather=gather) == \
        tiles.gemm_config("gemm", M, N, K, E, torch.bfloat16, META, 128)


def _gemm_launches(fn):
    seen = []
    remove = _launch.add_hook(lambda rec: seen.append(rec) and None)
    try:
        fn()
    finally:
        remove()
    return [r.kwargs for r in seen if r.name == "grouped_gemm_kernel"]


def _gpt_oss_layer(T, H, I, E, k, dtype, device, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(device, dtype) * 3
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(device, dtype)
    b13 = torch.randn(E, 2 * I, generator=g).to(device, dtype)
    b2 = torch.randn(E, H, generator=g).to(device, dtype)
    w, ids = mk.topk_gating(torch.randn(T, E, generator=g).to(device), k, backend="torch")
    leaves = [t.requires_grad_(grad) for t in (x, w13, w2, w.to(dtype), b13, b2)]
    return leaves, ids


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_launcher_passes_the_epilogue_to_the_tiles(monkeypatch, arch):
    """The fused MoE backward of a gpt-oss layer at prefill (meta tensors, recorded launches, nothing runs):
    the dA launch gets the narrow tile, the recompute of the pre-activation (bias, gathered rows) one tile a
    program on sm_90; a silu layer of the same shape keeps the table's tiles."""
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", arch)
    T, H, I, E, k = 4096, 2880, 2880, 32, 4

    def run(activation, bias):
        x, w13, w2 = (torch.empty(*s, dtype=torch.bfloat16, device=META, requires_grad=True)
                      for s in ((T, H), (E, 2 * I, H), (E, H, I)))
        w = torch.empty(T, k, device=META, requires_grad=True)
        ids = torch.empty(T, k, dtype=torch.int32, device=META)
        b13, b2 = ((torch.empty(E, 2 * I, dtype=torch.bfloat16, device=META, requires_grad=True),
                    torch.empty(E, H, dtype=torch.bfloat16, device=META, requires_grad=True)) if bias else (None, None))
        y = mk.fused_moe(x, w13, w2, w, ids, activation=activation, w13_bias=b13, w2_bias=b2, backend="triton")
        y.float().sum().backward()

    for activation, bias in (("swiglu_oai", True), ("silu", False), ("silu", True)):
        with _launch.record() as recs:
            run(activation, bias)
        launches = [r.kwargs for r in recs if r.name == "grouped_gemm_kernel"]
        dA = [kw for kw in launches if kw["ACT_BWD"]]
        recompute = [kw for kw in launches if kw["GATHER"] and not kw["ACT_BWD"] and kw["ACT"] == 0]
        assert len(dA) == 1 and len(recompute) == 1, activation
        (dA,), (recompute,) = dA, recompute
        tile = (dA["BLOCK_M"], dA["BLOCK_N"], dA["num_warps"])
        assert tile == ((128, 32, 8) if activation == "swiglu_oai" else (128, 64, 8)), activation
        assert (recompute["BLOCK_M"], recompute["BLOCK_N"]) == ((128, 256) if arch == "sm_90" else (128, 128))
        assert recompute["PERSISTENT"] is (arch == "sm_90" and not bias), (activation, bias)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fused_backward_through_the_gpu_tiles_matches_float64(monkeypatch, arch):
    """gpt-oss (swiglu_oai, gate and up interleaved, both biases, weight after the experts) with more than 96
    rows per expert, through the tiles chosen for the GPU (the interpreter's small-tile clamp lifted): the
    128 x 32 dA tile and, on sm_90, the recompute's non-persistent 128 x 256 tile (TMA weights), against
    float64; outputs are NaN-poisoned (conftest), so an unwritten element fails."""
    if DEV == "cpu":
        monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", arch)
        monkeypatch.setattr(tiles, "interpreting", lambda: False)  # the GPU's tiles, not the interpreter's clamp
    T, H, I, E, k = 224, 64, 48, 4, 2  # 112 rows per expert: the prefill bucket (128-row tiles)
    tensors, ids = _gpt_oss_layer(T, H, I, E, k, torch.float64, DEV, False)
    g = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(DEV)
    kw = dict(activation="swiglu_oai", gate_up_interleaved=True)

    def grads(backend, dtype, **extra):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        out = mk.fused_moe(*leaves[:4], ids, w13_bias=leaves[4], w2_bias=leaves[5], backend=backend, **kw, **extra)
        out.backward(g.to(dtype))
        return out, [t.grad for t in leaves]

    ref_out, expected = grads("torch", torch.float64)
    res = []
    launches = _gemm_launches(lambda: res.append(grads("triton", torch.float32)))
    (out, got), = res
    if DEV == "cpu":
        dA = [kw for kw in launches if kw["ACT_BWD"]]
        assert [(d["BLOCK_M"], d["BLOCK_N"], d["num_warps"]) for d in dA] == [(128, 32, 8)]
        recompute = [kw for kw in launches if kw["GATHER"] and not kw["ACT_BWD"] and kw["ACT"] == 0]
        assert [r["PERSISTENT"] for r in recompute] == [False]
        assert recompute[0]["TMA_W"] is (arch == "sm_90")
    assert_close("out", out, ref_out, rms_tol=1e-5)
    for name, a, e in zip(("hidden", "w13", "w2", "topk_weights", "w13_bias", "w2_bias"), got, expected):
        assert_close(f"grad {name}", a, e, rms_tol=1e-5)
