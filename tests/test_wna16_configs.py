"""Tile choices of the weight-dequantizing GEMMs per architecture (triton_kernels/wna16_gemm.py, fp8_gemm.py's
weight-only path): the variants whose unpacking or epilogue takes registers get the smaller steps that
tests/triton_compile_check.py compiles without spills (compiled for sm_80 / sm_90a, never run)."""

import pytest

pytest.importorskip("triton")

from moe_kernels.triton_kernels import _launch  # noqa: E402
from moe_kernels.triton_kernels import fp8_gemm as F  # noqa: E402
from moe_kernels.triton_kernels import wna16_gemm as W  # noqa: E402

T = _launch.TARGETS


def _cfg(M, N, K, E, gated, arch, fmt="int4", zero=True, group=128):
    return W.default_config(M, N, K, E, 2, 4 if fmt != "int8" else 8, gated, group, T[arch], fmt, zero)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_int4_zero_point_gated_steps(arch, monkeypatch):
    monkeypatch.delenv(W.MX_DOT_ENV, raising=False)
    decode = _cfg(8, 2048, 7168, 256, True, arch)  # DeepSeek-V3 T=1: 16-row tiles
    assert decode["BLOCK_M"] == 16 and decode["BLOCK_K"] == 64 and decode["BLOCK_N"] == 128
    prefill = _cfg(4096 * 8, 2048, 7168, 256, True, arch)  # 128 rows per expert: 64-row tiles
    assert prefill["BLOCK_M"] == 64 and prefill["BLOCK_K"] == 32
    # without zero points the gated tiles keep their K step
    assert _cfg(8, 2048, 7168, 256, True, arch, zero=False)["BLOCK_K"] == 128
    assert _cfg(4096 * 8, 2048, 7168, 256, True, arch, zero=False)["BLOCK_K"] == 64
    for c in (decode, prefill):
        assert 128 % c["BLOCK_K"] == 0  # within one scale group
        assert W.smem_bytes(c, 2, 4, True) <= T[arch].smem_per_block


@pytest.mark.parametrize("fmt,zero,group", [("int4", True, 128), ("mxfp4", False, 32)])
def test_ungated_prefill_warps(fmt, zero, group, monkeypatch):
    monkeypatch.delenv(W.MX_DOT_ENV, raising=False)
    c80 = _cfg(4096 * 8, 7168, 2048, 256, False, "sm_80", fmt, zero, group)  # the second GEMM, 64x128 tiles
    assert (c80["BLOCK_M"], c80["BLOCK_N"], c80["num_warps"]) == (64, 128, 8)
    assert _cfg(4096 * 8, 7168, 2048, 256, False, "sm_90", fmt, zero, group)["num_warps"] == 4  # wgmma: 4 fit
    assert _cfg(4096 * 8, 7168, 2048, 256, False, "sm_80", "int4", False, 128)["num_warps"] == 4


def test_fp8_weight_only_bias_stages():
    # gpt-oss-20b T=4096: 32 experts, top-4, block-128 scales, biases: weight-only on sm_80
    cfg = lambda arch, bias: F.default_config(4096 * 4, 2880, 2880, 32, 2, True, 128, T[arch], bias)  # noqa: E731
    with_bias, without = cfg("sm_80", True), cfg("sm_80", False)
    assert (with_bias["BLOCK_M"], with_bias["BLOCK_N"]) == (without["BLOCK_M"], without["BLOCK_N"]) == (128, 64)
    assert with_bias["num_stages"] == 2 and without["num_stages"] == 4
    assert cfg("sm_90", True)["num_stages"] == cfg("sm_90", False)["num_stages"]  # fp8 tensor cores: unchanged
