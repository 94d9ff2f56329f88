"""moe_kernels.integrations: transformers blocks patched onto our kernels, and the vLLM-style API."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.integrations import vllm
from moe_kernels.testing import assert_close, tolerance

import naive

# ----- vLLM-style API --------------------------------------------------------------------------------


def _vllm_inputs(T=11, H=24, I=20, E=6, k=2, dtype=torch.float64, rows=2):
    x = torch.randn(T, H, dtype=dtype)
    w1 = torch.randn(E, rows * I, H, dtype=dtype) / H**0.5
    w2 = torch.randn(E, H, I, dtype=dtype) / I**0.5
    gating = torch.randn(T, E)
    return x, w1, w2, gating, k


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_vllm_fused_topk(renormalize, scoring_func):
    x, _, _, gating, k = _vllm_inputs(T=13, E=7, k=3)
    w, ids, token_expert = vllm.fused_topk(x, gating.to(torch.bfloat16), k, renormalize, scoring_func=scoring_func)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and token_expert.dtype == torch.int32
    s = gating.to(torch.bfloat16).double()
    s = torch.softmax(s, -1) if scoring_func == "softmax" else torch.sigmoid(s)
    ref_w, ref_ids = torch.topk(s, k, dim=-1)
    if renormalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(ids.long(), ref_ids)
    assert_close("topk_weights", w, ref_w, rms_tol=tolerance(torch.float32))
    T = x.shape[0]
    expected = torch.arange(k)[None, :] * T + torch.arange(T)[:, None]  # vLLM's source rows: slot j of token t
    assert torch.equal(token_expert, expected.to(torch.int32))
    _, ids64, _ = vllm.fused_topk(x, gating, k, renormalize, indices_type=torch.int64)
    assert ids64.dtype == torch.int64 and torch.equal(ids64, ref_ids)


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai", "silu_no_mul", "gelu_no_mul"])
def test_vllm_fused_experts(activation):
    gated = not activation.endswith("_no_mul")
    x, w1, w2, gating, k = _vllm_inputs(rows=2 if gated else 1)
    if activation == "swigluoai":
        x = x * 4  # reach the clamps
    w, ids, _ = vllm.fused_topk(x, gating, k, True)
    out = vllm.fused_experts(x, w1, w2, w, ids, activation=activation)
    kind = {"swigluoai": "swiglu_oai"}.get(activation, activation.removesuffix("_no_mul"))
    if activation == "swigluoai":  # vLLM's rows are interleaved (gate, up, gate, up, ...)
        w1 = torch.cat([w1[:, 0::2], w1[:, 1::2]], 1)
    expected = naive.moe(x, w1, w2, w, ids, activation=kind, gated=gated)
    assert out.dtype == x.dtype
    assert_close("out", out, expected, rms_tol=tolerance(x.dtype) * 2)


def test_vllm_fused_experts_inplace_bias_on_input_and_expert_map():
    x, w1, w2, gating, _ = _vllm_inputs(E=4)
    w, ids, _ = vllm.fused_topk(x, gating, 1, False)
    b1, b2 = torch.randn(4, w1.shape[1], dtype=x.dtype), torch.randn(4, w2.shape[1], dtype=x.dtype)
    expected = naive.moe(x, w1, w2, w, ids, b13=b1, b2=b2, on_input=True)
    buf = x.clone()
    out = vllm.fused_experts(buf, w1, w2, w, ids, inplace=True, apply_router_weight_on_input=True,
                             w1_bias=b1, w2_bias=b2)
    assert out is buf
    assert_close("inplace out", buf, expected, rms_tol=tolerance(x.dtype) * 2)
    # expert parallelism: this rank holds global experts 1 and 3 of 6 as local experts 0 and 1
    x, _, _, gating, k = _vllm_inputs(E=6)
    w, ids, _ = vllm.fused_topk(x, gating, k, True)
    expert_map = torch.tensor([-1, 0, -1, 1, -1, -1], dtype=torch.int32)
    w1l, w2l = w1[:2], w2[:2]
    out = vllm.fused_experts(x, w1l, w2l, w, ids, global_num_experts=6, expert_map=expert_map)
    assert_close("expert_map out", out, naive.moe(x, w1l, w2l, w, ids, expert_map=expert_map),
                 rms_tol=tolerance(x.dtype) * 2)


def test_vllm_refusals():
    x, w1, w2, gating, k = _vllm_inputs()
    w, ids, _ = vllm.fused_topk(x, gating, k, True)
    with pytest.raises(ValueError, match="use_fp8_w8a8"):
        vllm.fused_experts(x, w1, w2, w, ids, use_fp8_w8a8=True)
    with pytest.raises(ValueError, match="activation"):
        vllm.fused_experts(x, w1, w2, w, ids, activation="relu2_no_mul")
    with pytest.raises(ValueError, match="global_num_experts"):
        vllm.fused_experts(x, w1, w2, w, ids, global_num_experts=3)
    with pytest.raises(ValueError, match="tokens"):
        vllm.fused_topk(x[:3], gating, k, True)


# ----- transformers ------------------------------------------------------------------------------------

def _tf():
    return pytest.importorskip("transformers", minversion="5.0")


COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, experts_implementation="eager", attn_implementation="eager")


def _family_model(family: str):
    """A tiny random causal LM of ``family`` and the number of sparse-MoE blocks in it."""
    tf = _tf()
    if family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                               router_aux_loss_coef=0.1, **COMMON)
        return tf.MixtralForCausalLM(cfg), 2
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=20,
                                num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                                mlp_only_layers=[1], router_aux_loss_coef=0.1, **COMMON)
        return tf.Qwen2MoeForCausalLM(cfg), 1
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3,
                                norm_topk_prob=True, head_dim=8, router_aux_loss_coef=0.1, **COMMON)
        return tf.Qwen3MoeForCausalLM(cfg), 2
    if family == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=16, num_experts=6, num_experts_per_tok=2, router_aux_loss_coef=0.1,
                             **COMMON)
        return tf.OlmoeForCausalLM(cfg), 2
    if family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
                                  first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8, **{**COMMON, "num_key_value_heads": 4})
        return tf.DeepseekV3ForCausalLM(cfg), 1
    if family == "gpt_oss":
        cfg = tf.GptOssConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                              router_aux_loss_coef=0.1, **COMMON)
        return tf.GptOssForCausalLM(cfg), 2
    raise AssertionError(family)


def _randomize(model):
    """Weights of unit-scale activations, random biases and DeepSeek correction bias (zeros would test nothing)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "bias" in name:
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)


def _run(model, embeds, labels):
    model.zero_grad(set_to_none=True)
    x = embeds.clone().requires_grad_(True)
    out = model(inputs_embeds=x, labels=labels, output_router_logits=True)
    (out.loss + out.logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, x.grad, grads


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
HF_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock",
             "DeepseekV3MoE", "GptOssMLP")


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_matches_transformers(family):
    from moe_kernels.integrations.transformers import MoEBlock, patch

    model, n_blocks = _family_model(family)
    model = model.to(torch.float64).train()
    _randomize(model)
    embeds = torch.randn(2, 7, model.config.hidden_size, dtype=torch.float64)
    labels = torch.randint(0, model.config.vocab_size, (2, 7))
    ref, ref_dx, ref_grads = _run(model, embeds, labels)
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ in HF_BLOCKS}
    before = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())

    assert patch(model) == n_blocks == len(blocks)
    assert patch(model) == 0  # already patched
    after = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    assert list(after) == list(before) and after == before  # same keys, same storage: nothing copied
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    for name, block in blocks.items():
        assert isinstance(model.get_submodule(name), MoEBlock)

    out, dx, grads = _run(model, embeds, labels)
    # transformers routes in fp32 (and so do we): the forward agrees to fp64 precision where the routing
    # weights are the fp32 softmax/sigmoid scores themselves; renormalised softmax weights are ours the
    # softmax of the selected logits (never 0/0), transformers' the scores divided by their sum: the same
    # numbers to fp32 rounding. Gradients through the fp32 router (ours: an analytic backward) to fp32 precision.
    renormalised = family in ("mixtral", "qwen3_moe")
    fwd = tolerance(torch.float32) if renormalised else 10 * tolerance(torch.float64)
    bwd = tolerance(torch.float32)
    assert_close("logits", out.logits, ref.logits, rms_tol=fwd)
    assert_close("loss", out.loss, ref.loss, rms_tol=fwd)
    if getattr(ref, "router_logits", None) is not None:  # recorded from the routers (transformers >= 5.1 for DeepSeek)
        assert len(out.router_logits) == len(ref.router_logits) == n_blocks
        for i, (a, b) in enumerate(zip(out.router_logits, ref.router_logits)):
            assert_close(f"router_logits[{i}]", a, b, rms_tol=fwd)
    if family != "deepseek_v3":  # the load-balancing loss, from the recorded router logits
        assert_close("aux_loss", out.aux_loss, ref.aux_loss, rms_tol=fwd)
    assert_close("d inputs_embeds", dx, ref_dx, rms_tol=bwd)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(f"d {name}", grads[name], ref_grads[name], rms_tol=bwd)

    # block by block, outside the model: same outputs (a tuple with router scores for gpt-oss)
    x = torch.randn(3, 5, model.config.hidden_size, dtype=torch.float64)
    for name, block in blocks.items():
        a, b = model.get_submodule(name)(x), block(x)
        assert type(a) is type(b)
        for i, (u, v) in enumerate(zip(a, b) if isinstance(a, tuple) else [(a, b)]):
            assert u.dtype == v.dtype
            assert_close(f"{name} output {i}", u, v, rms_tol=fwd)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_low_precision(family):
    from moe_kernels.integrations.transformers import from_hf

    model, _ = _family_model(family)
    _randomize(model)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        block = next(m for m in model.modules() if type(m).__name__ in HF_BLOCKS)
        ours = from_hf(block, backend="torch")
        assert type(mk.MoE.from_hf(block)) is type(ours)  # the alias on the layer class
        x = torch.randn(4, 3, model.config.hidden_size, dtype=dtype)
        a, b = ours(x), block(x)
        a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
        for i, (u, v) in enumerate(zip(a, b)):
            assert u.dtype == v.dtype == dtype
            assert_close(f"{dtype} output {i}", u, v, rms_tol=2 * tolerance(dtype))


def test_from_hf_refusals():
    tf = _tf()
    from moe_kernels.integrations.transformers import from_hf

    with pytest.raises(ValueError, match="not a supported"):
        from_hf(torch.nn.Linear(2, 2))
    model, _ = _family_model("gpt_oss")
    block = model.model.layers[0].mlp
    block.experts.alpha = 1.0
    with pytest.raises(ValueError, match="swiglu_alpha"):
        from_hf(block)
    cfg = tf.MixtralConfig(intermediate_size=16, num_local_experts=4, hidden_act="gelu_pytorch_tanh", **COMMON)
    with pytest.raises(ValueError, match="activation"):
        from_hf(tf.MixtralForCausalLM(cfg).model.layers[0].mlp)
    model, _ = _family_model("mixtral")
    ours = from_hf(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="not a supported"):
        from_hf(ours)  # a MoEBlock is not a transformers block


def test_mixtral_jitter_and_backends():
    """Mixtral's training-time router jitter draws the same noise; the triton backend serves the block too."""
    tf = _tf()
    from moe_kernels.integrations.transformers import from_hf

    cfg = tf.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.2,
                           **COMMON)
    model = tf.MixtralForCausalLM(cfg).train()
    _randomize(model)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, cfg.hidden_size)
    outs = {}
    for name, m in (("hf", block), ("torch", from_hf(block, backend="torch"))):
        torch.manual_seed(0)
        xi = x.clone().requires_grad_(True)
        y = m(xi.clone())  # transformers scales its input in place
        y.square().sum().backward()
        outs[name] = (y, xi.grad, block.experts.gate_up_proj.grad.clone(), block.gate.weight.grad.clone())
        block.zero_grad(set_to_none=True)
    for i, what in enumerate(("out", "d x", "d gate_up_proj", "d router")):
        assert_close(f"jitter {what}", outs["torch"][i], outs["hf"][i], rms_tol=tolerance(torch.float32))
    if mk.backends()["triton"].available:
        block.eval()
        y = from_hf(block, backend="triton")(x)
        assert_close("triton out", y, block(x), rms_tol=tolerance(torch.float32))
