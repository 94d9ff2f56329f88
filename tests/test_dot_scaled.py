"""MXFP4 experts on ``tl.dot_scaled`` (triton_kernels/wna16_gemm.py, ``DOT_SCALED``): the interpreter's result
against float64 references (16-bit activations: the dequantized weights; MXFP8 activations: the same activation
quantization emulated in torch), the per-architecture choice, and the sm_100a compile (compiled, never run)."""

import os
import re
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close
from moe_kernels.triton_kernels import _launch
from moe_kernels.triton_kernels import wna16_gemm as W

HERE = os.path.dirname(os.path.abspath(__file__))
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="runs the Triton interpreter on CPU tensors")


def _empty(shape, dtype, device):  # poisoned outputs: an unwritten element fails
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


def mxfp8(x: torch.Tensor) -> torch.Tensor:
    """The kernel's MXFP8 activations, dequantized (float64): per row and 32 elements of K, ``s = 2^ceil(log2(
    amax / 448))`` and ``x / s`` rounded to e4m3 (nearest even)."""
    T, K = x.shape
    g = x.double().view(T, K // 32, 32)
    amax = g.abs().amax(-1, keepdim=True)
    m, e = torch.frexp(amax / 448)  # amax/448 = m * 2^e, m in [0.5, 1)
    e = torch.where(m == 0.5, e - 1, e).clamp(-127, 127)  # ceil(log2): exact powers of two keep their exponent
    s = torch.exp2(e.double())
    return ((g / s).to(torch.float8_e4m3fn).double() * s).view(T, K)


def _case(E=3, N=48, K=160, sizes=(5, 0, 7)):
    offsets = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)
    x = torch.randn(sum(sizes), K)
    qw = mk.quantize(torch.randn(E, N, K) / K**0.5, "mxfp4")
    return x, qw, offsets


def _run(x, qw, offsets, mode, bk=64, **kw):
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk, "num_warps": 4, "num_stages": 2, "DOT_SCALED": mode}
    return W.wna16_grouped_gemm(x, qw.data, qw.scale, None, "mxfp4", 32, offsets, None, None, config=cfg, empty=_empty,
                                **kw)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bk", [32, 128])  # 128: K = 160 ends in a partial tile
def test_bf16_activations_match_the_dequantized_reference(dtype, bk):
    x, qw, offs = _case()
    ref = mk.grouped_gemm(x.to(dtype).double(), qw.dequantize(torch.float64), offs, backend="torch")
    y = _run(x.to(dtype), qw, offs, W.DOT_SCALED_MODES["bf16"], bk)
    assert y.dtype == dtype
    # bf16 output rounding (the interpreter truncates), fp16 ~ 2^-11
    assert_close("y", y, ref, rms_tol=4e-3 if dtype == torch.bfloat16 else 1e-3, max_tol=1e-2)
    base = _run(x.to(dtype), qw, offs, 0, 32)  # the dequantize path: the same numerics
    assert_close("y vs dequantize path", y, base.double(), rms_tol=4e-3 if dtype == torch.bfloat16 else 1e-3)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mxfp8_activations_match_their_float64_reference(dtype):
    x, qw, offs = _case()
    x = x.to(dtype)
    x[3, :32] *= 1e-3  # a group far below the others: its own scale
    x[4, 40] = 300.0  # a group with one large element
    ref = mk.grouped_gemm(mxfp8(x), qw.dequantize(torch.float64), offs, backend="torch")
    y = _run(x, qw, offs, W.DOT_SCALED_MODES["mxfp8"], 64).double()
    # e4m3 x e2m1 products with power-of-two scales are exact in fp32: only accumulation and the output round
    assert_close("y", y, ref, rms_tol=4e-3 if dtype == torch.bfloat16 else 1e-3, max_tol=1e-2)
    dense = mk.grouped_gemm(x.double(), qw.dequantize(torch.float64), offs, backend="torch")
    err = ((y - dense).abs().max() / dense.abs().max()).item()
    assert 1e-3 < err < 0.08, err  # the activations' quantization error, bounded


def test_choice_per_architecture(monkeypatch):
    monkeypatch.delenv(W.MX_DOT_ENV, raising=False)
    T = _launch.TARGETS
    cfg = lambda fmt, a_bytes, arch, K=2880: W.default_config(64, 2880, K, 32, a_bytes, 4, True, 32, T[arch], fmt)  # noqa: E731
    assert cfg("mxfp4", 2, "sm_100")["DOT_SCALED"] == W.DOT_SCALED_MODES["bf16"]
    assert cfg("mxfp4", 2, "sm_100")["BLOCK_K"] % 32 == 0 and cfg("mxfp4", 2, "sm_100")["BLOCK_K"] > 32
    for arch in ("sm_90", "sm_80", "sm_89"):
        c = cfg("mxfp4", 2, arch)
        assert c["DOT_SCALED"] == 0 and 32 % c["BLOCK_K"] == 0  # the dequantize path, BLOCK_K within a group
    assert cfg("mxfp4", 4, "sm_100")["DOT_SCALED"] == 0  # fp32 activations: dequantize
    assert cfg("int4", 2, "sm_100")["DOT_SCALED"] == 0
    monkeypatch.setenv(W.MX_DOT_ENV, "mxfp8")
    assert cfg("mxfp4", 2, "sm_100")["DOT_SCALED"] == W.DOT_SCALED_MODES["mxfp8"]
    monkeypatch.setenv(W.MX_DOT_ENV, "dequant")
    assert cfg("mxfp4", 2, "sm_100")["DOT_SCALED"] == 0
    monkeypatch.setenv(W.MX_DOT_ENV, "fp4")
    with pytest.raises(ValueError, match="MOE_KERNELS_MXFP4_DOT"):
        cfg("mxfp4", 2, "sm_100")


@needs_interp
def test_fused_moe_takes_the_scaled_dot_on_sm100(monkeypatch):
    """fused_moe (backend triton) with the configs of sm_100: both GEMMs launch with DOT_SCALED, and the result is
    the dequantized reference's."""
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_100")
    monkeypatch.delenv(W.MX_DOT_ENV, raising=False)
    T, H, I, E, k = 9, 64, 96, 4, 2
    x = torch.randn(T, H).half()
    w13 = mk.quantize(torch.randn(E, 2 * I, H) / H**0.5, "mxfp4")
    w2 = mk.quantize(torch.randn(E, H, I) / I**0.5, "mxfp4")
    w, ids = mk.topk_gating(torch.randn(T, E), k)
    b13, b2 = torch.randn(E, 2 * I) * 0.1, torch.randn(E, H) * 0.1
    modes = []
    orig = W.wna16_grouped_gemm_kernel.run

    def spy(*args, **kwargs):
        modes.append(kwargs.get("DOT_SCALED"))
        return orig(*args, **kwargs)

    monkeypatch.setattr(W.wna16_grouped_gemm_kernel, "run", spy)
    y = mk.fused_moe(x, w13, w2, w, ids, activation="swiglu_oai", w13_bias=b13, w2_bias=b2, backend="triton")
    assert modes == [W.DOT_SCALED_MODES["bf16"]] * 2
    ref = mk.fused_moe(x.double(), w13.dequantize(torch.float64), w2.dequantize(torch.float64), w.double(), ids,
                       activation="swiglu_oai", w13_bias=b13.double(), w2_bias=b2.double(), backend="torch")
    assert_close("out", y, ref, rms_tol=2e-3, max_tol=1e-2)


def test_bad_config_is_refused():
    x, qw, offs = _case()
    with pytest.raises(ValueError, match="DOT_SCALED needs mxfp4"):
        _run(x, qw, offs, W.DOT_SCALED_MODES["bf16"])  # fp32 activations
    with pytest.raises(ValueError, match="does not fit"):
        _run(x.half(), qw, offs, W.DOT_SCALED_MODES["bf16"], bk=16)


def test_compiles_to_the_scaled_mma_for_sm100a():
    """gpt-oss-120b's fused MoE on sm_100 as it launches (meta tensors, the launch recorder, Triton's own
    launch-time specialisation): tcgen05 MMA, block-scaled with MXFP8 activations; shared memory within sm_100's
    limit (compiled, never run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(HERE, "dot_scaled_compile_check.py"), "gemm1"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    lines = out.stdout
    assert re.search(r"bf16 .*tcgen05\.mma\S*kind::f16", lines), lines
    assert re.search(r"mxfp8 .*tcgen05\.mma\S*kind::mxf8f6f4\.block_scale", lines), lines
