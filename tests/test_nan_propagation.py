"""A NaN in a token gives a NaN output row on every backend, as the reference does, and never leaks into
the other tokens' rows: the fused activations use NaN-propagating max/min (relu, the swiglu_oai clamps).
The CUDA decode kernel's case builds its inputs on CPU and runs where a GPU and the extension are."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton", "cuda"]
# (activation, gated): the cases where a NaN-dropping max/min would hide the NaN (ungated relu maps it
# to 0; the swiglu_oai clamps map a NaN gate and up to +-7); silu as a control.
CASES = [("relu", False), ("swiglu_oai", True), ("relu", True), ("silu", True)]
T, H, I, E, K = 12, 64, 32, 4, 2
BAD = 5  # the NaN token


def inputs(gated, where):
    x = torch.randn(T, H)
    if where == "element":
        x[BAD, 7] = float("nan")
    else:
        x[BAD] = float("nan")
    w13 = torch.randn(E, (2 if gated else 1) * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K)
    return x, w13, w2, w, ids


def _skip_unless(backend):
    if not mk.backends()[backend].available:
        pytest.skip(mk.backends()[backend].reason)
    if backend == "cuda" and DEV != "cuda":
        pytest.skip("the cuda backend needs a GPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act,gated", CASES)
@pytest.mark.parametrize("where", ["element", "row"])
def test_nan_token_gives_nan_row_only(backend, act, gated, where):
    x, w13, w2, w, ids = inputs(gated, where)  # built on CPU on every machine
    _skip_unless(backend)
    dev = DEV if backend != "torch" else "cpu"
    args = [t.to(dev) for t in (x, w13, w2, w, ids)]
    with torch.no_grad():  # inference: the cuda decode path serves it
        out = mk.fused_moe(*args, activation=act, gated=gated, backend=backend).cpu()
    assert torch.isnan(out[BAD]).all(), f"{backend} {act}: the NaN token's row is {out[BAD]}"
    ok = torch.arange(T) != BAD
    assert torch.isfinite(out[ok]).all(), f"{backend} {act}: a NaN leaked into another token's row"
    clean = x.clone()
    clean[BAD] = 0.0
    expected = mk.fused_moe(clean.double(), w13.double(), w2.double(), w.double(), ids, activation=act, gated=gated,
                            backend="torch")
    assert_close("out (other tokens)", out[ok], expected[ok], rms_tol=1e-5)


@pytest.mark.parametrize("act,gated", CASES[:2])
def test_triton_epilogue_propagates_nan(act, gated):
    """The grouped GEMM epilogue itself, through its launcher: NaN pre-activations stay NaN."""
    from moe_kernels.triton_kernels import grouped_gemm as gg

    _skip_unless("triton")
    P, Kd = 6, 16
    x = torch.randn(P, Kd, device=DEV)
    x[2] = float("nan")
    w = torch.randn(1, (2 if gated else 1) * 8, Kd, device=DEV)
    offsets = torch.tensor([0, P], dtype=torch.int32, device=DEV)
    y = gg.grouped_gemm(x, w, offsets, None, None, True, activation=act, gated=gated,
                        empty=lambda s, dtype, device: torch.full(s, 123.0, dtype=dtype, device=device))
    assert torch.isnan(y[2]).all() and torch.isfinite(y[torch.arange(P) != 2]).all()
