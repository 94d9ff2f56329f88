"""Pieces shared by the ``permute``, ``gemm`` and ``moe`` suites: the backends to run, correctness-only rows
for the Triton interpreter, ``torch.compile``'d baselines (compile time excluded) and goal notes."""

from __future__ import annotations

import time
from typing import Callable

import torch

import moe_kernels as mk

from .harness import Case, output_error, run_case, sig
from .suites import available_backends

INTERP_NOTE = "interpreter: correctness check, not timed"


def suite_backends(op: str, device: str) -> tuple[list[str], list[str]]:
    """Available moe_kernels backends (torch first) with an implementation of ``op``, and run notes."""
    impls = mk._backends._IMPLS.get(op, {})
    status = mk.backends()
    backends = [b for b in available_backends() if b in impls]
    notes = [f"{n} backend not run: {i.reason}" for n, i in status.items() if not i.available]
    if device == "cpu" and "triton" in backends:
        notes.append("triton rows on CPU run the Triton interpreter (TRITON_INTERPRET=1): one untimed call at the "
                     "smallest sizes, compared with backend=torch (a correctness check, not a speed path)")
    return backends, notes


def interpreted(backend: str, device: str) -> bool:
    """The row runs Triton kernels in the interpreter (CPU tensors)."""
    return backend == "triton" and device == "cpu"


def check_case(case: Case, device: str, quick: bool, ceilings: dict, ref_out, ratios: dict) -> tuple[dict, object]:
    """One untimed call of ``case`` (interpreter rows): the row carries ``err_vs_ref`` and a note, no time."""
    fn, case.fn = case.fn, None
    row, _ = run_case(case, device, quick, ceilings, None, ratios)
    if fn is None:
        return row, None
    try:
        out = fn()
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        row["note"] = f"error: {type(exc).__name__}: {msg[:160]}"
        return row, None
    finally:
        for g in case.grads:
            g.grad = None
    if ref_out is not None and out is not None:
        row["err_vs_ref"] = sig(output_error(out, ref_out))
    row["note"] = f"{row['note']}; {INTERP_NOTE}" if row["note"] else INTERP_NOTE
    return row, out


def measure(case: Case, device: str, quick: bool, ceilings: dict, ref_out, ratios: dict) -> tuple[dict, object]:
    """``run_case`` for timed rows, ``check_case`` for interpreter rows."""
    if interpreted(case.backend, device):
        return check_case(case, device, quick, ceilings, ref_out, ratios)
    return run_case(case, device, quick, ceilings, ref_out, ratios)


def add_note(row: dict, text: str) -> None:
    row["note"] = f"{row['note']}; {text}" if row["note"] else text


def goal(ok: bool | None, text: str) -> str | None:
    """The goal column: ``met: text`` / ``MISSED: text`` (None: no measurement)."""
    return None if ok is None else f"{'met' if ok else 'MISSED'}: {text}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Compiler:
    """``torch.compile(fn, dynamic=False)`` per shape (``reset()`` between shapes), compile time excluded;
    remembers the first failure and then skips every compiled row with its reason."""

    def __init__(self, device: str):
        self.device, self.failed = device, None

    def reset(self) -> None:
        torch._dynamo.reset()  # a fresh cache per shape: static recompiles would hit the recompile limit

    def __call__(self, fn: Callable, warm: Callable[[Callable], object]) -> tuple[Callable | None, str]:
        """``(compiled fn, note)``; ``warm(compiled)`` runs it once (forward, or forward+backward) to compile
        it. ``compiled`` is None when compiling failed; ``note`` gives the reason or the compile time."""
        if self.failed:
            return None, self.failed
        compiled = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        try:
            warm(compiled)
            sync(self.device)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            self.failed = f"skipped: torch.compile failed here ({type(exc).__name__}: {msg})"
            return None, self.failed
        return compiled, f"compiled in {time.perf_counter() - t0:.1f} s"
