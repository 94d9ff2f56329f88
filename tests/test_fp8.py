"""FP8 experts: QuantizedWeight, quantize, and the grouped GEMM / fused MoE with FP8 weights on every backend,
against float64 references that dequantize the weights and quantize activations the same way."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _quant_ops as qo
from moe_kernels.quant import FP8_FORMATS, fake_quantize_activation, quantize_activation
from moe_kernels.testing import assert_close
from moe_kernels import _alloc


def nan_empty(shape, dtype, device):
    """Outputs poisoned before the kernel writes them: NaN, or the integer sentinel for index tensors."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan") if dtype.is_floating_point else _alloc.INT_SENTINEL)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in ("triton",) if mk.backends()[b].available]
BACKENDS = ["torch"] + FAST
LAYOUTS = {"tensor": {}, "channel": dict(per_channel=True), "block128": dict(block_shape=(128, 128)),
           "block64x32": dict(block_shape=(64, 32))}


def max_rel(a, b):
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def nan_out(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_POISON", "1")


# ----- QuantizedWeight and quantize ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FP8_FORMATS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantize_layouts_and_round_trip(fmt, layout):
    E, N, K = 3, 200, 336
    w = (torch.randn(E, N, K) * torch.rand(E, 1, 1) * 3).bfloat16()
    w[1, :64, :128] = 0  # a zero block: scale floor, no NaN
    qw = mk.quantize(w, fmt, **LAYOUTS[layout])
    fmax = torch.finfo(FP8_FORMATS[fmt]).max
    assert qw.data.dtype == FP8_FORMATS[fmt] and qw.data.shape == (E, N, K) and qw.scale.dtype == torch.float32
    wf = w.float()
    if layout == "tensor":
        assert qw.scale.shape == (E,)
        expected = wf.abs().amax(dim=(1, 2)).clamp(min=1e-10) / fmax
        s_full = qw.scale[:, None, None]
    elif layout == "channel":
        assert qw.scale.shape == (E, N, 1)
        expected = wf.abs().amax(dim=2, keepdim=True).clamp(min=1e-10) / fmax
        s_full = qw.scale
    else:
        bn, bk = qw.block_shape
        assert qw.scale.shape == (E, -(-N // bn), -(-K // bk))
        expected = torch.empty_like(qw.scale)
        for i in range(qw.scale.shape[1]):  # independent: one block at a time, the last ones partial
            for j in range(qw.scale.shape[2]):
                blk = wf[:, i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                expected[:, i, j] = blk.abs().amax(dim=(1, 2)).clamp(min=1e-10) / fmax
        s_full = torch.empty(E, N, K)
        for n in range(0, N, 8):
            s_full[:, n:n + 8] = qw.scale[:, n // bn].repeat_interleave(bk, 1)[:, None, :K]
    torch.testing.assert_close(qw.scale, expected, rtol=0, atol=0)
    deq = qw.dequantize()
    assert deq.dtype == torch.bfloat16 and torch.isfinite(deq).all()
    torch.testing.assert_close(deq.float(), (qw.data.float() * s_full).bfloat16().float(), rtol=0, atol=0)
    # round to nearest: at most half an ulp of the format relative to each group's amax (bf16 rounding on top)
    rel_ulp = 2.0 ** -(3 if fmt == "fp8" else 2)
    assert ((deq.float() - wf).abs() <= 0.5 * rel_ulp * fmax * s_full + 1e-2 * wf.abs() + 1e-30).all()


def test_quantized_weight_from_raw_tensors_and_checks():
    E, N, K = 2, 64, 96
    data = torch.randn(E, N, K).to(torch.float8_e4m3fn)
    qw = mk.QuantizedWeight(data=data, scale=torch.rand(E, 1, 1), block_shape=(128, 128))
    assert qw.layout == "block" and qw.shape == (E, N, K) and qw.dequantize().dtype == torch.float32
    assert qw.to("cpu").layout == "block"
    with pytest.raises(ValueError, match="scale"):
        mk.QuantizedWeight(data=data, scale=torch.rand(E, 2, 1), block_shape=(128, 128))  # wrong block count
    with pytest.raises(ValueError, match="scale"):
        mk.QuantizedWeight(data=data, scale=torch.rand(E, N, 1), block_shape=(32, 32))  # block_shape not matching
    with pytest.raises(ValueError, match="scale"):
        mk.QuantizedWeight(data=data, scale=torch.rand(E, N))
    with pytest.raises(ValueError, match="scale must be float32"):
        mk.QuantizedWeight(data=data, scale=torch.rand(E).half())
    with pytest.raises(ValueError, match="data"):
        mk.QuantizedWeight(data=data.float(), scale=torch.rand(E))
    with pytest.raises(ValueError, match="fmt"):
        mk.QuantizedWeight(data=data, scale=torch.rand(E), fmt="int4")
    with pytest.raises(ValueError, match="block_shape"):
        mk.QuantizedWeight(data=data, scale=torch.rand(E, 1, 1), block_shape=(0, 128))
    with pytest.raises(ValueError, match="fmt"):
        mk.quantize(torch.randn(E, N, K), "int2")
    with pytest.raises(ValueError, match="w must"):
        mk.quantize(torch.randn(N, K))


def test_activation_quantization_reference():
    a = torch.randn(7, 200) * 5
    for mode, shape in (("group", (7, 2)), ("token", (7, 1)), ("tensor", (1, 1))):
        q, s = quantize_activation(a, mode, 128, torch.float8_e4m3fn)
        assert q.dtype == torch.float8_e4m3fn and s.shape == shape and s.dtype == torch.float32
        assert q.float().abs().max() <= 448
    q, s = quantize_activation(a, "group", 128, torch.float8_e4m3fn)
    assert s[3, 1] == a[3, 128:].abs().max() / 448
    assert q[3, 130].float() == (a[3, 130] / s[3, 1]).to(torch.float8_e4m3fn).float()
    # static: saturates at +-448 instead of overflowing
    q, _ = quantize_activation(a, "static", 128, torch.float8_e4m3fn, torch.tensor([1e-3]))
    assert q.float().abs().max() == 448
    z = fake_quantize_activation(torch.zeros(3, 50), "token", 50, torch.float8_e4m3fn)
    assert (z == 0).all()


# ----- grouped GEMM ----------------------------------------------------------------------------------


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_gemm_fp8(backend, layout, dtype):
    sizes = [5, 0, 13, 1]  # an empty expert; rows past the last segment come out zero
    K, N = (200, 336) if layout.startswith("block") else (200, 48)  # partial blocks
    P = sum(sizes) + 3
    x = torch.randn(P, K, device=DEV).to(dtype)
    w = torch.randn(len(sizes), N, K, device=DEV) / K**0.5
    b = torch.randn(len(sizes), N, device=DEV)
    qw = mk.quantize(w, **LAYOUTS[layout])
    y = mk.grouped_gemm(x, qw, offsets_of(sizes), bias=b, backend=backend)
    expected = mk.grouped_gemm(x.double(), qw, offsets_of(sizes), bias=b.double(), backend="torch")
    dense = mk.grouped_gemm(x.double(), w.double(), offsets_of(sizes), bias=b.double(), backend="torch")
    assert y.dtype == dtype and y.shape == (P, N)
    assert max_rel(y, expected) <= 1e-2
    assert (y[sum(sizes):] == 0).all()
    # within the quantization error of the dense result, so a wrong scale orientation cannot pass
    assert max_rel(y, dense) <= max_rel(expected, dense) + 1e-2
    assert max_rel(expected, dense) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_fp8_static_scale_and_bad_inputs(backend):
    sizes = [6, 0, 9]
    x = torch.randn(sum(sizes), 64, device=DEV)
    qw = mk.quantize(torch.randn(3, 40, 64, device=DEV) / 8)
    s = (x.abs().max() / 448).reshape(1).float() * 1.7  # coarser than the dynamic one (not by a power of 2)
    y = mk.grouped_gemm(x, qw, offsets_of(sizes), activation_scale=s, backend=backend)
    expected = qo.fp8_grouped_gemm(x.double(), qw.data, *qw.scale_blocks(), offsets_of(sizes), None, None, "static", s)
    assert max_rel(y, expected) <= 1e-2
    assert max_rel(y, mk.grouped_gemm(x, qw, offsets_of(sizes), backend=backend)) > 1e-4  # the scale was used
    with pytest.raises(ValueError, match="activation_scale"):
        mk.grouped_gemm(x, qw, offsets_of(sizes), activation_scale=torch.ones(2, device=DEV), backend=backend)
    with pytest.raises(ValueError, match="activation_scale"):
        mk.grouped_gemm(x, qw, offsets_of(sizes), activation_scale=torch.ones(1, device=DEV).half(), backend=backend)
    with pytest.raises(ValueError, match="weight_layout"):
        mk.grouped_gemm(x, qw, offsets_of(sizes), weight_layout="kn", backend=backend)
    with pytest.raises(ValueError, match="without scales"):
        mk.grouped_gemm(x, qw.data, offsets_of(sizes), backend=backend)
    with pytest.raises(ValueError, match="activation_scale"):
        mk.grouped_gemm(x, qw.dequantize(), offsets_of(sizes), activation_scale=s, backend=backend)
    with pytest.raises(ValueError, match="w must have dense shape"):
        mk.grouped_gemm(x[:, :32], qw, offsets_of(sizes), backend=backend)


def test_grouped_gemm_fp8_weight_only_kernel():
    """The sm_80 path (weights dequantized tile-wise, activations unquantized), run through its launcher."""
    if not FAST:
        pytest.skip("no triton backend")
    from moe_kernels.triton_kernels import fp8_gemm

    sizes = [4, 0, 19]
    x = torch.randn(sum(sizes) + 2, 200, device=DEV).half()
    for (name, kw), bits in zip(LAYOUTS.items(), (False, True, True, False)):
        for fmt in ("fp8", "fp8_e5m2") if bits else ("fp8",):  # bits: sm_80's in-kernel decode of the fp8 bits
            qw = mk.quantize(torch.randn(3, 72, 200, device=DEV) / 14, fmt, **kw)
            sc, bn, bk = qw.scale_blocks()
            y, _ = fp8_gemm.fp8_grouped_gemm(x, qw.data, sc, bn, bk, offsets_of(sizes), None, None, "none", None,
                                             weight_bits=bits, empty=nan_empty)
            expected = mk.grouped_gemm(x.double(), qw.dequantize(torch.float64), offsets_of(sizes), backend="torch")
            assert_close(f"y {name} {fmt}", y, expected, rms_tol=2e-3)


if FAST:
    import triton
    import triton.language as tl

    from moe_kernels.triton_kernels.fp8_gemm import _fp8_bits_to_f32

    @triton.jit
    def _decode_kernel(b_ptr, out_ptr, E5M2: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(out_ptr + i, _fp8_bits_to_f32(tl.load(b_ptr + i), E5M2))


def test_fp8_bits_decode_is_exact():
    """Every e4m3fn / e5m2 bit pattern through the kernel's bit decode (the sm_80 path) equals torch's value."""
    if not FAST:
        pytest.skip("no triton backend")
    decode = _decode_kernel
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEV)
    for dt, e5m2 in ((torch.float8_e4m3fn, False), (torch.float8_e5m2, True)):
        out = torch.full((256,), 7.0, device=DEV)
        decode[(1,)](bits, out, E5M2=e5m2)
        torch.testing.assert_close(out, bits.view(dt).float(), equal_nan=True, rtol=0, atol=0)


# ----- fused MoE -------------------------------------------------------------------------------------


def moe_case(T, H, I, E, k, gated=True, bias=False, seed_ids=None):
    x = torch.randn(T, H, device=DEV)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, device=DEV) / H**0.5
    w2 = torch.randn(E, H, I, device=DEV) / I**0.5
    tw, ti = mk.topk_gating(torch.randn(T, E, device=DEV), k)
    b13 = torch.randn(E, w13.shape[1], device=DEV) * 0.1 if bias else None
    b2 = torch.randn(E, H, device=DEV) * 0.1 if bias else None
    return x, w13, w2, tw, ti, b13, b2


def fp8_reference(x, q13, q2, tw, ti, dtype, **kw):
    """Float64 reference of the pipeline as the kernels run it in ``dtype`` (the activation output rounded there)."""
    s13, bn13, bk13 = q13.scale_blocks()
    s2, bn2, bk2 = q2.scale_blocks()
    a13, a2 = kw.pop("a13_scale", None), kw.pop("a2_scale", None)
    m13 = "static" if a13 is not None else q13.activation_group()
    m2 = "static" if a2 is not None else q2.activation_group()
    return qo.fp8_fused_moe_reference(
        x.to(dtype).double(), q13.data, s13, bn13, bk13, q2.data, s2, bn2, bk2, tw, ti, kw.get("activation", "silu"),
        kw.get("gated", True), _d(kw.get("w13_bias")), _d(kw.get("w2_bias")), kw.get("apply_router_weight_on_input", False),
        kw.get("capacity"), kw.get("expert_map"), m13, a13, m2, a2, inter_dtype=dtype)


def _d(t):
    return t.double() if t is not None else None


def check_moe(backend, x, w13, w2, tw, ti, layout, dtype=torch.float16, **kw):
    q13, q2 = mk.quantize(w13, **LAYOUTS[layout]), mk.quantize(w2, **LAYOUTS[layout])
    y = mk.fused_moe(x.to(dtype), q13, q2, tw, ti, backend=backend, **kw)
    expected = fp8_reference(x, q13, q2, tw, ti, dtype, **dict(kw))
    dense_kw = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in kw.items()
                if n not in ("a13_scale", "a2_scale")}
    dense = mk.fused_moe(x.to(dtype).double(), w13.double(), w2.double(), tw, ti, backend="torch", **dense_kw)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert max_rel(y, expected) <= 1e-2, (layout, max_rel(y, expected))
    assert max_rel(y, dense) <= max_rel(expected, dense) + 1e-2
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_moe_fp8(backend, layout):
    x, w13, w2, tw, ti, _, _ = moe_case(13, 200, 168, 6, 2)  # K, N = 200, 336: partial blocks
    ti = torch.where(ti == 4, 5, ti)  # expert 4 gets no tokens
    check_moe(backend, x, w13, w2, tw, ti, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["swiglu_oai_bias", "gelu_plain", "relu_plain", "capacity", "expert_map", "on_input",
                                  "fp32", "static", "k_eq_E"])
def test_fused_moe_fp8_cases(backend, case):
    gated = not case.endswith("_plain")
    x, w13, w2, tw, ti, b13, b2 = moe_case(11, 160, 96 if gated else 80, 5 if case != "k_eq_E" else 3,
                                           2 if case != "k_eq_E" else 3, gated=gated,
                                           bias=case in ("capacity", "swiglu_oai_bias"))
    kw, dtype, layout = {}, torch.float16, "block64x32"
    if case == "swiglu_oai_bias":
        kw = dict(activation="swiglu_oai", w13_bias=b13, w2_bias=b2)
        layout = "block128"
    elif case.endswith("_plain"):
        kw = dict(activation=case.split("_")[0], gated=False)
        layout = "channel"
    elif case == "capacity":
        kw = dict(capacity=4, w13_bias=b13, w2_bias=b2)
    elif case == "expert_map":  # 5 local experts of 8 global ones
        emap = torch.tensor([0, -1, 1, 2, -1, 3, 4, -1], dtype=torch.int32, device=DEV)
        ti = torch.randint(0, 8, ti.shape, device=DEV)
        kw = dict(expert_map=emap)
        layout = "tensor"
    elif case == "on_input":
        ti, tw = ti[:, :1], tw[:, :1]
        kw = dict(apply_router_weight_on_input=True)
        layout = "channel"
    elif case == "fp32":
        dtype = torch.float32
    elif case == "static":
        kw = dict(a13_scale=(x.abs().max() / 300).reshape(1), a2_scale=torch.tensor([0.02], device=DEV))
        layout = "tensor"
    check_moe(backend, x, w13, w2, tw, ti, layout, dtype=dtype, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0, 1])
def test_fused_moe_fp8_tiny_batches(backend, T):
    x, w13, w2, tw, ti, _, _ = moe_case(T, 64, 48, 4, 2)
    q13, q2 = mk.quantize(w13, block_shape=(32, 32)), mk.quantize(w2, block_shape=(32, 32))
    y = mk.fused_moe(x.half(), q13, q2, tw, ti, backend=backend)
    assert y.shape == (T, 64)
    if T:
        assert max_rel(y, fp8_reference(x, q13, q2, tw, ti, torch.float16)) <= 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_backward_raises_naming_the_weight(backend):
    x, w13, w2, tw, ti, _, _ = moe_case(8, 64, 32, 4, 2)
    q13, q2 = mk.quantize(w13), mk.quantize(w2)
    xr = x.clone().requires_grad_()
    y = mk.fused_moe(xr, q13, q2, tw, ti, backend=backend)
    with pytest.raises(RuntimeError, match="QuantizedWeight w13 / w2.*inference-only"):
        y.sum().backward()
    plan = mk.plan_routing(ti, 4)
    xs = mk.permute(x, plan).requires_grad_()
    y = mk.grouped_gemm(xs, q13, plan, backend=backend)
    with pytest.raises(RuntimeError, match="QuantizedWeight w "):
        y.sum().backward()
    with torch.no_grad():  # inference under no_grad is the supported use
        mk.fused_moe(xr, q13, q2, tw, ti, backend=backend)


def test_fused_moe_fp8_bad_inputs():
    x, w13, w2, tw, ti, _, _ = moe_case(8, 64, 32, 4, 2)
    q13, q2 = mk.quantize(w13), mk.quantize(w2)
    with pytest.raises(ValueError, match="w2 must be a QuantizedWeight"):
        mk.fused_moe(x, q13, w2, tw, ti)
    with pytest.raises(ValueError, match="w13 is float8_e4m3fn data without scales"):
        mk.fused_moe(x, q13.data, q2.data, tw, ti)
    with pytest.raises(ValueError, match="a2_scale"):
        mk.fused_moe(x, q13, q2, tw, ti, a2_scale=torch.ones(4))
    with pytest.raises(ValueError, match="a13_scale"):
        mk.fused_moe(x, w13, w2, tw, ti, a13_scale=torch.ones(1))
    with pytest.raises(ValueError, match="w2 must have dense shape"):
        mk.fused_moe(x, q13, mk.quantize(w2[:, :, :16]), tw, ti)
    with pytest.raises(ValueError, match="share a format"):
        mk.fused_moe(x, q13, mk.quantize(w2, "fp8_e5m2"), tw, ti)


def test_fused_moe_fp8_compiles_on_the_torch_path():
    x, w13, w2, tw, ti, _, _ = moe_case(12, 64, 32, 4, 2)
    q13, q2 = mk.quantize(w13, block_shape=(32, 32)), mk.quantize(w2, block_shape=(32, 32))

    def f(x, tw, ti):
        return mk.fused_moe(x, q13, q2, tw, ti, backend="torch")

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for T in (12, 7):
        torch.testing.assert_close(compiled(x[:T], tw[:T], ti[:T]), f(x[:T], tw[:T], ti[:T]))
