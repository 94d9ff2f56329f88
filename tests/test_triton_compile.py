import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_launches_compile_within_the_limits_of_sm80_and_sm90a():
    """The representative subset of ``triton_compile_check.py`` (the full table: ``--write``): every launch the
    ops make, specialised as the JIT does and compiled for sm_80 and sm_90a, fits shared memory, spills
    nothing, and the prefill GEMMs use wgmma on sm_90a."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_check.py"), "--subset"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " 0 failed" in out.stdout
    for kernel in ("grouped_gemm_kernel", "grouped_wgrad_kernel", "topk_gating_kernel", "plan_rank_kernel",
                   "permute_kernel", "unpermute_kernel", "expert_choice_kernel", "add_slot_sums_kernel"):
        assert f"| {kernel} |" in out.stdout, f"{kernel} was never launched by the drivers"
    assert "| wgmma |" in out.stdout and "| mma.sync |" in out.stdout
