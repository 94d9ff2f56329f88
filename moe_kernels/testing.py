"""Test helpers shared by the suite and by anyone who checks a kernel against the reference."""

from __future__ import annotations

import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, rms_tol: float, max_tol: float | None = None) -> None:
    """Compare ``actual`` with a (float64) ``expected`` by relative errors.

    RMS-relative error ``rms(a - e) / rms(e)`` must be <= ``rms_tol`` and max-relative error
    ``max|a - e| / max|e|`` <= ``max_tol`` (default ``4 * rms_tol``). NaN where ``expected`` is finite
    (an unwritten output under poisoning) fails, and the message names the tensor and the worst index.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    max_tol = 4 * rms_tol if max_tol is None else max_tol
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))  # matching inf/nan are fine
    diff = torch.where(same_nonfinite, 0.0, (a - e).abs())
    diff = torch.where(torch.isnan(diff), float("inf"), diff)
    finite_e = torch.where(torch.isfinite(e), e, 0.0)
    scale_rms = finite_e.square().mean().sqrt().clamp(min=1e-30)
    scale_max = finite_e.abs().max().clamp(min=1e-30)
    rms = diff.square().mean().sqrt() / scale_rms
    mx = diff.max() / scale_max
    if not (rms <= rms_tol and mx <= max_tol):
        worst = torch.unravel_index(diff.argmax(), diff.shape)
        idx = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: rms-rel err {rms.item():.3e} (tol {rms_tol:.1e}), max-rel err {mx.item():.3e} (tol {max_tol:.1e}); "
            f"worst at {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g}"
        )


def tolerance(dtype: torch.dtype) -> float:
    """RMS-relative tolerance of one kernel output in ``dtype`` against a float64 reference."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor shaped like ``t`` full of NaN (fill outputs before a kernel writes them)."""
    return torch.full_like(t, float("nan"))


def assert_compiles_and_replays(layer, tokens, x: torch.Tensor, *, rms_tol: float = 2e-2) -> None:
    """``layer`` (a module or function of ``[T, H]``, on a CUDA device) under ``torch.compile(fullgraph=True,
    dynamic=True)`` at each token count of ``tokens``: forward and backward run, the output within ``rms_tol`` of
    eager. Then ``layer(x)`` captured in a CUDA graph (warmed up on a side stream) and replayed on new values of
    ``x``: equal to eager on them (1e-6)."""
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for T in tokens:
        xt = torch.randn(T, x.shape[1], device=x.device, dtype=x.dtype, requires_grad=True)
        y = compiled(xt)
        y.float().square().mean().backward()
        assert_close("compiled", y, layer(xt.detach()), rms_tol=rms_tol)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y_graph = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        assert_close("graph replay", y_graph, layer(x), rms_tol=1e-6)
