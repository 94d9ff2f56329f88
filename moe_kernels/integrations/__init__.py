"""Drop-in use of moe_kernels from other libraries.

- :mod:`moe_kernels.integrations.transformers`: ``patch(model)`` / ``from_hf(block)`` run the sparse-MoE
  blocks of Hugging Face transformers (5.x) models on our kernels, on the same parameters.
- :mod:`moe_kernels.integrations.vllm`: ``fused_experts`` and ``fused_topk`` with vLLM's argument names and
  layouts, so a vLLM-style caller switches by changing an import.
- :mod:`moe_kernels.integrations.hf_fp8`: the experts forward of transformers' ``FP8Experts`` (fine-grained FP8
  checkpoints), registered in ``ALL_FP8_EXPERTS_FUNCTIONS`` by ``register_fp8()``.
- :mod:`moe_kernels.integrations.hf_mxfp4`: gpt-oss's MXFP4 experts (``Mxfp4GptOssExperts``) on packed
  ``QuantizedWeight``s, through ``patch(model)`` / ``from_hf(block)``.

Neither submodule imports its library: transformers and vLLM stay optional (transformers is a test extra).
"""
