"""Batch-invariant mode: a token's outputs are bitwise the same whatever batch it comes in.

The shapes are chosen so that the default mode's configs differ between the small and the large batch
(decode tiles for a few rows per expert, prefill tiles for many), which the first test shows."""

import os

import pytest
import torch

import moe_kernels as mk
from moe_kernels.triton_kernels import _launch, configs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E, K, H, I, R = 4, 2, 64, 32, 8
SMALL, LARGE = 3, 150  # 1.5 and 75 rows per expert


def _cfg(T, gated=True):
    return configs.get_config("gemm_gated" if gated else "gemm", T * K, I, H, E, torch.float32, torch.device(DEV))


@pytest.mark.parametrize("arch", list(_launch.TARGETS))
def test_default_configs_differ_and_invariant_ones_do_not(arch, monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", arch)
    for gated in (True, False):
        assert _cfg(SMALL, gated) != _cfg(LARGE, gated), "the shapes must make the default mode's configs differ"
        with mk.batch_invariant():
            assert mk.is_batch_invariant()
            assert _cfg(1, gated) == _cfg(SMALL, gated) == _cfg(LARGE, gated) == _cfg(65536, gated)
    assert not mk.is_batch_invariant()


def test_env_switch_and_nesting(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_BATCH_INVARIANT", "1")
    assert mk.is_batch_invariant()
    with mk.batch_invariant(False):
        assert not mk.is_batch_invariant()
        with mk.batch_invariant():
            assert mk.is_batch_invariant()
        assert not mk.is_batch_invariant()
    monkeypatch.delenv("MOE_KERNELS_BATCH_INVARIANT")
    assert not mk.is_batch_invariant()


def test_invariant_mode_ignores_tuned_files(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._load.cache_clear()
    tuned = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    configs.config_file("gemm", E, I, H, torch.float32, configs.device_name(torch.device(DEV))).write_text(
        '{"1": %s}' % str(tuned).replace("'", '"'))
    assert _cfg(SMALL, gated=False) == tuned
    with mk.batch_invariant():
        assert _cfg(SMALL, gated=False) == _cfg(LARGE, gated=False) != tuned
    configs._load.cache_clear()


def _routing(T):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    return torch.rand(T, K, generator=g), ids


def _need_triton():
    if not mk.backends()["triton"].available:
        pytest.skip(mk.backends()["triton"].reason)


@pytest.mark.parametrize("act,gated,bias", [("silu", True, False), ("swiglu_oai", True, True), ("relu", False, False)])
def test_fused_moe_forward_backward_bitwise_across_batch_sizes(act, gated, bias):
    _need_triton()
    x = torch.randn(LARGE, H, device=DEV)
    w13 = (torch.randn(E, (2 if gated else 1) * I, H) / H**0.5).to(DEV)
    w2 = (torch.randn(E, H, I) / I**0.5).to(DEV)
    b13 = torch.randn(E, w13.shape[1], device=DEV) if bias else None
    b2 = torch.randn(E, H, device=DEV) if bias else None
    w, ids = (t.to(DEV) for t in _routing(LARGE))
    g = torch.randn(LARGE, H, device=DEV)

    def run(T):
        xt = x[:T].clone().requires_grad_(True)
        wt = w[:T].clone().requires_grad_(True)
        y = mk.fused_moe(xt, w13, w2, wt, ids[:T], activation=act, gated=gated, w13_bias=b13, w2_bias=b2,
                         backend="triton")
        y.backward(g[:T])
        return y.detach(), xt.grad, wt.grad

    with mk.batch_invariant():
        small, large = run(SMALL), run(LARGE)
    for name, a, b in zip(("out", "grad hidden", "grad topk_weights"), small, large):
        assert torch.equal(a, b[:SMALL]), f"{name}: a token's result depends on the batch in the invariant mode"


def test_lora_moe_bitwise_across_batch_sizes():
    _need_triton()
    x = torch.randn(LARGE, H, device=DEV)
    base = (torch.randn(I, H) / H**0.5).to(DEV)
    b0 = torch.randn(I, device=DEV)
    a = (torch.randn(E, R, H) / H**0.5).to(DEV)
    b = (torch.randn(E, I, R) / R**0.5).to(DEV)
    w, ids = (t.to(DEV) for t in _routing(LARGE))
    g = torch.randn(LARGE, I, device=DEV)

    def run(T):
        xt = x[:T].clone().requires_grad_(True)
        y = mk.lora_moe(xt, base, a, b, w[:T], ids[:T], scaling=2.0, base_bias=b0, backend="triton")
        y.backward(g[:T])
        return y.detach(), xt.grad

    with mk.batch_invariant():
        small, large = run(SMALL), run(LARGE)
    for name, s, l in zip(("out", "grad x"), small, large):
        assert torch.equal(s, l[:SMALL]), f"lora_moe {name} depends on the batch in the invariant mode"


def test_auto_in_invariant_mode_takes_one_path_for_every_batch():
    """On a GPU with the extension the cuda decode kernel serves small batches by default; in the mode
    the triton kernel serves every batch size (bitwise equal results for a token)."""
    x = torch.randn(64, H).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I) / I**0.5).to(torch.bfloat16)
    w, ids = _routing(64)
    if DEV != "cuda" or not mk.backends()["triton"].available:
        pytest.skip("the auto choice between the cuda and triton kernels needs a GPU")
    x, w13, w2, w, ids = (t.cuda() for t in (x, w13, w2, w, ids))
    with torch.no_grad(), mk.batch_invariant():
        one = mk.fused_moe(x[:1], w13, w2, w[:1], ids[:1])
        many = mk.fused_moe(x, w13, w2, w, ids)
    assert torch.equal(one[0], many[0])
    if mk.backends()["cuda"].available:
        from moe_kernels import _cuda

        with mk.batch_invariant():
            assert "batch-invariant" in _cuda._decode_supports(x[:1], w13, w2, w[:1], ids[:1])
        assert os.environ.get("MOE_KERNELS_BATCH_INVARIANT", "0") == "1" or \
            _cuda._decode_supports(x[:1], w13, w2, w[:1], ids[:1]) is None
