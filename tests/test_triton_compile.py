import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def _rows(text: str, arch: str) -> list:
    """The table rows of one architecture, as lists of cells."""
    body = text.split(f"# Triton launches compiled for {arch}", 1)[1].split("# Triton launches compiled for", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel ")]


def test_launches_compile_within_the_limits_of_sm80_and_sm90a():
    """The representative subset of ``triton_compile_check.py`` (the full table: ``--write``): every launch the
    ops make (bf16, FP8 and weight-only experts), specialised as the JIT does and compiled for sm_80 and sm_90a,
    fits shared memory, spills nothing, the prefill GEMMs use wgmma on sm_90a (FP8 ones with e4m3 operands),
    and the GEMMs with a TMA flag load through ``cp.async.bulk.tensor`` (compiled, never run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_check.py"), "--subset"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " 0 failed" in out.stdout
    for kernel in ("grouped_gemm_kernel", "grouped_wgrad_kernel", "topk_gating_kernel", "plan_rank_kernel",
                   "permute_kernel", "unpermute_kernel", "expert_choice_kernel", "add_slot_sums_kernel",
                   "fp8_grouped_gemm_kernel", "wna16_grouped_gemm_kernel"):
        assert f"| {kernel} |" in out.stdout, f"{kernel} was never launched by the drivers"
    assert "| wgmma |" in out.stdout and "| mma.sync |" in out.stdout
    sm90, sm80 = _rows(out.stdout, "sm_90a"), _rows(out.stdout, "sm_80")
    tma = lambda rows, k: [r for r in rows if r[0] == k and r[11] == "yes"]  # noqa: E731
    assert tma(sm90, "grouped_gemm_kernel") and tma(sm90, "fp8_grouped_gemm_kernel"), "no TMA on sm_90a"
    assert not tma(sm80, "grouped_gemm_kernel") and not tma(sm80, "fp8_grouped_gemm_kernel"), "TMA on sm_80"
    assert any(r[0] == "fp8_grouped_gemm_kernel" and r[8] == "wgmma" and "e4m3" in r[9] for r in sm90)
