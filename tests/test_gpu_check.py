"""bench/gpu_check.sh parses, and its dry run (no GPU step runs) writes the summary with every planned step."""

import os
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "gpu_check.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    out = subprocess.run(["bash", SCRIPT, "--dry-run", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = (tmp_path / "summary.md").read_text()
    for step in ("build", "kernels", "compile_graphs_invariance", "rest_of_suite", "memcheck", "racecheck", "bench_main"):
        assert f"| {step} | dry run" in summary, summary
    for field in ("- date:", "- commit:", "- gpu:", "- torch:"):
        assert field in summary
    with open(SCRIPT) as f:
        head = f.read().split("set -uo pipefail")[0]
    assert "Budget plan" in head and "total  535" in head
