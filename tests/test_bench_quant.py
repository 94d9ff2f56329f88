"""The quantized-weight rows of ``bench gemm`` / ``bench moe`` and the account: byte counts against the real
packed tensors, the modelled times, and the rows themselves (the Triton rows run in the interpreter here, checked
against the torch reference)."""

import os

import pytest
import torch

import moe_kernels as mk
from bench import costs, gemm
from bench import moe as bench_moe
from bench.shapes import load_models, make_shape

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("name", list(costs.QUANT_FORMATS))
@pytest.mark.parametrize("N,K", [(96, 256), (40, 160)])
def test_weight_bytes_are_the_packed_tensors(name, N, K):
    fmt, kw = costs.QUANT_FORMATS[name]
    q = mk.quantize(torch.randn(3, N, K), fmt, **kw)
    real = sum(t.numel() * t.element_size() for t in (q.data, q.scale)) // 3
    assert costs.weight_bytes(name, N, K, 2) == real
    assert costs.weight_bytes(None, N, K, 2) == 2 * N * K


def test_quant_rows_per_model():
    assert costs.quant_rows("mixtral-8x7b") == ("fp8_tensor", "fp8_block", "int8", "int4", "mxfp4")
    assert costs.quant_rows("qwen3-30b-a3b")[2:] == ("int8", "int4", "mxfp4")
    assert costs.quant_rows("gpt-oss-120b")[2:] == ("mxfp4",)
    assert costs.quant_rows("deepseek-v3") == ("fp8_tensor", "fp8_block")
    assert "gate_up.fwd.int4" in gemm.ops_for("mixtral-8x7b") and "down.fwd.mxfp4" in gemm.ops_for("gpt-oss-120b")
    assert "MoE.fwd.int8" in bench_moe.ops_for("qwen3-30b-a3b") and "MoE.fwd.int8" not in bench_moe.ops_for("gpt-oss-120b")
    assert costs.quant_unsupported("mxfp4", 64, 100) and costs.quant_unsupported("int8", 64, 100) is None


def test_account_models_the_packed_bytes():
    table, _ = load_models()
    s = make_shape("mixtral-8x7b", table["mixtral-8x7b"], "cuda", False, 1)
    rows = {r["path"]: r for r in costs.account_rows(s, fmts=costs.quant_rows(s.model))}
    assert {"decode", "decode int8", "decode int4", "decode mxfp4", "decode fp8_tensor"} <= set(rows)
    # decode reads the weights of the 2 routed experts: the modelled bytes follow the format's bytes per weight
    dense = 2 * costs.expert_bytes(s, None)
    assert rows["decode"]["hbm_gb"] == pytest.approx(dense / 1e9, rel=0.01)
    for name in ("int8", "int4", "mxfp4"):
        assert rows[f"decode {name}"]["hbm_gb"] == pytest.approx(2 * costs.expert_bytes(s, name) / 1e9, rel=0.01)
    assert 3.5 < rows["decode"]["model_ms"] / rows["decode int4"]["model_ms"] < 4.0
    g = make_shape("gpt-oss-120b", table["gpt-oss-120b"], "cuda", False, 4096)
    assert [r["path"] for r in costs.account_rows(g, fmts=("mxfp4",))][-1] == "forward mxfp4"
    with pytest.raises(ValueError, match="inference only"):
        costs.fused_account(s, "bwd", fmt="int4")


def test_gemm_suite_quantized_rows(monkeypatch):
    monkeypatch.setattr(gemm, "ops_for", lambda model: ("gate_up.fwd.int4", "down.fwd.mxfp4"))
    monkeypatch.setattr(gemm, "measure_ceilings", lambda device: {"copy_gbps": 10.0, "matmul_tflops": 0.1})
    shapes, _, notes = gemm.select_gemm(["mixtral-8x7b"], "cpu", True, [1])
    rows, facts = gemm.run_gemm(shapes, "cpu", True, notes)
    assert {r["op"] for r in rows} == {"gate_up.fwd.int4", "down.fwd.mxfp4"}
    s = shapes[0]
    for r in rows:
        name = r["op"].rsplit(".", 1)[1]
        N, K = (s.I2, s.H) if r["op"].startswith("gate_up") else (s.H, s.I)
        assert r["w_mb"] == pytest.approx(r["active_experts"] * costs.weight_bytes(name, N, K, 4) / 1e6, rel=1e-3)
        assert r["h200_ms"] > 0
        if r["backend"] == "triton" and INTERP:  # the interpreter's correctness row against the torch reference
            assert r["err_vs_ref"] is not None and r["err_vs_ref"] < 1e-4, r
    assert any("not a speed path" in n for n in facts["notes"])
