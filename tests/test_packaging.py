import os
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk


def test_import_does_not_shadow_top_level_triton_kernels():
    code = (
        "import sys, moe_kernels, moe_kernels.triton_kernels as t; "
        "assert 'triton_kernels' not in sys.modules, 'top-level triton_kernels imported'; "
        "print(t.__name__)"
    )
    # From a neutral directory, so the checkout itself is not on sys.path.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.expanduser("~"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "moe_kernels.triton_kernels"
    probe = subprocess.run([sys.executable, "-c", "import moe_kernels, triton_kernels; print(triton_kernels.__file__)"],
                           capture_output=True, text=True, cwd=os.path.expanduser("~"))
    # Either no top-level module at all, or triton's own one: never ours.
    assert probe.returncode != 0 or os.path.dirname(mk.__file__) not in probe.stdout


def test_backends_report():
    info = mk.backends()
    assert set(info) == {"torch", "triton", "cuda"}
    assert info["torch"].available
    for b in info.values():
        assert isinstance(b.reason, str) and b.reason
    if not torch.cuda.is_available():
        assert not info["cuda"].available
        assert "not built" in info["cuda"].reason or "no GPU" in info["cuda"].reason


def test_explicit_backend_that_cannot_serve_raises():
    logits = torch.randn(4, 8)
    refusing = [n for n in ("triton", "cuda") if not mk.backends()[n].available]
    if mk.backends()["triton"].available:
        refusing.append("triton-fp64")
    for name in refusing:
        x = logits.double() if name == "triton-fp64" else logits
        backend = name.split("-")[0]
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot serve"):
            mk.topk_gating(x, 2, backend=backend)
    with pytest.raises(ValueError, match="has no implementation of expert_counts"):
        mk.expert_counts(torch.randint(0, 4, (5, 2)), 4, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.topk_gating(logits, 2, backend="fastest")


def test_auto_and_torch_backends_agree():
    logits = torch.randn(6, 8)
    a = mk.topk_gating(logits, 2, backend="auto")
    b = mk.topk_gating(logits, 2, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_every_public_op_is_registered():
    for name in ("topk_gating", "topk_gating_backward", "expert_counts", "plan_routing", "permute", "unpermute",
                 "slot_dots", "grouped_gemm", "grouped_gemm_wgrad", "segment_sum", "activation", "activation_backward",
                 "fused_moe", "fused_moe_backward", "update_correction_bias"):
        assert hasattr(torch.ops.moe_kernels, name), name


def test_import_survives_without_extension():
    code = "import moe_kernels; b = moe_kernels.backends(); print(b['cuda'].available, b['torch'].available)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.expanduser("~"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == "True"
