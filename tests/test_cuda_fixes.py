"""Edge cases of the CUDA kernels, built on CPU everywhere and run on every backend that is here:
the small-batch GEMM with K = 0 (the row table must be synchronised before the epilogue reads it)."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_small_gemm_k0_fused_moe_with_empty_intermediate(backend):
    """I = 0: the second GEMM has K = 0, so its output is the bias alone, weighted and summed over k."""
    T, H, E, k = 5, 64, 4, 2
    x = torch.randn(T, H)
    w13, w2 = torch.randn(E, 0, H), torch.randn(E, H, 0)
    b2 = torch.randn(E, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k)
    expected = (w[:, :, None].double() * b2.double()[ids.long()]).sum(1)
    if not mk.backends()[backend].available or (backend == "cuda" and DEV != "cuda"):
        pytest.skip(f"{backend} is not available here")
    dev = DEV
    with torch.no_grad():
        out = mk.fused_moe(*(t.to(dev) for t in (x, w13, w2, w, ids)), w2_bias=b2.to(dev), backend=backend)
    assert_close("out", out, expected, rms_tol=1e-6)
