"""The CUDA decode path of quantized experts (fp8, int8, int4, mxfp4).

Without a GPU: the kernel's unpacking, dequantization and activation quantization
(csrc/include/moe_kernels/quant_decode.cuh) built for the host and checked bit for bit against
``QuantizedWeight.dequantize()`` and ``quantize_activation``; the dispatch (``supports`` reasons, what ``auto``
picks). With a GPU (``gpu`` tests): the kernels against float64 references, inputs built on CPU.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_kernels as mk
from moe_kernels import _cuda_quant as cq
from moe_kernels import _quant_ops as qo
from moe_kernels.quant import quantize_activation
from moe_kernels.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
HARNESS_SRC = ROOT / "tests" / "cuda_host" / "quant_decode_harness.cpp"
HEADER = ROOT / "csrc" / "include" / "moe_kernels" / "quant_decode.cuh"
FMT_CODE = {"fp8": 0, "fp8_e5m2": 1, "int8": 2, "int4": 3, "mxfp4": 4}


def _compiler():
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++, c++ or clang++) to build the decode harness")
    exe = tmp_path_factory.mktemp("harness") / "quant_decode_harness"
    cmd = [cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'include'}", "-o", str(exe), str(HARNESS_SRC)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"building the harness failed:\n{res.stderr}"
    return exe


def run(harness, tmp_path, cmd, payload=None, *args):
    out = tmp_path / "out.bin"
    argv = [str(harness), cmd, *map(str, args)]
    if payload is not None:
        inp = tmp_path / "in.bin"
        inp.write_bytes(payload)
        argv.append(str(inp))
    argv.append(str(out))
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


def f32(buf, offset=0, count=-1):
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=count, offset=offset * 4).copy())


def bits_equal(a, b):
    """Bit-exact equality of fp32 tensors, any NaN matching any NaN."""
    a, b = a.float(), b.float()
    same = (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))
    return bool(same.all()), (~same).nonzero()[:5].flatten().tolist()


# ----- host harness: the kernel's functions, bit for bit ----------------------------------------------


def test_every_code_decodes_exactly(harness, tmp_path):
    out = f32(run(harness, tmp_path, "codes"))
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    from moe_kernels.quant_int import e8m0_to_float, fp4_to_float

    for name, got, want in (("e4m3", out[:256], codes.view(torch.float8_e4m3fn).float()),
                            ("e5m2", out[256:512], codes.view(torch.float8_e5m2).float()),
                            ("e2m1", out[512:528], fp4_to_float(codes[:16])),
                            ("e8m0", out[528:], e8m0_to_float(codes))):
        ok, bad = bits_equal(got, want)
        assert ok, f"{name}: codes {bad} decode differently"


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp32_to_fp8_rounds_as_torch(harness, tmp_path, dtype):
    fmax = torch.finfo(dtype).max
    v = torch.cat([torch.randn(4000) * s for s in (1e-4, 1e-2, 1, 30, fmax / 4)])
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2  # ties between neighbouring codes: round half to even
    mids = torch.sort(torch.cat([grid, -grid]))[0]
    mids = (mids[:-1] + mids[1:]) / 2
    specials = torch.tensor([0.0, -0.0, fmax, -fmax, fmax * 1.03, -fmax * 2, float("inf"), float("-inf"), float("nan"),
                             1e-30, -1e-30])
    v = torch.cat([v, mids, grid, specials]).float()
    codes = torch.from_numpy(np.frombuffer(run(harness, tmp_path, "encode", v.numpy().tobytes(),
                                               int(dtype == torch.float8_e5m2)), dtype=np.uint8).copy())
    want = v.clamp(-fmax, fmax).to(dtype).float()  # the reference saturates, then rounds
    ok, bad = bits_equal(codes.view(dtype).float(), want)
    assert ok, f"values {v[bad].tolist()} encode differently"


@pytest.mark.parametrize("mode,group", [("group", 128), ("group", 32), ("token", 0), ("tensor", 0)])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_activation_quantization_bit_exact(harness, tmp_path, mode, group, dtype):
    R, K = 7, 200  # a partial last group
    a = torch.randn(R, K) * torch.rand(R, 1) * 20
    a[2] = 0  # a zero row: the scale floor
    a[4, 5] = 1e-6
    a = a.bfloat16().float()  # what the kernel reads: activations in their dtype, converted exactly
    g = group if mode == "group" else K
    hdr = np.array([R, K, g, {"group": 0, "token": 1, "tensor": 2}[mode], int(dtype == torch.float8_e5m2)], np.int64)
    out = run(harness, tmp_path, "quant", hdr.tobytes() + a.numpy().tobytes())
    q, s = quantize_activation(a, mode, g, dtype)
    got_s = f32(out, 0, s.numel()).view_as(s)
    got_q = f32(out, s.numel()).view(R, K)
    ok, bad = bits_equal(got_s, s)
    assert ok, f"scales {bad} differ"
    ok, bad = bits_equal(got_q, q.float())
    assert ok, f"quantized values {bad} differ"


DEQ_CASES = {"fp8_tensor": ("fp8", {}), "fp8_channel": ("fp8", dict(per_channel=True)),
             "fp8_block128": ("fp8", dict(block_shape=(128, 128))), "fp8_block64x32": ("fp8", dict(block_shape=(64, 32))),
             "e5m2_block": ("fp8_e5m2", dict(block_shape=(32, 64))), "int8": ("int8", {}),
             "int8_g32": ("int8", dict(group_size=32)), "int4_g16": ("int4", dict(group_size=16)),
             "int4_g128": ("int4", dict(group_size=128)), "int4_zp": ("int4", dict(group_size=32, zero_point=True)),
             "mxfp4": ("mxfp4", {})}


def _dequant_payload(qw: mk.QuantizedWeight):
    E, N, K = qw.shape
    if qw.fmt.startswith("fp8"):
        scale, bn, bk = qw.scale_blocks()
        scale = scale.contiguous()
        s_strides = scale.stride()
    else:
        scale, bn, bk = qw.scale.contiguous(), 1, qw.group_size or K
        s_strides = scale.stride() if scale.dim() == 3 else (*scale.stride(), 0)
    data = qw.data.contiguous().view(torch.uint8).numpy().tobytes()
    sbytes = scale.numpy().tobytes()
    zero = qw.zero.contiguous().numpy().tobytes() if qw.zero is not None else b""
    z_strides = qw.zero.stride()[:2] if qw.zero is not None else (0, 0)
    hdr = np.array([FMT_CODE[qw.fmt], E, N, K, bn, bk, *s_strides, *z_strides, len(data), len(sbytes), len(zero)],
                   np.int64)
    return hdr.tobytes() + data + sbytes + zero


@pytest.mark.parametrize("case", list(DEQ_CASES))
def test_dequantize_chunks_bit_exact(harness, tmp_path, case):
    fmt, kw = DEQ_CASES[case]
    E, N = 3, 40
    K = 256 if fmt in ("int4", "mxfp4") or "g32" in case else 200  # fp8 / per-channel int8: a partial last chunk
    w = torch.randn(E, N, K) * torch.rand(E, N, 1) * 4
    w[1, :8] = 0  # zero groups: the scale floor, code 0
    qw = mk.quantize(w, fmt, **kw)
    if fmt == "mxfp4":  # every e8m0 scale the format has, the NaN one included
        qw = mk.QuantizedWeight(data=qw.data, scale=torch.randint(0, 256, qw.scale.shape, dtype=torch.uint8),
                                fmt="mxfp4", group_size=32)
    got = f32(run(harness, tmp_path, "dequant", _dequant_payload(qw))).view(E, N, K)
    ok, bad = bits_equal(got, qw.dequantize(torch.float32))
    assert ok, f"{case}: elements {bad} differ from QuantizedWeight.dequantize()"


def test_fp8_nan_weights_and_raw_zero_points(harness, tmp_path):
    """NaN codes of a checkpoint stay NaN; random raw int4 zero points unpack as dequantize() reads them."""
    E, N, K = 2, 16, 64
    data = torch.randint(0, 256, (E, N, K), dtype=torch.int32).to(torch.uint8)
    qw = mk.QuantizedWeight(data=data.view(torch.float8_e4m3fn), scale=torch.rand(E, N, 1) + 0.5)
    got = f32(run(harness, tmp_path, "dequant", _dequant_payload(qw))).view(E, N, K)
    ok, bad = bits_equal(got, qw.dequantize(torch.float32))
    assert ok and torch.isnan(got).any(), bad
    qw = mk.QuantizedWeight(data=data[:, :, :32].contiguous(), scale=torch.rand(E, N, 4), fmt="int4", group_size=16,
                            zero=torch.randint(0, 256, (E, N // 2, 4), dtype=torch.int32).to(torch.uint8))
    got = f32(run(harness, tmp_path, "dequant", _dequant_payload(qw))).view(E, N, K)
    ok, bad = bits_equal(got, qw.dequantize(torch.float32))
    assert ok, bad


# ----- dispatch: what the cuda decode backend accepts, and why it refuses ----------------------------


def moe_case(T, H, I, E, k, gated=True, bias=False, device="cpu"):
    x = torch.randn(T, H)
    w13 = torch.randn(E, (2 if gated else 1) * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    tw, ti = mk.topk_gating(torch.randn(T, E), k)
    b13 = torch.randn(E, w13.shape[1]) * 0.1 if bias else None
    b2 = torch.randn(E, H) * 0.1 if bias else None
    return tuple(t.to(device) if t is not None else None for t in (x, w13, w2, tw, ti, b13, b2))


def fp8_args(x, q13, q2, tw, ti, mode="dynamic"):
    """The arguments ``fused_moe`` gives the fp8 op (and every backend's ``supports``)."""
    s13, bn13, bk13 = q13.scale_blocks()
    s2, bn2, bk2 = q2.scale_blocks()
    return (x, q13.data, s13, bn13, bk13, q2.data, s2, bn2, bk2, tw, ti, "silu", True, None, None, False, None, None,
            q13.activation_group(), None, q2.activation_group(), None)


def wna16_args(x, q13, q2, tw, ti):
    return (x, q13.data, q13.scale, q13.zero, q2.data, q2.scale, q2.zero, q13.fmt, q13.group_size or 0,
            q2.group_size or 0, tw, ti, "silu", True, None, None, False, None, None)


def test_fp8_decode_supports_reasons():
    x, w13, w2, tw, ti, _, _ = moe_case(3, 256, 128, 8, 2)
    q13, q2 = mk.quantize(w13, block_shape=(128, 128)), mk.quantize(w2, block_shape=(128, 128))
    assert cq.fp8_decode_supports(*fp8_args(x.bfloat16(), q13, q2, tw, ti)) is None
    for layout in ({}, dict(per_channel=True), dict(block_shape=(64, 32))):  # every layout, partial blocks included
        a, b = mk.quantize(w13[:, :, :208], **layout), mk.quantize(w2[:, :208], **layout)
        assert cq.fp8_decode_supports(*fp8_args(x[:, :208].half(), a, b, tw, ti)) is None, layout
    with mk.batch_invariant():
        assert "batch-invariant" in cq.fp8_decode_supports(*fp8_args(x, q13, q2, tw, ti))
    assert "float64" in cq.fp8_decode_supports(*fp8_args(x.double(), q13, q2, tw, ti))
    assert "float16 / bfloat16 activations" in cq.fp8_decode_supports(*fp8_args(x.float(), q13, q2, tw, ti))
    x = x.bfloat16()
    big_x, _, _, big_tw, big_ti, _, _ = moe_case(40, 256, 128, 8, 2)  # 80 rows for 8 experts: prefill
    assert "not a decode batch" in cq.fp8_decode_supports(*fp8_args(big_x.bfloat16(), q13, q2, big_tw, big_ti))
    odd13 = mk.quantize(w13, block_shape=(128, 40))  # scale groups of 40 columns: not per 16
    why = cq.fp8_decode_supports(*fp8_args(x, odd13, q2, tw, ti))
    assert "w13's groups along K must be multiples of 16" in why and "40" in why
    one_block = mk.quantize(w13[:, :, :48], block_shape=(128, 50))  # one block over K: any width
    assert cq.fp8_decode_supports(*fp8_args(x[:, :48], one_block, mk.quantize(w2[:, :48], block_shape=(128, 128)),
                                            tw, ti)) is None
    odd_k = mk.quantize(w13[:, :, :200])
    why = cq.fp8_decode_supports(*fp8_args(x[:, :200], odd_k, mk.quantize(w2[:, :200]), tw, ti))
    assert "K must be a multiple of 16, got 200" in why
    padded = torch.zeros(8, 256, 264, dtype=torch.float8_e4m3fn)[:, :, :256]  # rows of 264 bytes: not 16-aligned
    misaligned = mk.QuantizedWeight(data=padded, scale=q13.scale, block_shape=(128, 128))
    assert "16-byte aligned rows of w13" in cq.fp8_decode_supports(*fp8_args(x, misaligned, q2, tw, ti))
    many = torch.zeros(3, 2, dtype=torch.int32)
    assert "E <= 1024" in cq.fp8_decode_supports(x, torch.empty(1025, 8, 256, dtype=torch.float8_e4m3fn),
                                                 torch.ones(1025, 1, 1), 8, 256, q2.data, *q2.scale_blocks(), tw, many)


def test_wna16_decode_supports_reasons():
    x, w13, w2, tw, ti, _, _ = moe_case(2, 96, 64, 6, 2)
    for fmt, kw in (("int8", {}), ("int8", dict(group_size=32)), ("int4", dict(group_size=16)),
                    ("int4", dict(group_size=32, zero_point=True)), ("mxfp4", {})):
        q13, q2 = mk.quantize(w13, fmt, **kw), mk.quantize(w2, fmt, **kw)
        assert cq.wna16_decode_supports(*wna16_args(x.bfloat16(), q13, q2, tw, ti)) is None, (fmt, kw)
    x = x.half()
    q13, q2 = mk.quantize(w13, "int8", group_size=24), mk.quantize(w2, "int8", group_size=32)
    why = cq.wna16_decode_supports(*wna16_args(x, q13, q2, tw, ti))
    assert "w13's groups along K must be multiples of 16" in why and "24" in why
    odd = mk.quantize(torch.randn(6, 128, 45), "int8")  # per channel: groups are no limit, 16-element loads are
    why = cq.wna16_decode_supports(*wna16_args(x[:, :45], odd, mk.quantize(torch.randn(6, 45, 64), "int8"), tw, ti))
    assert "K must be a multiple of 16, got 45" in why
    q4 = mk.quantize(torch.randn(6, 128, 80), "int4", group_size=16)  # 32 int4 elements a 16-byte load
    why = cq.wna16_decode_supports(*wna16_args(x[:, :80], q4, mk.quantize(torch.randn(6, 80, 64), "int4",
                                                                          group_size=16), tw, ti))
    assert "K must be a multiple of 32, got 80" in why
    assert "float64" in cq.wna16_decode_supports(*wna16_args(x.double(), q13, q2, tw, ti))


@pytest.fixture
def cuda_here(monkeypatch):
    """The backend table as on a GPU with the extension (the kernels are not called)."""
    from moe_kernels import _backends

    monkeypatch.setattr(_backends, "_cuda_status", lambda: (True, "moe_kernels._C (as on a GPU)"))
    return _backends


def test_auto_picks_the_cuda_decode_kernel_for_decode_batches(cuda_here):
    x, w13, w2, tw, ti, _, _ = moe_case(3, 128, 64, 8, 2)
    x, dev = x.bfloat16(), torch.device("cuda")
    q13, q2 = mk.quantize(w13, block_shape=(64, 64)), mk.quantize(w2, block_shape=(64, 64))
    assert cuda_here.select("fp8_fused_moe", "auto", dev, *fp8_args(x, q13, q2, tw, ti)) is cq.fp8_fused_moe_decode
    i13, i2 = mk.quantize(w13, "int4", group_size=32), mk.quantize(w2, "int4", group_size=32)
    assert cuda_here.select("wna16_fused_moe", "auto", dev, *wna16_args(x, i13, i2, tw, ti)) is cq.wna16_fused_moe_decode
    # prefill: cuda refuses with its reason and auto takes the next backend
    bx, _, _, btw, bti, _, _ = moe_case(64, 128, 64, 8, 2)
    args = fp8_args(bx.bfloat16(), q13, q2, btw, bti)
    assert cuda_here.select("fp8_fused_moe", "auto", dev, *args) is not cq.fp8_fused_moe_decode
    assert "not a decode batch" in cuda_here.not_supported_reasons("fp8_fused_moe", dev, *args)["cuda"]
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve these inputs: more than 4 rows per expert"):
        cuda_here.select("fp8_fused_moe", "cuda", dev, *args)
    odd = mk.quantize(w13, "int8", group_size=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        cuda_here.select("wna16_fused_moe", "cuda", dev, *wna16_args(x, odd, mk.quantize(w2, "int8"), tw, ti))


def test_public_calls_pass_every_argument_to_supports(monkeypatch):
    """fused_moe hands the cuda backend's supports the routing (it tells decode from prefill by topk_ids)."""
    from moe_kernels import _backends

    seen = {}
    for op, supports in (("fp8_fused_moe", cq.fp8_decode_supports), ("wna16_fused_moe", cq.wna16_decode_supports)):
        def spy(*args, _op=op, _s=supports, **kw):
            seen[_op] = len(args)
            return _s(*args, **kw)

        monkeypatch.setitem(_backends._IMPLS[op], "cuda", (_backends._IMPLS[op]["cuda"][0], spy))
    monkeypatch.setattr(_backends, "_cuda_status", lambda: (True, "as on a GPU"))
    x, w13, w2, tw, ti, _, _ = moe_case(3, 64, 32, 4, 2)
    for fmt in ("fp8", "int4"):
        y = mk.fused_moe(x, mk.quantize(w13, fmt), mk.quantize(w2, fmt), tw, ti)  # CPU tensors: cuda refuses first
        assert y.shape == x.shape
    assert not seen  # a CPU tensor never reaches the cuda supports
    reasons = _backends.not_supported_reasons("fp8_fused_moe", torch.device("cuda"), *fp8_args(
        x.half(), mk.quantize(w13), mk.quantize(w2), tw, ti))
    assert "cuda" not in reasons and seen["fp8_fused_moe"] == 22


def test_cuda_backend_on_cpu_says_why():
    x, w13, w2, tw, ti, _, _ = moe_case(3, 64, 32, 4, 2)
    for fmt in ("fp8", "mxfp4"):
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
            mk.fused_moe(x, mk.quantize(w13, fmt), mk.quantize(w2, fmt), tw, ti, backend="cuda")


# ----- the decode pipeline's wiring, on CPU: the CUDA ops replaced by emulators of their contract -----


def schema_arity(op_name):
    import re

    text = (ROOT / "csrc" / "torch_bindings.cpp").read_text()
    joined = re.sub(r'"\s*"', "", text)  # the C++ string literals split over lines, joined
    schema = re.search(rf'"({op_name}\(.*?\) -> [^"]*)"', joined).group(1)
    return len(torch._C.parse_schema(schema).arguments)


def _rows_read(x, slots, top_k, row_weights, r):
    """Row r as the kernels read it: gathered through its slot, scaled by its weight (rounded to x's dtype)."""
    slot = int(slots[r]) if slots is not None else r
    if slot < 0:
        return None, slot
    v = x[slot // top_k if slots is not None else r].float()
    if row_weights is not None:
        v = (v * row_weights[slot]).to(x.dtype).float()
    return v, slot


def emu_amax(x, slots, top_k, row_weights, group, per_tensor):
    assert x.dtype in (torch.float16, torch.bfloat16) and group >= 1
    rows, K = (slots.shape[0] if slots is not None else x.shape[0]), x.shape[1]
    G = -(-K // group)
    out = torch.zeros(rows, G)
    for r in range(rows):
        v, _ = _rows_read(x, slots, top_k, row_weights, r)
        if v is not None:
            for g in range(G):
                out[r, g] = v[g * group:(g + 1) * group].abs().max()
    return out.amax().reshape(1) if per_tensor else out


def emu_qgemm(x, w, fmt, w_scale, w_zero, bn, bk, offsets, bias, slots, gather_top_k, activation, gated, row_weights,
              scale_input, scatter_slots, act_mode, act_scale, act_group, act_by_routed_row):
    """The launcher's checks and the kernel's arithmetic (quant_small_gemm.cuh) in float64."""
    from moe_kernels import reference as ref
    from moe_kernels.quant import dequantize_blocks
    from moe_kernels.quant_int import PACKED, dequantize_raw

    K = x.shape[1]
    assert x.dtype in (torch.float16, torch.bfloat16) and K == w.shape[2] * (2 if fmt in PACKED else 1)
    assert K % (32 if fmt in PACKED else 16) == 0 and (bk % 16 == 0 or bk >= K)
    if fmt.startswith("fp8"):
        wd = dequantize_blocks(w, w_scale, bn, bk, torch.float64)
    else:
        assert bn == 1
        wd = dequantize_raw(fmt, w, w_scale, w_zero, bk if bk < K else (K if w_scale.dim() == 3 else 0), torch.float64)
    n_w = wd.shape[1]
    N = n_w // 2 if gated else n_w
    P = slots.shape[0] if slots is not None else x.shape[0]
    y = torch.full((scatter_slots, N), float("nan"), dtype=x.dtype) if scatter_slots else torch.zeros(P, N, dtype=x.dtype)
    fmax = torch.finfo(w.dtype).max if fmt.startswith("fp8") else None
    for e in range(wd.shape[0]):
        for r in range(int(offsets[e]), int(offsets[e + 1])):
            v, slot = _rows_read(x, slots if gather_top_k else None, max(gather_top_k, 1),
                                 row_weights if scale_input else None, r) if gather_top_k or slots is None else (
                None, None)
            if not gather_top_k and slots is not None:  # rows in expert order: row r, kept where its slot is
                slot = int(slots[r])
                v = x[r].float() if slot >= 0 else None
                if v is not None and scale_input and row_weights is not None:
                    v = (v * row_weights[slot]).to(x.dtype).float()
            if v is None:
                if not scatter_slots:
                    y[r] = 0
                continue
            if act_mode != "none":
                q = r if act_by_routed_row else (slot // gather_top_k if gather_top_k else r)
                cols = torch.arange(K)
                s = {"group": lambda: act_scale[q, cols // act_group], "token": lambda: act_scale[q, 0].expand(K)}.get(
                    act_mode, lambda: act_scale.reshape(1)[0].expand(K))().float()
                if act_mode != "static":
                    s = s.clamp(min=1e-10) / fmax
                v = (v / s).clamp(-fmax, fmax).to(w.dtype).float().double() * s.double()
            h = wd[e] @ v.double()
            if bias is not None:
                h = h + bias[e].float().double()  # fp32 bias, as the reference
            out = h[:N] if activation == "none" else ref.activation(h[None], activation, gated)[0]
            if row_weights is not None and not scale_input:
                out = out * float(row_weights[slot])
            y[slot if scatter_slots else r] = out.to(x.dtype)
    return y


def emu_unpermute(y_slots, slots, kept, top_k, weights):
    from moe_kernels import reference as ref

    assert weights is None
    return ref.unpermute(y_slots.float(), kept, top_k, None).to(y_slots.dtype)


@pytest.fixture
def emulated(monkeypatch):
    from moe_kernels import reference as ref

    calls = []

    def recorded(name, fn):
        def call(*args):
            assert len(args) == schema_arity(name), f"{name}: {len(args)} arguments, the schema has {schema_arity(name)}"
            calls.append(name)
            return fn(*args)
        return call

    monkeypatch.setattr(cq, "_QGEMM", recorded("grouped_gemm_small_quant_cuda", emu_qgemm))
    monkeypatch.setattr(cq, "_AMAX", recorded("act_amax_cuda", emu_amax))
    monkeypatch.setattr(cq, "_PLAN", recorded("plan_routing_cuda",
                                              lambda ids, E, b, cap, emap: ref.plan_routing(ids, E, b, cap, emap)))
    monkeypatch.setattr(cq, "_UNPERMUTE", recorded("unpermute_cuda", emu_unpermute))
    return calls


@pytest.mark.parametrize("case", ["block", "channel", "tensor", "static", "on_input_group", "on_input_tensor",
                                  "capacity_bias", "expert_map", "e5m2_plain", "weight_only"])
def test_fp8_decode_pipeline_wiring(emulated, case):
    """The Python side of the decode path (which op gets which rows, scales, modes and flags) against the
    reference pipeline, with each CUDA op replaced by an emulator of its contract and its schema's arity."""
    E, k = 6, 2
    x, w13, w2, tw, ti, b13, b2 = moe_case(5, 64, 48, E, k, gated=case != "e5m2_plain", bias=case == "capacity_bias")
    layout = {"channel": dict(per_channel=True), "tensor": {}, "static": {}, "on_input_tensor": {},
              "expert_map": {}}.get(case, dict(block_shape=(32, 32)))
    fmt = "fp8_e5m2" if case.startswith("e5m2") else "fp8"
    q13, q2 = mk.quantize(w13, fmt, **layout), mk.quantize(w2, fmt, **layout)
    kw = {}
    if case == "static":
        kw = dict(a13_scale=(x.abs().max() / 300).reshape(1), a2_scale=torch.tensor([0.02]))
    elif case.startswith("on_input"):
        kw = dict(apply_router_weight_on_input=True)
        ti, tw = ti[:, :1], tw[:, :1]
    elif case == "capacity_bias":
        kw = dict(capacity=2, w13_bias=b13, w2_bias=b2)
    elif case == "expert_map":
        kw = dict(expert_map=torch.tensor([0, -1, 1, 2, -1, 3, 4, 5], dtype=torch.int32))
        ti = torch.randint(0, 8, ti.shape, dtype=torch.int32)
    elif case == "e5m2_plain":
        kw = dict(activation="gelu", gated=False)
    x = x.bfloat16()
    args = list(fp8_args(x, q13, q2, tw, ti))
    args[11:13] = [kw.get("activation", "silu"), kw.get("gated", True)]
    args[13:18] = [kw.get("w13_bias"), kw.get("w2_bias"), kw.get("apply_router_weight_on_input", False),
                   kw.get("capacity"), kw.get("expert_map")]
    if case == "static":
        args[18:22] = ["static", kw["a13_scale"], "static", kw["a2_scale"]]
    if case == "weight_only":  # the sm_80 path: activations unquantized
        args[18], args[20] = "none", "none"
    y = cq.fp8_fused_moe_decode(*args)
    if case == "weight_only":
        expected = mk.fused_moe(x.double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw, ti,
                                backend="torch")
    else:
        expected = fp8_expected(x.float(), q13, q2, tw, ti, torch.bfloat16, kw)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert max_rel(y, expected) <= 1e-2, case
    n_amax = sum(m in ("group", "token", "tensor") for m in (args[18], args[20]))
    assert emulated.count("act_amax_cuda") == n_amax and emulated.count("grouped_gemm_small_quant_cuda") == 2


@pytest.mark.parametrize("name", ["int8", "int8_g32", "int4_g16", "int4_zp", "mxfp4"])
@pytest.mark.parametrize("case", ["plain", "on_input_bias"])
def test_weight_only_decode_pipeline_wiring(emulated, name, case):
    x, w13, w2, tw, ti, b13, b2 = moe_case(4, 64, 64, 5, 2, bias=case != "plain")
    fmt, qkw = INT_FMTS[name]
    q13, q2 = mk.quantize(w13, fmt, **qkw), mk.quantize(w2, fmt, **qkw)
    kw = {} if case == "plain" else dict(apply_router_weight_on_input=True, w13_bias=b13, w2_bias=b2)
    if kw:
        ti, tw = ti[:, :1], tw[:, :1]
    x = x.half()
    args = list(wna16_args(x, q13, q2, tw, ti))
    args[14:17] = [kw.get("w13_bias"), kw.get("w2_bias"), bool(kw)]
    y = cq.wna16_fused_moe_decode(*args)
    expected = mk.fused_moe(x.double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw, ti,
                            backend="torch", **{n: _d(v) for n, v in kw.items()})
    assert max_rel(y, expected) <= 1e-2, name
    assert "act_amax_cuda" not in emulated


# ----- on a GPU: the kernels against float64 references (inputs built on CPU) -------------------------

HAS_CUDA_EXT = torch.cuda.is_available() and cq._C is not None
needs_gpu = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a GPU and the moe_kernels._C extension")
FP8_LAYOUTS = {"tensor": {}, "channel": dict(per_channel=True), "block128": dict(block_shape=(128, 128)),
               "block64x32": dict(block_shape=(64, 32))}
INT_FMTS = {"int8": ("int8", {}), "int8_g32": ("int8", dict(group_size=32)), "int4_g16": ("int4", dict(group_size=16)),
            "int4_zp": ("int4", dict(group_size=64, zero_point=True)), "mxfp4": ("mxfp4", {})}


def max_rel(a, b):
    b = b.double().cpu()
    return ((a.double().cpu() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() if b.numel() else 0.0


def _d(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def fp8_expected(x, q13, q2, tw, ti, dtype, kw):
    s13, bn13, bk13 = q13.scale_blocks()
    s2, bn2, bk2 = q2.scale_blocks()
    a13, a2 = kw.get("a13_scale"), kw.get("a2_scale")
    return qo.fp8_fused_moe_reference(
        x.to(dtype).double(), q13.data, s13, bn13, bk13, q2.data, s2, bn2, bk2, tw, ti, kw.get("activation", "silu"),
        kw.get("gated", True), _d(kw.get("w13_bias")), _d(kw.get("w2_bias")), kw.get("apply_router_weight_on_input", False),
        kw.get("capacity"), kw.get("expert_map"), "static" if a13 is not None else q13.activation_group(), a13,
        "static" if a2 is not None else q2.activation_group(), a2, inter_dtype=dtype)


def run_cuda(x, q13, q2, tw, ti, dtype, kw):
    dev = "cuda"
    kw = {n: v.to(dev) if isinstance(v, torch.Tensor) else v for n, v in kw.items()}
    with torch.inference_mode():
        return mk.fused_moe(x.to(dtype).to(dev), q13.to(dev), q2.to(dev), tw.to(dev), ti.to(dev), backend="cuda", **kw)


@pytest.mark.parametrize("layout", list(FP8_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.gpu
@needs_gpu
def test_fp8_decode_matches_reference(layout, dtype, fmt, T):
    x, w13, w2, tw, ti, _, _ = moe_case(T, 208, 176, 6, 2)  # K, N = 208, 352: partial blocks
    ti = torch.where(ti == 4, 5, ti)  # expert 4 gets no tokens
    q13, q2 = mk.quantize(w13, fmt, **FP8_LAYOUTS[layout]), mk.quantize(w2, fmt, **FP8_LAYOUTS[layout])
    if torch.cuda.get_device_capability() < (8, 9):  # weight-only there: activations unquantized
        expected = mk.fused_moe(x.to(dtype).double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw, ti,
                                backend="torch")
    else:
        expected = fp8_expected(x, q13, q2, tw, ti, dtype, {})
    y = run_cuda(x, q13, q2, tw, ti, dtype, {})
    dense = mk.fused_moe(x.to(dtype).double(), w13.double(), w2.double(), tw, ti, backend="torch")
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert max_rel(y, expected) <= 1e-2
    assert max_rel(y, dense) <= max_rel(expected, dense) + 1e-2


@pytest.mark.parametrize("case", ["swiglu_oai_bias", "gelu_plain", "capacity", "expert_map", "on_input", "static",
                                  "k_eq_E", "T0", "e257"])
@pytest.mark.gpu
@needs_gpu
def test_fp8_decode_cases(case):
    gated = not case.endswith("_plain")
    E, k, T = {"k_eq_E": (3, 3, 4), "e257": (257, 1, 3)}.get(case, (5, 2, 7))
    x, w13, w2, tw, ti, b13, b2 = moe_case(T if case != "T0" else 0, 160, 96, E, k, gated=gated,
                                           bias=case in ("capacity", "swiglu_oai_bias"))
    kw, layout = {}, "block64x32"
    if case == "swiglu_oai_bias":
        kw, layout = dict(activation="swiglu_oai", w13_bias=b13, w2_bias=b2), "block128"
    elif case == "gelu_plain":
        kw, layout = dict(activation="gelu", gated=False), "channel"
    elif case == "capacity":
        kw = dict(capacity=2, w13_bias=b13, w2_bias=b2)
    elif case == "expert_map":
        kw, layout = dict(expert_map=torch.tensor([0, -1, 1, 2, -1, 3, 4, -1], dtype=torch.int32)), "tensor"
        ti = torch.randint(0, 8, ti.shape, dtype=torch.int32)
    elif case == "on_input":
        ti, tw, kw, layout = ti[:, :1], tw[:, :1], dict(apply_router_weight_on_input=True), "channel"
    elif case == "static":
        kw, layout = dict(a13_scale=(x.abs().max() / 300).reshape(1), a2_scale=torch.tensor([0.02])), "tensor"
    q13, q2 = mk.quantize(w13, **FP8_LAYOUTS[layout]), mk.quantize(w2, **FP8_LAYOUTS[layout])
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("activation quantization needs fp8 tensor cores (sm_89+); sm_80 runs the weight-only path")
    y = run_cuda(x, q13, q2, tw, ti, torch.bfloat16, kw)
    assert y.shape == x.shape
    if T:
        assert max_rel(y, fp8_expected(x, q13, q2, tw, ti, torch.bfloat16, kw)) <= 1e-2, case


@pytest.mark.parametrize("name", list(INT_FMTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "swiglu_oai_bias", "on_input", "expert_map"])
@pytest.mark.gpu
@needs_gpu
def test_weight_only_decode_matches_reference(name, dtype, case):
    x, w13, w2, tw, ti, b13, b2 = moe_case(6, 256, 128, 6, 2, bias=case == "swiglu_oai_bias")
    kw = {}
    if case == "swiglu_oai_bias":
        kw = dict(activation="swiglu_oai", w13_bias=b13, w2_bias=b2)
    elif case == "on_input":
        ti, tw, kw = ti[:, :1], tw[:, :1], dict(apply_router_weight_on_input=True)
    elif case == "expert_map":
        kw = dict(expert_map=torch.tensor([0, -1, 1, 2, -1, 3, 4, 5], dtype=torch.int32))
        ti = torch.randint(0, 8, ti.shape, dtype=torch.int32)
    fmt, qkw = INT_FMTS[name]
    q13, q2 = mk.quantize(w13, fmt, **qkw), mk.quantize(w2, fmt, **qkw)
    y = run_cuda(x, q13, q2, tw, ti, dtype, kw)
    expected = mk.fused_moe(x.to(dtype).double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw, ti,
                            backend="torch", **{n: _d(v) for n, v in kw.items()})
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert max_rel(y, expected) <= 1e-2, (name, case)


@pytest.mark.gpu
@needs_gpu
def test_decode_nan_propagates_and_compiles_and_captures():
    """A NaN token gives NaN rows only where it is routed; the decode path traces under torch.compile(fullgraph)
    with a dynamic token count and replays in a CUDA graph, deterministically."""
    x, w13, w2, tw, ti, _, _ = moe_case(4, 128, 64, 8, 2)
    q13 = mk.quantize(w13, block_shape=(64, 64)).to("cuda")
    q2 = mk.quantize(w2, block_shape=(64, 64)).to("cuda")
    x, tw, ti = x.cuda().bfloat16(), tw.cuda(), ti.cuda()

    def f(x, tw, ti):
        return mk.fused_moe(x, q13, q2, tw, ti, backend="cuda")

    with torch.inference_mode():
        ref = f(x, tw, ti)
        assert torch.equal(ref, f(x, tw, ti))
        xn = x.clone()
        xn[1, 3] = float("nan")
        yn = f(xn, tw, ti)
        assert torch.isnan(yn[1]).all() and torch.equal(yn[[0, 2, 3]], ref[[0, 2, 3]])  # per-token groups
        compiled = torch.compile(f, fullgraph=True, dynamic=True)
        for T in (4, 3):
            torch.testing.assert_close(compiled(x[:T], tw[:T], ti[:T]), f(x[:T], tw[:T], ti[:T]), rtol=0, atol=0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = f(x, tw, ti)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)


def test_ops_opcheck():
    """Everywhere: the argument lists match the schemas. On a GPU: torch.library.opcheck of both ops (fake
    implementations, schema, autograd registration)."""
    x = torch.randn(6, 64).bfloat16()
    qw = mk.quantize(torch.randn(3, 32, 64), block_shape=(16, 32))
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int32)
    slots = torch.tensor([0, 3, 1, 2, 5, 4], dtype=torch.int32)
    amax_args = (x, None, 1, None, 32, False)  # the first GEMM without weights on input: per token of x
    assert len(amax_args) == schema_arity("act_amax_cuda")
    gemm_args = [x, qw.data, "fp8", qw.scale, None, 16, 32, offsets, None, slots, 2, "silu", True, None, True, 0, "group",
                 None, 32, False]
    assert len(gemm_args) == schema_arity("grouped_gemm_small_quant_cuda")
    if not HAS_CUDA_EXT:
        pytest.skip("opcheck of the CUDA ops needs a GPU and the moe_kernels._C extension")
    dev = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    amax_args = tuple(map(dev, amax_args))
    torch.library.opcheck(torch.ops.moe_kernels.act_amax_cuda.default, amax_args)
    gemm_args = list(map(dev, gemm_args))
    gemm_args[17] = torch.ops.moe_kernels.act_amax_cuda.default(*amax_args)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_gemm_small_quant_cuda.default, tuple(gemm_args),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
