"""The CPU grouped GEMM kernels (moe_kernels/_cpu_gemm.c) against float64 products: both weight layouts, bias, the
weight gradient, odd sizes, experts without rows and over the row limit, NaN and inf; bitwise the same at any thread
count and any row count; the inputs they decline; the build's fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

from moe_kernels import _cpu_gemm
from moe_kernels.testing import assert_close, tolerance

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def built():
    if _cpu_gemm.lib() is None:
        pytest.skip("the CPU grouped GEMM kernels cannot be built here")


def _bounds(counts):
    b = [0]
    for c in counts:
        b.append(b[-1] + c)
    return b


def _counts(E, most):
    """Rows per expert: none, one, a few, more than ``most`` (left to BLAS), ``most``, and so on."""
    return ([0, 1, 3, 4, 5, most + 1, 9, most] * E)[:E]


def _weights(E, K, N, layout, dtype, g):
    """``wt [E, K, N]``: a transposed view of ``[E, N, K]`` ("nt": unit stride along K) or contiguous ("nn")."""
    if layout == "nt":
        return torch.randn(E, N, K, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    return torch.randn(E, K, N, generator=g, dtype=torch.float64).to(dtype)


def _gemm(x, wt, bias, b, N, most=None):
    y = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    rows = _cpu_gemm.gemm_rows(x, wt, bias)
    assert rows == _cpu_gemm.MAX_ROWS
    _cpu_gemm.gemm(x, wt, bias, _cpu_gemm.bounds_array(b), y, rows if most is None else most)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nt", "nn"])
@pytest.mark.parametrize("E,K,N", [(5, 37, 61), (4, 8, 32), (2, 1, 1), (7, 129, 33), (3, 64, 96), (8, 288, 70)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_float64(dtype, layout, E, K, N, bias):
    g = torch.Generator().manual_seed(E * K + N)
    most = _cpu_gemm.MAX_ROWS
    b = _bounds(_counts(E, most))
    x = torch.randn(b[-1], K, generator=g, dtype=torch.float64).to(dtype)
    wt = _weights(E, K, N, layout, dtype, g)
    bi = torch.randn(E, N, generator=g, dtype=torch.float64).to(dtype) if bias else None
    y = _gemm(x, wt, bi, b, N)
    for e in range(E):
        lo, hi = b[e], b[e + 1]
        if hi - lo > most:
            assert y[lo:hi].isnan().all(), f"expert {e}: over the row limit, left to BLAS, yet written"
        elif hi > lo:
            want = x[lo:hi].double() @ wt[e].double() + (bi[e].double() if bias else 0)
            assert_close(f"y expert {e}", y[lo:hi], want, rms_tol=tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,I,J", [(5, 61, 37), (4, 32, 8), (2, 1, 1), (7, 33, 129), (3, 2048, 40)])
def test_wgrad_matches_float64(dtype, E, I, J):
    g = torch.Generator().manual_seed(E * I + J)
    most = _cpu_gemm.wgrad_rows(torch.empty(1, 1, dtype=dtype), torch.empty(1, 1, dtype=dtype))
    assert most == _cpu_gemm.MAX_ROWS
    b = _bounds(_counts(E, most))
    a = torch.randn(b[-1], I, generator=g, dtype=torch.float64).to(dtype)
    bb = torch.randn(b[-1], J, generator=g, dtype=torch.float64).to(dtype)
    out = torch.full((E, I, J), float("nan"), dtype=dtype)
    _cpu_gemm.wgrad(a, bb, _cpu_gemm.bounds_array(b), out, most)
    for e in range(E):
        lo, hi = b[e], b[e + 1]
        if hi - lo > most:
            assert out[e].isnan().all(), f"expert {e}: over the row limit, left to BLAS, yet written"
        elif hi == lo:
            assert torch.equal(out[e], torch.zeros(I, J, dtype=dtype)), f"expert {e} without rows: not zeros"
        else:
            assert_close(f"dW expert {e}", out[e], a[lo:hi].double().t() @ bb[lo:hi].double(), rms_tol=tolerance(dtype))


@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_nan_and_inf_stay_where_they_belong(layout):
    """A NaN in one row reaches only that row; an inf weight gives inf (or NaN against a zero) in the columns it
    touches, as the float64 product does."""
    g = torch.Generator().manual_seed(3)
    b = [0, 6, 6, 13]
    x = torch.randn(13, 40, generator=g, dtype=torch.float64)
    x[2, 5] = float("nan")
    x[8, 7] = 0.0
    wt = _weights(3, 40, 50, layout, torch.float64, g)
    wt[2, 7, 11] = float("inf")
    y = _gemm(x, wt, None, b, 50)
    want = torch.cat([x[b[e]:b[e + 1]] @ wt[e] for e in range(3)])
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    fin = want.isfinite()
    assert_close("finite", y[fin], want[fin], rms_tol=1e-12)
    out = torch.full((3, 40, 50), float("nan"), dtype=torch.float64)
    gy = torch.randn(13, 50, generator=g, dtype=torch.float64)
    _cpu_gemm.wgrad(x, gy, _cpu_gemm.bounds_array(b), out, 16)
    want = torch.stack([x[b[e]:b[e + 1]].t() @ gy[b[e]:b[e + 1]] for e in range(3)])
    assert torch.equal(out.isnan(), want.isnan())
    assert out[0, 5].isnan().all() and out[0, 4].isfinite().all()


@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_bitwise_the_same_at_any_thread_count_and_row_count(layout):
    """Each output element is one fixed sequence of operations: the same bits with 1 or 2 threads, and a row's
    result does not depend on how many other rows its expert has (batch-invariant)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 77, generator=g)
    wt = _weights(2, 77, 45, layout, torch.float32, g)
    bi = torch.randn(2, 45, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append((_gemm(x, wt, bi, [0, 17, 30], 45, 17), _wgrad(x, [0, 17, 30])))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    full = runs[0][0]
    for m in (1, 2, 5, 9):  # the first m rows of expert 0 alone, and expert 1 alone
        part = _gemm(torch.cat([x[:m], x[17:]]), wt, bi, [0, m, m + 13], 45, 17)
        assert torch.equal(part[:m], full[:m]) and torch.equal(part[m:], full[17:])


def _wgrad(x, b):
    out = torch.full((len(b) - 1, x.shape[1], 9), float("nan"))
    _cpu_gemm.wgrad(x, x[:, :9], _cpu_gemm.bounds_array(b), out, 17)
    return out


@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_strided_views(layout):
    """Rows with a stride above their length (column slices), a bias with padded rows, an output slice; the
    weight gradient of row-strided inputs."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 50, generator=g)[:, 3:43]  # [11, 40], row stride 50
    wt = _weights(2, 40, 24, layout, torch.float32, g)
    bi = torch.randn(2, 30, generator=g)[:, :24]
    yb = torch.full((11, 31), float("nan"))
    y = yb[:, 2:26]
    assert _cpu_gemm.gemm_rows(x, wt, bi) == _cpu_gemm.MAX_ROWS
    _cpu_gemm.gemm(x, wt, bi, _cpu_gemm.bounds_array([0, 4, 11]), y, 16)
    want = torch.cat([x[:4].double() @ wt[0].double() + bi[0].double(), x[4:].double() @ wt[1].double() + bi[1].double()])
    assert_close("y", y, want, rms_tol=1e-5)
    assert yb[:, :2].isnan().all() and yb[:, 26:].isnan().all(), "wrote outside the output view"
    gy = torch.randn(11, 40, generator=g)[:, 5:29]  # [11, 24], row stride 40
    out = torch.full((2, 40, 24), float("nan"))
    _cpu_gemm.wgrad(x, gy, _cpu_gemm.bounds_array([0, 4, 11]), out, 16)
    want = torch.stack([x[:4].double().t() @ gy[:4].double(), x[4:].double().t() @ gy[4:].double()])
    assert_close("dW", out, want, rms_tol=1e-5)


def test_inconsistent_arguments_raise():
    """The kernels read raw pointers: shapes, dtypes and bounds that do not fit are a ValueError, not a crash."""
    x, w, y = torch.randn(4, 16), torch.randn(2, 16, 8), torch.empty(4, 8)
    b = _cpu_gemm.bounds_array([0, 2, 4])
    for bad in [(x[:, :8], w, None, b, y), (x, w, None, b, torch.empty(4, 9)), (x, w, None, b, y.double()),
                (x, w, torch.randn(2, 9), b, y), (x, w, None, _cpu_gemm.bounds_array([0, 2, 5]), y),
                (x, w, None, _cpu_gemm.bounds_array([0, 4]), y)]:
        with pytest.raises(ValueError, match="_cpu_gemm"):
            _cpu_gemm.gemm(*bad, 32)
    for bad in [(x, x[:3], b, torch.empty(2, 16, 16)), (x, x, b, torch.empty(2, 16, 8)),
                (x, x, b, torch.empty(2, 16, 32)[:, :, :16]), (x, x, _cpu_gemm.bounds_array([0, 9, 9]), torch.empty(2, 16, 16))]:
        with pytest.raises(ValueError, match="_cpu_gemm"):
            _cpu_gemm.wgrad(*bad, 32)


def test_declines_what_it_cannot_take():
    """bf16, mixed dtypes, weights without a unit stride, strided columns, a strided bias: 0 rows."""
    x = torch.randn(4, 16)
    w = torch.randn(2, 16, 8)
    assert _cpu_gemm.gemm_rows(x, w, None) and _cpu_gemm.wgrad_rows(x, x)
    assert not _cpu_gemm.gemm_rows(x.bfloat16(), w.bfloat16(), None)
    assert not _cpu_gemm.gemm_rows(x, w.double(), None)
    assert not _cpu_gemm.gemm_rows(x, torch.randn(2, 32, 16)[:, ::2, ::2], None)
    assert not _cpu_gemm.gemm_rows(torch.randn(4, 32)[:, ::2], w, None)
    assert not _cpu_gemm.gemm_rows(x, w, torch.randn(2, 16)[:, ::2])
    assert not _cpu_gemm.wgrad_rows(x.half(), x.half()) and not _cpu_gemm.wgrad_rows(x, torch.randn(4, 32)[:, ::2])


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_disabled_and_failed_builds_fall_back(tmp_path):
    """``MOE_KERNELS_CPU_GEMM=0``: no kernels, no warning. A compiler that fails: no kernels, one warning naming
    the failure, and the CPU path still right (torch's GEMMs)."""
    code = ("import torch, moe_kernels as mk; from moe_kernels import _cpu_gemm;"
            "x = torch.randn(5, 8); w13 = torch.randn(3, 12, 8); w2 = torch.randn(3, 8, 6);"
            "w, ids = torch.rand(5, 2), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2]]);"
            "out = mk.fused_moe(x, w13, w2, w, ids); want = mk.reference.fused_moe(x, w13, w2, w, ids);"
            "print(_cpu_gemm.lib() is None, bool(torch.allclose(out, want, atol=1e-5)))")
    off = _python(code, MOE_KERNELS_CPU_GEMM="0")
    assert off.returncode == 0 and off.stdout.split() == ["True", "True"], off.stderr
    assert "CPU grouped GEMM" not in off.stderr
    bad = _python(code, CC="false", MOE_KERNELS_CACHE_DIR=str(tmp_path))
    assert bad.returncode == 0 and bad.stdout.split() == ["True", "True"], bad.stderr
    assert bad.stderr.count("CPU grouped GEMM kernels are not available") == 1, bad.stderr
