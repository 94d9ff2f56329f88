import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
HERE = os.path.dirname(os.path.abspath(__file__))


def test_wna16_gemm_compiles_as_launched_for_sm90a_and_sm80():
    """The int8 / int4 / mxfp4 GEMMs of the fused MoE at model shapes: bf16 tensor-core MMA (wgmma on sm_90a for
    prefill), shared memory within each architecture's limit and no register spills (compiled, never run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(HERE, "wna16_compile_check.py")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 failed" in out.stdout
