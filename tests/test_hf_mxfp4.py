"""gpt-oss MXFP4 experts of transformers on moe_kernels (integrations.hf_mxfp4), against transformers' own eager
forward of the same weights dequantized by transformers (exact in fp32).

The MXFP4 modules are made by transformers' own quantizer code: ``replace_with_mxfp4_linear`` swaps the blocks,
``swizzle_mxfp4_convertops`` (the loading op of ``Mxfp4Deserialize``) loads checkpoint blocks and scales into them.
Both call the kernels hub for OpenAI's triton_kernels (a download); a small stand-in of the hub's tensor and
layout API replaces it here, with a layout that really permutes and pads the bytes, so reading them back through
the layout object is tested.
"""

import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("transformers.integrations.mxfp4")

import moe_kernels as mk  # noqa: E402
from moe_kernels.integrations import hf_mxfp4  # noqa: E402
from moe_kernels.integrations.transformers import patch  # noqa: E402
from moe_kernels.testing import assert_close  # noqa: E402

FAST = [b for b in ("triton",) if mk.backends()[b].available]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton rows run in the interpreter on CPU


# ----- a stand-in for the kernels hub's triton_kernels (tensor wrappers, layouts, precision config) --------------

class _Storage:
    def __init__(self, data, layout):
        self.data, self.layout = data, layout


class _HubTensor:
    def __init__(self, data, dtype=None, layout=None):
        self.storage, self.dtype, self.shape = _Storage(data, layout), dtype, torch.Size(data.shape)


class _PaddedFlipLayout:
    """Stores ``[..., K, N]`` as ``[..., N + 3, K]`` reversed along N (3 padding rows): unlike the identity, only
    ``unswizzle_data`` gives the bytes back."""

    def __init__(self, shape):
        self.shape = shape

    def swizzle_data(self, x):
        y = x.transpose(-1, -2).flip(-2)
        return torch.cat((y, torch.full_like(y[..., :3, :], 0xEE)), dim=-2).contiguous()

    def unswizzle_data(self, s):
        return s[..., : self.shape[-1], :].flip(-2).transpose(-1, -2)


class _StridedLayout:
    def __init__(self, shape):
        self.shape = shape

    def swizzle_data(self, x):
        return x

    def unswizzle_data(self, s):
        return s


def _convert_layout(t, layout_cls, **opts):
    layout = layout_cls(list(t.storage.data.shape))
    return _HubTensor(layout.swizzle_data(t.storage.data), t.dtype, layout)


def _fake_hub():
    ns = types.SimpleNamespace
    return ns(
        matmul_ogs=ns(PrecisionConfig=lambda weight_scale, flex_ctx=None: ns(weight_scale=weight_scale),
                      FlexCtx=lambda rhs_data=None: ns(rhs_data=rhs_data), InFlexData=lambda: None),
        tensor=ns(FP4="fp4", convert_layout=_convert_layout, wrap_torch_tensor=lambda t, dtype=None: _HubTensor(t, dtype)),
        tensor_details=ns(layout=ns(make_default_matmul_mxfp4_w_layout=lambda mx_axis: (_PaddedFlipLayout, {}),
                                    StridedLayout=_StridedLayout)),
    )


# ----- tiny gpt-oss models ------------------------------------------------------------------------------------

def _config(E=4, k=2, H=64, I=64, layers=1):
    return transformers.GptOssConfig(vocab_size=97, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=E,
                                     num_experts_per_tok=k, layer_types=["full_attention"] * layers,
                                     max_position_embeddings=64)


def _checkpoint(E, N, K):
    """Random MXFP4 checkpoint tensors ``*_blocks [E, N, K/32, 16]``, ``*_scales [E, N, K/32]`` (scales around
    2^0, every code 0-15 present)."""
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8)
    scales = torch.randint(122, 128, (E, N, K // 32), dtype=torch.uint8)
    return blocks, scales


def _models(cfg, monkeypatch):
    """``(mxfp4_model, dense_model)``: the same weights, held in MXFP4 by transformers' quantizer code, and
    dequantized by transformers into the eager gpt-oss experts (fp32)."""
    dense = transformers.GptOssForCausalLM(cfg).float().eval().to(DEV)
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    ckpt = []
    for layer in dense.model.layers:
        ex = layer.mlp.experts
        gu, dn = _checkpoint(E, 2 * I, H), _checkpoint(E, H, I)
        ckpt.append((gu, dn))
        with torch.no_grad():
            ex.gate_up_proj.copy_(mx.convert_moe_packed_tensors(*gu, dtype=torch.float32))  # [E, H, 2I]
            ex.down_proj.copy_(mx.convert_moe_packed_tensors(*dn, dtype=torch.float32))  # [E, I, H]
            ex.gate_up_proj_bias.normal_(0, 0.1)
            ex.down_proj_bias.normal_(0, 0.1)
    model = copy.deepcopy(dense)
    hub = _fake_hub()
    monkeypatch.setattr("transformers.integrations.hub_kernels.get_kernel", lambda *a, **kw: hub)
    mx.replace_with_mxfp4_linear(model, quantization_config=transformers.Mxfp4Config())
    for layer, src, (gu, dn) in zip(model.model.layers, dense.model.layers, ckpt):
        ex = layer.mlp.experts
        assert type(ex).__name__ == "Mxfp4GptOssExperts" and hf_mxfp4.is_mxfp4_block(layer.mlp)
        for name in ("gate_up_proj_bias", "down_proj_bias"):  # left on the meta device by the swap
            setattr(ex, name, torch.nn.Parameter(getattr(src.mlp.experts, name).detach().clone(), requires_grad=False))
        mx.swizzle_mxfp4_convertops(*gu, ex, "gate_up_proj", DEV, hub)
        mx.swizzle_mxfp4_convertops(*dn, ex, "down_proj", DEV, hub)
        assert not isinstance(ex.gate_up_proj, torch.Tensor)  # a hub tensor, as after a real load
    return model, dense


def _block_forward_reference(dense_block, x):
    out, _ = dense_block(x)
    logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), dense_block.router.weight, dense_block.router.bias)
    return out, logits


@pytest.mark.parametrize("E,k", [(4, 2), (5, 5), (3, 1)])
def test_block_matches_transformers_dequantized(monkeypatch, E, k):
    cfg = _config(E=E, k=k, H=64, I=96)
    model, dense = _models(cfg, monkeypatch)
    x = torch.randn(2, 7, cfg.hidden_size, device=DEV)
    block = mk.integrations.transformers.from_hf(model.model.layers[0].mlp, backend="torch")
    assert isinstance(block, hf_mxfp4.Mxfp4MoEBlock)
    out, logits = block(x)
    ref_out, ref_logits = _block_forward_reference(dense.model.layers[0].mlp, x)
    assert_close("out", out, ref_out, rms_tol=1e-5)
    assert_close("router_logits", logits, ref_logits, rms_tol=1e-6)


def test_patched_model_matches_transformers_dequantized(monkeypatch):
    cfg = _config(E=4, k=2, layers=2)
    model, dense = _models(cfg, monkeypatch)
    assert patch(model, backend="torch") == 2
    assert all(isinstance(layer.mlp, hf_mxfp4.Mxfp4MoEBlock) for layer in model.model.layers)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device=DEV)
    with torch.no_grad():
        got, want = model(ids).logits, dense(ids).logits
    assert_close("logits", got, want, rms_tol=1e-5)


def test_weights_stay_packed_and_are_read_once(monkeypatch):
    model, _ = _models(_config(E=4, k=2, H=64, I=64), monkeypatch)
    ex = model.model.layers[0].mlp.experts
    block = mk.integrations.transformers.from_hf(model.model.layers[0].mlp, backend="torch")
    m1 = hf_mxfp4.mxfp4_experts(ex)
    assert m1.w13.fmt == "mxfp4" and m1.w13.data.dtype == torch.uint8 and list(m1.w13.shape) == [4, 128, 64]
    assert m1.w13.data.numel() == 4 * 128 * 32  # packed bytes, never a dequantized weight
    x = torch.randn(5, 64, device=DEV)
    block(x)
    block(x)
    assert hf_mxfp4.mxfp4_experts(ex) is m1  # no per-call conversion
    # the de-interleaved rows: gate j = checkpoint row 2j, up j = row 2j + 1
    d13 = ex.gate_up_proj.storage.layout.unswizzle_data(ex.gate_up_proj.storage.data).transpose(-1, -2)
    assert torch.equal(m1.w13.data[:, :64], d13[:, 0::2]) and torch.equal(m1.w13.data[:, 64:], d13[:, 1::2])
    assert torch.equal(m1.b13[:, 64:], ex.gate_up_proj_bias[:, 1::2])
    with torch.no_grad():  # tensors changed in place: read again
        ex.down_proj_bias.add_(1.0)
    assert hf_mxfp4.mxfp4_experts(ex) is not m1


def test_plain_checkpoint_tensors(monkeypatch):
    """A module filled from a checkpoint without the hub: uint8 ``{proj}_blocks`` / ``{proj}_scales``."""
    cfg = _config(E=4, k=2, H=64, I=64)
    model, dense = _models(cfg, monkeypatch)
    ex = model.model.layers[0].mlp.experts
    for proj in ("gate_up_proj", "down_proj"):
        t, s = getattr(ex, proj), getattr(ex, f"{proj}_precision_config").weight_scale
        data = t.storage.layout.unswizzle_data(t.storage.data).transpose(-1, -2)
        scales = s.storage.layout.unswizzle_data(s.storage.data).transpose(-1, -2)
        del ex.__dict__[proj]
        setattr(ex, f"{proj}_precision_config", None)
        setattr(ex, f"{proj}_blocks", data.reshape(*scales.shape, 16).clone())
        setattr(ex, f"{proj}_scales", scales.clone())
    x = torch.randn(1, 6, 64, device=DEV)
    out, _ = mk.integrations.transformers.from_hf(model.model.layers[0].mlp, backend="torch")(x)
    ref, _ = _block_forward_reference(dense.model.layers[0].mlp, x)
    assert_close("out", out, ref, rms_tol=1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path(monkeypatch, backend, dtype):
    cfg = _config(E=4, k=2, H=64, I=64)
    model, dense = _models(cfg, monkeypatch)
    x = torch.randn(11, cfg.hidden_size, device=DEV)
    mlp = model.model.layers[0].mlp
    ex = mlp.experts
    logits = torch.nn.functional.linear(x, mlp.router.weight, mlp.router.bias)
    weights, ids = mk.topk_gating(logits, 2)
    ids[3, 1] = 4  # an expert-parallel sentinel (>= E): dropped
    got = hf_mxfp4.mxfp4_experts_forward(ex, x.to(dtype), ids, weights, backend=backend)
    keep = ids < 4
    want = dense.model.layers[0].mlp.experts(x, torch.where(keep, ids, 0).long(), torch.where(keep, weights, 0.0))
    assert got.dtype == dtype
    assert_close("out", got, want, rms_tol=1e-5 if dtype == torch.float32 else 2e-3)


def test_triton_path_matches_torch_path_zero_and_one_token(monkeypatch):
    model, _ = _models(_config(E=4, k=2, H=64, I=64), monkeypatch)
    ex = model.model.layers[0].mlp.experts
    for T in (0, 1):
        x = torch.randn(T, 64, device=DEV)
        ids = torch.randint(0, 4, (T, 2), device=DEV)
        w = torch.rand(T, 2, device=DEV)
        ref = hf_mxfp4.mxfp4_experts_forward(ex, x, ids, w, backend="torch")
        assert ref.shape == (T, 64)
        for b in FAST:
            assert_close(f"T={T} {b}", hf_mxfp4.mxfp4_experts_forward(ex, x, ids, w, backend=b), ref, rms_tol=1e-5)


def test_refusals(monkeypatch):
    model, _ = _models(_config(E=4, k=2, H=64, I=64), monkeypatch)
    mlp = model.model.layers[0].mlp
    ex = mlp.experts
    ex.limit = 8.0
    with pytest.raises(ValueError, match="limit=8.0"):
        mk.integrations.transformers.from_hf(mlp)
    ex.limit = 7.0
    with pytest.raises(ValueError, match="not a gpt-oss MLP block"):
        hf_mxfp4.from_hf(torch.nn.Linear(2, 2))
    fresh = mx.Mxfp4GptOssExperts(_config(E=4, k=2, H=64, I=64))  # declared, never loaded: no scales
    with pytest.raises(ValueError, match="no MXFP4 tensors for gate_up_proj"):
        hf_mxfp4.mxfp4_experts(fresh)
    with torch.device("meta"):
        meta = mx.Mxfp4GptOssExperts(_config(E=4, k=2, H=64, I=64))
    meta.gate_up_proj_scales = torch.empty(4, 128, 2, dtype=torch.uint8, device="meta")
    meta.down_proj_scales = torch.empty(4, 64, 2, dtype=torch.uint8, device="meta")
    meta.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(4, 128), requires_grad=False)
    meta.down_proj_bias = torch.nn.Parameter(torch.zeros(4, 64), requires_grad=False)
    with pytest.raises(ValueError, match="meta device"):
        hf_mxfp4.mxfp4_experts(meta)
    bad = copy.copy(ex)
    bad.__dict__ = dict(ex.__dict__)
    bad.__dict__.pop("_moe_kernels_mxfp4", None)
    bad.down_proj_precision_config = types.SimpleNamespace(weight_scale=object())
    with pytest.raises(ValueError, match="neither a torch.Tensor nor a kernels-hub tensor"):
        hf_mxfp4.mxfp4_experts(bad)
    bad.__dict__["down_proj"] = torch.zeros(4, 64, 16, dtype=torch.uint8, device=DEV)
    bad.down_proj_precision_config = None
    bad.down_proj_scales = torch.zeros(4, 64, 1, dtype=torch.uint8, device=DEV)  # I/32 = 2 groups expected
    with pytest.raises(ValueError, match=r"down_proj packed data must be \[E, N, K/2\]"):
        hf_mxfp4.mxfp4_experts(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_dequantized_experts_losslessly(monkeypatch, dtype):
    """transformers without the kernels hub dequantizes the checkpoint; pack_experts_ gets the MXFP4 back exactly."""
    cfg = _config(E=4, k=2, layers=2)
    _, dense = _models(cfg, monkeypatch)
    dense = dense.to(dtype)
    model = copy.deepcopy(dense)
    assert hf_mxfp4.pack_experts_(model) == 2
    assert hf_mxfp4.pack_experts_(model) == 0  # idempotent
    ex = model.model.layers[0].mlp.experts
    sd = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" not in sd and "model.layers.0.mlp.experts.gate_up_proj_blocks" in sd
    assert ex.gate_up_proj_blocks.dtype == torch.uint8 and tuple(ex.gate_up_proj_blocks.shape) == (4, 128, 2, 16)
    mxe = hf_mxfp4.mxfp4_experts(ex)
    src = dense.model.layers[0].mlp.experts
    want13 = torch.cat((src.gate_up_proj[:, :, 0::2], src.gate_up_proj[:, :, 1::2]), 2).transpose(1, 2)  # [E, 2I, H]
    assert torch.equal(mxe.w13.dequantize(dtype), want13) and torch.equal(mxe.w2.dequantize(dtype), src.down_proj.transpose(1, 2))
    if dtype == torch.float32:
        assert patch(model, backend="torch") == 2
        ids = torch.randint(0, cfg.vocab_size, (2, 9), device=DEV)
        with torch.no_grad():
            assert_close("logits", model(ids).logits, dense(ids).logits, rms_tol=1e-5)
        _, scores = model.model.layers[0].mlp(torch.randn(1, 3, 64, device=DEV))
        assert scores.shape == (3, 2)  # GptOssMLP's (out, router_scores)


def test_pack_refuses_weights_that_are_not_mxfp4():
    model = transformers.GptOssForCausalLM(_config(E=4, k=2, layers=2)).to(DEV)  # random init: not MXFP4 values
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    with pytest.raises(ValueError, match="gate_up_proj of expert 0 is not MXFP4-valued"):
        hf_mxfp4.pack_experts_(model)
    ex = model.model.layers[0].mlp.experts
    assert isinstance(ex.gate_up_proj, torch.nn.Parameter) and not hf_mxfp4.is_mxfp4_experts(ex)  # left untouched


def test_block_compiles_fullgraph_with_dynamic_tokens(monkeypatch):
    """Inference under torch.compile(fullgraph=True), two token counts, one graph: the conversion cached by from_hf
    is taken as it is inside the trace."""
    model, _ = _models(_config(E=4, k=2, H=64, I=64), monkeypatch)
    block = mk.integrations.transformers.from_hf(model.model.layers[0].mlp, backend="torch")
    torch._dynamo.reset()
    f = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for T in (5, 9):
            x = torch.randn(T, 64, device=DEV)
            (out, logits), (ref, ref_logits) = f(x), block(x)
            assert_close(f"out T={T}", out, ref.double(), rms_tol=1e-6)
            assert_close(f"logits T={T}", logits, ref_logits.double(), rms_tol=1e-6)
