"""FP8 experts through the integrations (vLLM's fused_experts, transformers' FP8Experts) and MoE.quantize_."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.integrations import vllm

from test_fp8 import BACKENDS, fp8_reference, max_rel, moe_case


def _deinterleave(w):
    E, I2 = w.shape[0], w.shape[1]
    return w.view(E, I2 // 2, 2, *w.shape[2:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
def test_vllm_fused_experts_fp8(backend, layout):
    x, w13, w2, tw, ti, _, _ = moe_case(9, 96, 64, 4, 2)
    kw = dict(per_channel=True) if layout == "channel" else dict(block_shape=(32, 64)) if layout == "block" else {}
    q13, q2 = mk.quantize(w13, **kw), mk.quantize(w2, **kw)
    out = vllm.fused_experts(x.half(), q13.data, q2.data, tw, ti, use_fp8_w8a8=True, w1_scale=q13.scale,
                             w2_scale=q2.scale, per_channel_quant=layout == "channel",
                             block_shape=[32, 64] if layout == "block" else None, backend=backend)
    assert max_rel(out, fp8_reference(x, q13, q2, tw, ti, torch.float16)) <= 1e-2
    # the same through a quant_config, as newer vLLM passes it
    cfg = type("Cfg", (), dict(quant_dtype=torch.float8_e4m3fn, w1_scale=q13.scale, w2_scale=q2.scale, a1_scale=None,
                               a2_scale=None, block_shape=[32, 64] if layout == "block" else None,
                               per_out_ch_quant=layout == "channel"))()
    out2 = vllm.fused_experts(x.half(), q13.data, q2.data, tw, ti, quant_config=cfg, backend=backend)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_vllm_fused_experts_fp8_static_scales_and_swigluoai():
    x, w13, w2, tw, ti, b13, b2 = moe_case(7, 64, 32, 4, 2, bias=True)
    q13, q2 = mk.quantize(w13, per_channel=True), mk.quantize(w2, per_channel=True)
    a1, a2 = (x.abs().max() / 300).reshape(1), torch.tensor([0.01])
    inter = lambda w: w.view(w.shape[0], 2, w.shape[1] // 2, *w.shape[2:]).transpose(1, 2).reshape(w.shape)  # noqa: E731
    out = vllm.fused_experts(x, inter(q13.data), q2.data, tw, ti, activation="swigluoai", use_fp8_w8a8=True,
                             w1_scale=inter(q13.scale), w2_scale=q2.scale, per_channel_quant=True, a1_scale=a1,
                             a2_scale=a2, w1_bias=inter(b13), w2_bias=b2, backend="torch")
    expected = fp8_reference(x, q13, q2, tw, ti, torch.float32, activation="swiglu_oai", w13_bias=b13, w2_bias=b2,
                             a13_scale=a1, a2_scale=a2)
    assert max_rel(out, expected) <= 1e-2
    assert torch.equal(_deinterleave(inter(b13)), b13)


def test_vllm_fused_experts_fp8_refusals():
    x, w13, w2, tw, ti, _, _ = moe_case(5, 64, 32, 4, 2)
    q13, q2 = mk.quantize(w13, block_shape=(32, 32)), mk.quantize(w2, block_shape=(32, 32))
    call = lambda **kw: vllm.fused_experts(x, q13.data, q2.data, tw, ti, use_fp8_w8a8=True, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="w1_scale"):
        call(w2_scale=q2.scale, block_shape=[32, 32])
    with pytest.raises(ValueError, match="w1_scale does not fit"):
        call(w1_scale=q13.scale, w2_scale=q2.scale, block_shape=[64, 32])  # not the checkpoint's blocks
    with pytest.raises(ValueError, match="w2_scale must be a float32"):
        call(w1_scale=q13.scale, w2_scale=q2.scale.half(), block_shape=[32, 32])
    with pytest.raises(ValueError, match="per-tensor w1_scale"):
        call(w1_scale=q13.scale, w2_scale=q2.scale)
    with pytest.raises(ValueError, match="a1_scale"):
        call(w1_scale=q13.scale, w2_scale=q2.scale, block_shape=[32, 32], a1_scale=torch.ones(5))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        vllm.fused_experts(x, w13, w2, tw, ti, use_fp8_w8a8=True, w1_scale=q13.scale, w2_scale=q2.scale,
                           block_shape=[32, 32])
    with pytest.raises(ValueError, match="use_int8_w8a16"):
        vllm.fused_experts(x, w13, w2, tw, ti, use_int8_w8a16=True)
    with pytest.raises(ValueError, match="block scales"):
        call(w1_scale=q13.scale, w2_scale=q2.scale, block_shape=[32, 32], activation="swigluoai")


# ----- transformers FP8Experts ---------------------------------------------------------------------------


def _hf_fp8_experts(block_size, E=4, H=64, I=48):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    module = cls(cfg, block_size=block_size)
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    if block_size is not None:
        q13, q2 = mk.quantize(w13, block_shape=tuple(block_size)), mk.quantize(w2, block_shape=tuple(block_size))
        s13, s2 = q13.scale, q2.scale
    else:  # per-tensor checkpoints: one scale per half of gate_up_proj ([E, 2, 1]) and one for down_proj ([E, 1, 1])
        q13, q2 = mk.quantize(w13, block_shape=(I, H)), mk.quantize(w2)
        s13, s2 = q13.scale, q2.scale.view(E, 1, 1)
    with torch.no_grad():
        module.gate_up_proj.copy_(q13.data)
        module.gate_up_proj_scale_inv.copy_(s13)
        module.down_proj.copy_(q2.data)
        module.down_proj_scale_inv.copy_(s2)
    return cfg, module, q13, q2


@pytest.mark.parametrize("block_size", [(32, 32), None])
def test_hf_fp8_experts_forward(block_size):
    from moe_kernels.integrations import hf_fp8

    assert hf_fp8.register_fp8()
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    assert ALL_FP8_EXPERTS_FUNCTIONS["moe_kernels"] is hf_fp8.fp8_experts_forward
    cfg, module, q13, q2 = _hf_fp8_experts(block_size)
    cfg._experts_implementation = "moe_kernels"
    x = torch.randn(10, 64).bfloat16()
    tw, ti = mk.topk_gating(torch.randn(10, 4), 2)
    ti_sentinel = torch.where(torch.arange(10)[:, None] == 3, 4, ti)  # an expert-parallel sentinel: dropped
    with torch.no_grad():
        out = module(x, ti_sentinel, tw)
    expected = fp8_reference(x.float(), q13, q2, tw, torch.where(ti_sentinel < 4, ti_sentinel, -1), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert max_rel(out, expected) <= 2e-2  # bf16 output
    dense = mk.fused_moe(x.double(), q13.dequantize(torch.float64), q2.dequantize(torch.float64), tw,
                         torch.where(ti_sentinel < 4, ti_sentinel, -1))
    assert max_rel(out, dense) < 0.1


def test_hf_fp8_experts_refusals():
    from moe_kernels.integrations import hf_fp8

    _, module, _, _ = _hf_fp8_experts((32, 32))
    module.activation_scheme = "static"
    x = torch.randn(3, 64)
    tw, ti = mk.topk_gating(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="static"):
        hf_fp8.fp8_experts_forward(module, x, ti, tw)


# ----- MoE.quantize_ -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(block_shape=(32, 32)), dict(per_channel=True), {}])
def test_moe_quantize_(kw):
    moe = mk.MoE(64, 48, num_experts=4, top_k=2, shared_intermediate_size=32)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        dense = moe(x)
        q13, q2 = mk.quantize(moe.w13, **kw), mk.quantize(moe.w2, **kw)
        assert moe.quantize_("fp8", **kw) is moe
        out = moe(x)
    assert isinstance(moe.w13, mk.QuantizedWeight) and moe.w13.layout == q13.layout
    assert torch.equal(moe.w13.data.view(torch.uint8), q13.data.view(torch.uint8))
    assert "w13" not in dict(moe.named_parameters()) and "w13_qdata" in moe.state_dict()
    assert max_rel(out, dense) < 0.1 and max_rel(out, dense) > 0
    moe.to(torch.float16)  # dtype casts leave the fp8 data and fp32 scales as they are
    assert moe.w13.data.dtype == torch.float8_e4m3fn and moe.w2.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="already quantized"):
        moe.quantize_("fp8")
    xr = x.half().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        moe(xr).sum().backward()


def test_transformers_register_adds_the_fp8_experts():
    pytest.importorskip("transformers")
    from moe_kernels.integrations import hf_fp8, transformers as mk_hf
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    assert "ALL_FP8_EXPERTS_FUNCTIONS" in mk_hf.register()
    assert ALL_FP8_EXPERTS_FUNCTIONS["moe_kernels"] is hf_fp8.fp8_experts_forward
