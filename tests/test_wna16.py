"""Weight-only int8 / int4 / mxfp4 experts through grouped_gemm, fused_moe and MoE on every backend, against a
float64 reference on the dequantized weights."""

import pytest
import torch

import moe_kernels as mk

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAST = [b for b in ("triton",) if mk.backends()[b].available]
BACKENDS = ["torch"] + FAST
FMTS = {"int8": dict(fmt="int8"), "int8_g32": dict(fmt="int8", group_size=32), "int4": dict(fmt="int4", group_size=32),
        "int4_zp": dict(fmt="int4", group_size=64, zero_point=True), "mxfp4": dict(fmt="mxfp4")}


def q(w, name):
    kw = dict(FMTS[name])
    return mk.quantize(w, kw.pop("fmt"), **kw)


def max_rel(a, b):
    if b.numel() == 0:
        return 0.0
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def offsets_of(sizes):
    return torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_POISON", "1")  # fresh outputs are NaN-filled: an unwritten element fails


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_gemm(backend, fmt, dtype):
    torch.manual_seed(0)
    E, N, K = 4, 72 if fmt != "int4_zp" else 80, 128
    sizes = [5, 0, 9, 3]  # an expert with no rows
    x = torch.randn(sum(sizes) + 2, K, device=DEV)  # two rows past the last segment: zeros
    qw = q(torch.randn(E, N, K, device=DEV) / K**0.5, fmt)
    b = torch.randn(E, N, device=DEV) * 0.1
    y = mk.grouped_gemm(x.to(dtype), qw, offsets_of(sizes), bias=b, backend=backend)
    expected = mk.grouped_gemm(x.to(dtype).double(), qw.dequantize(torch.float64), offsets_of(sizes), bias=b.double(),
                               backend="torch")
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert max_rel(y, expected) <= 1e-2, max_rel(y, expected)
    assert (y[-2:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_gemm_int8_odd_sizes(backend):
    E, N, K = 3, 37, 45  # per-channel int8 takes any N and K
    sizes = [4, 7, 1]
    x = torch.randn(12, K, device=DEV).half()
    qw = mk.quantize(torch.randn(E, N, K, device=DEV), "int8")
    y = mk.grouped_gemm(x, qw, offsets_of(sizes), backend=backend)
    expected = mk.grouped_gemm(x.double(), qw.dequantize(torch.float64), offsets_of(sizes), backend="torch")
    assert max_rel(y, expected) <= 1e-2


def test_grouped_gemm_bad_inputs():
    qw = mk.quantize(torch.randn(2, 16, 64), "int4", group_size=32)
    x = torch.randn(5, 64)
    with pytest.raises(ValueError, match="activation_scale"):
        mk.grouped_gemm(x, qw, offsets_of([2, 3]), activation_scale=torch.ones(1))
    with pytest.raises(ValueError, match="weight_layout"):
        mk.grouped_gemm(x, qw, offsets_of([2, 3]), weight_layout="kn")
    with pytest.raises(ValueError, match="dense shape"):
        mk.grouped_gemm(x[:, :32], qw, offsets_of([2, 3]))


def moe_case(T, H, I, E, k, gated=True, bias=False):
    x = torch.randn(T, H, device=DEV)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, device=DEV) / H**0.5
    w2 = torch.randn(E, H, I, device=DEV) / I**0.5
    tw, ti = mk.topk_gating(torch.randn(T, E, device=DEV), k)
    b13 = torch.randn(E, w13.shape[1], device=DEV) * 0.1 if bias else None
    b2 = torch.randn(E, H, device=DEV) * 0.1 if bias else None
    return x, w13, w2, tw, ti, b13, b2


def _d(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def check_moe(backend, fmt, x, w13, w2, tw, ti, dtype=torch.float16, **kw):
    q13, q2 = q(w13, fmt), q(w2, fmt)
    y = mk.fused_moe(x.to(dtype), q13, q2, tw, ti, backend=backend, **kw)
    expected = mk.fused_moe(x.to(dtype).double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw, ti,
                            backend="torch", **{n: _d(v) for n, v in kw.items()})
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    # the interpreter converts fp32 -> bf16 by truncation (a bias toward zero on every dequantized weight and
    # intermediate); the GPU rounds to nearest and is held to 1e-2
    tol = 1.5e-2 if dtype == torch.bfloat16 and backend == "triton" and DEV == "cpu" else 1e-2
    assert max_rel(y, expected) <= tol, (fmt, max_rel(y, expected))
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", list(FMTS))
def test_fused_moe(backend, fmt):
    x, w13, w2, tw, ti, _, _ = moe_case(13, 128, 64, 6, 2)
    ti = torch.where(ti == 4, 5, ti)  # expert 4 gets no tokens
    check_moe(backend, fmt, x, w13, w2, tw, ti)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["swiglu_oai_bias", "gelu_plain", "capacity", "expert_map", "on_input", "bf16",
                                  "k_eq_E"])
def test_fused_moe_cases(backend, case):
    gated = not case.endswith("_plain")
    E, k = (3, 3) if case == "k_eq_E" else (5, 2)
    x, w13, w2, tw, ti, b13, b2 = moe_case(11, 64, 64, E, k, gated=gated,
                                           bias=case in ("capacity", "swiglu_oai_bias"))
    kw, dtype, fmt = {}, torch.float16, "int4"
    if case == "swiglu_oai_bias":
        kw, fmt = dict(activation="swiglu_oai", w13_bias=b13, w2_bias=b2), "mxfp4"
    elif case == "gelu_plain":
        kw, fmt = dict(activation="gelu", gated=False), "int8"
    elif case == "capacity":
        kw, fmt = dict(capacity=4, w13_bias=b13, w2_bias=b2), "int4_zp"
    elif case == "expert_map":  # 5 local experts of 8 global ones
        kw = dict(expert_map=torch.tensor([0, -1, 1, 2, -1, 3, 4, -1], dtype=torch.int32, device=DEV))
        ti = torch.randint(0, 8, ti.shape, device=DEV)
    elif case == "on_input":
        ti, tw, fmt = ti[:, :1], tw[:, :1], "mxfp4"
        kw = dict(apply_router_weight_on_input=True)
    elif case == "bf16":
        dtype, fmt = torch.bfloat16, "int8_g32"
    check_moe(backend, fmt, x, w13, w2, tw, ti, dtype=dtype, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0, 1])
def test_fused_moe_tiny_batches(backend, T):
    x, w13, w2, tw, ti, _, _ = moe_case(T, 64, 32, 4, 2)
    y = check_moe(backend, "int4", x, w13, w2, tw, ti)
    assert y.shape == (T, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_raises_naming_the_weight(backend):
    x, w13, w2, tw, ti, _, _ = moe_case(8, 64, 32, 4, 2)
    q13, q2 = q(w13, "int4"), q(w2, "int4")
    xr = x.clone().requires_grad_()
    y = mk.fused_moe(xr, q13, q2, tw, ti, backend=backend)
    with pytest.raises(RuntimeError, match="QuantizedWeight w13 / w2.*inference-only"):
        y.sum().backward()
    plan = mk.plan_routing(ti, 4)
    xs = mk.permute(x, plan).requires_grad_()
    y = mk.grouped_gemm(xs, q(w13, "mxfp4"), plan, backend=backend)
    with pytest.raises(RuntimeError, match="QuantizedWeight w "):
        y.sum().backward()


def test_fused_moe_bad_inputs():
    x, w13, w2, tw, ti, _, _ = moe_case(8, 64, 32, 4, 2)
    q13 = q(w13, "int4")
    with pytest.raises(ValueError, match="w2 must be a QuantizedWeight"):
        mk.fused_moe(x, q13, w2, tw, ti)
    with pytest.raises(ValueError, match="share a format"):
        mk.fused_moe(x, q13, q(w2, "mxfp4"), tw, ti)
    with pytest.raises(ValueError, match="a13_scale"):
        mk.fused_moe(x, q13, q(w2, "int4"), tw, ti, a13_scale=torch.ones(1))


def test_fused_moe_compiles_on_the_torch_path():
    x, w13, w2, tw, ti, _, _ = moe_case(12, 64, 64, 4, 2)
    q13, q2 = q(w13, "int4_zp"), q(w2, "int4_zp")

    def f(x, tw, ti):
        return mk.fused_moe(x, q13, q2, tw, ti, backend="torch")

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for T in (12, 7):
        torch.testing.assert_close(compiled(x[:T], tw[:T], ti[:T]), f(x[:T], tw[:T], ti[:T]))


# ----- vLLM's fused_experts -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["int8", "int8_g32", "int4", "int4_zp", "int4_swigluoai"])
def test_vllm_fused_experts(backend, case):
    from moe_kernels.integrations import vllm

    x, w13, w2, tw, ti, _, _ = moe_case(9, 64, 64, 4, 2)
    fmt = "int4_zp" if case == "int4_swigluoai" else case
    q13, q2 = q(w13, fmt), q(w2, fmt)
    kw = dict(use_int8_w8a16=True) if fmt.startswith("int8") else dict(use_int4_w4a16=True)
    if q13.group_size:
        kw["block_shape"] = [0, q13.group_size]
    activation = "swigluoai" if case == "int4_swigluoai" else "silu"
    d1 = q13.data
    s1, z1 = q13.scale, q13.zero
    if activation == "swigluoai":  # vLLM holds gate/up rows interleaved: interleave what the reference reads
        E, I2 = w13.shape[:2]
        perm = torch.stack((torch.arange(I2 // 2), torch.arange(I2 // 2, I2)), 1).reshape(-1)
        from moe_kernels.quant_int import pack_nibbles, unpack_nibbles
        d1, s1 = d1[:, perm], s1[:, perm]
        z1 = pack_nibbles(unpack_nibbles(z1.transpose(1, 2))[..., perm]).transpose(1, 2).contiguous()
    y = vllm.fused_experts(x.half(), d1, q2.data, tw, ti, activation=activation, w1_scale=s1, w2_scale=q2.scale,
                           w1_zp=z1, w2_zp=q2.zero, backend=backend, **kw)
    expected = mk.fused_moe(x.half().double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw, ti,
                            activation="swiglu_oai" if activation == "swigluoai" else "silu", backend="torch")
    assert max_rel(y, expected) <= 1e-2


def test_vllm_fused_experts_bad_inputs():
    from moe_kernels.integrations import vllm

    x, w13, w2, tw, ti, _, _ = moe_case(4, 64, 64, 4, 2)
    q13, q2 = q(w13, "int4"), q(w2, "int4")
    kw = dict(use_int4_w4a16=True, w1_scale=q13.scale, w2_scale=q2.scale)
    with pytest.raises(ValueError, match="block_shape"):
        vllm.fused_experts(x, q13.data, q2.data, tw, ti, **kw)
    with pytest.raises(ValueError, match="block_shape"):
        vllm.fused_experts(x, q13.data, q2.data, tw, ti, block_shape=[32, 32], **kw)
    with pytest.raises(ValueError, match="w1_scale"):
        vllm.fused_experts(x, q13.data, q2.data, tw, ti, block_shape=[0, 64], **kw)  # scales of groups of 32
    with pytest.raises(ValueError, match="w2_scale"):
        vllm.fused_experts(x, q13.data, q2.data, tw, ti, use_int4_w4a16=True, w1_scale=q13.scale, block_shape=[0, 32])
    with pytest.raises(ValueError, match="w1"):
        vllm.fused_experts(x, q13.data.view(torch.int8), q2.data, tw, ti, block_shape=[0, 32], **kw)
    q8 = q(w13, "int8")
    with pytest.raises(ValueError, match="w1_zp"):
        vllm.fused_experts(x, q8.data, q(w2, "int8").data, tw, ti, use_int8_w8a16=True, w1_scale=q8.scale,
                           w2_scale=q(w2, "int8").scale, w1_zp=torch.zeros(4, 64, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exclusive"):
        vllm.fused_experts(x, q13.data, q2.data, tw, ti, use_int8_w8a16=True, block_shape=[0, 32], **kw)


@pytest.mark.parametrize("fmt", ["int8", "int4_zp", "mxfp4"])
def test_moe_quantize_(fmt):
    moe = mk.MoE(64, 64, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 64)
    kw = dict(FMTS[fmt])
    name = kw.pop("fmt")
    with torch.no_grad():
        dense = moe(x)
        q13 = mk.quantize(moe.w13, name, **kw)
        assert moe.quantize_(name, **kw) is moe
        out = moe(x)
    assert isinstance(moe.w13, mk.QuantizedWeight) and moe.w13.fmt == name
    assert torch.equal(moe.w13.dequantize(), q13.dequantize())
    assert "w13_qdata" in moe.state_dict() and ("w13_qzero" in moe.state_dict()) == (q13.zero is not None)
    assert 0 < max_rel(out, dense) < 0.2
    moe.to(torch.float16)  # dtype casts leave packed data and scales as they are
    assert moe.w13.data.dtype == q13.data.dtype and moe.w2.scale.dtype == q13.scale.dtype
    with torch.no_grad():
        assert max_rel(moe(x.half()), out) < 1e-2
    with pytest.raises(RuntimeError, match="inference-only"):
        moe(x.half().requires_grad_()).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mxfp4_e8m0_edge_codes(backend):
    """e8m0 code 255 is NaN (it reaches exactly the outputs of its row), codes 1 and 254 are 2^-126 and 2^127."""
    qw = q(torch.randn(2, 16, 64, device=DEV), "mxfp4")
    scale = qw.scale.clone()
    scale[1, 3, 1] = 255
    scale[0, 5, 0] = 254
    scale[0, 5, 1] = 1
    data = qw.data.clone()
    data[0, 5] = 0x11  # 0.5 everywhere: 0.5 * 2^127 stays finite in fp32
    edge = mk.QuantizedWeight(data=data, scale=scale, fmt="mxfp4")
    d = edge.dequantize()
    assert torch.isnan(d[1, 3, 32:]).all() and not torch.isnan(d[1, 3, :32]).any()
    assert d[0, 5, 0] == 2.0 ** 126 and d[0, 5, 32] == 2.0 ** -127
    x = torch.randn(6, 64, device=DEV) * 1e-30  # keeps row 5 of expert 0 finite in fp32
    y = mk.grouped_gemm(x, edge, offsets_of([3, 3]), backend=backend)
    assert torch.isnan(y[3:, 3]).all() and not torch.isnan(y[:3]).any()
    expected = mk.grouped_gemm(x.double(), edge.dequantize(torch.float64), offsets_of([3, 3]), backend="torch")
    finite = ~torch.isnan(expected)
    assert torch.equal(finite, ~torch.isnan(y))
    assert max_rel(y[finite], expected[finite]) <= 1e-5
