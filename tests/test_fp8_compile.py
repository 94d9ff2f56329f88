import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_fp8_gemm_compiles_as_launched_for_sm90a_and_sm80():
    """wgmma with e4m3 operands for prefill shapes on sm_90a, the bf16 weight-only path on sm_80, shared memory
    within each architecture's limit and no register spills (compiled, never run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(HERE, "fp8_compile_check.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 failed" in out.stdout
