import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_runs_and_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_KERNELS_POISON", "TRITON_INTERPRET")}
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--models", "mixtral-8x7b", "--tokens", "16", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused_moe" in out.stdout and "MoE.fwd" in out.stdout
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".csv") for f in files) and any(f.endswith(".json") for f in files)
    data = json.load(open(tmp_path / next(f for f in files if f.endswith(".json"))))
    assert data["meta"]["torch"] and data["rows"]
    ops = {r["op"] for r in data["rows"]}
    assert {"topk_gating", "plan_routing", "permute", "unpermute", "grouped_gemm", "MoE.fwd"} <= ops
    for r in data["rows"]:
        if r.get("err_vs_ref") not in (None, "", "nan"):
            assert float(r["err_vs_ref"]) < 1e-3, r


import pytest  # noqa: E402


@pytest.mark.parametrize("suite,extra", [("permute", ["--tokens", "1,64", "--hidden", "2048"]),
                                         ("gemm", ["--models", "mixtral-8x7b", "--tokens", "1"]),
                                         ("moe", ["--models", "mixtral-8x7b", "--tokens", "1"]),
                                         ("routing", ["--models", "mixtral-8x7b", "--tokens", "16"])])
def test_bench_suites_quick(tmp_path, suite, extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_KERNELS_POISON", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-m", "bench", suite, "--quick", *extra, "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.load(open(tmp_path / next(f for f in os.listdir(tmp_path) if f.endswith(".json"))))["rows"]
    assert rows, "no rows measured"
