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


def select_suite(models, device: str, quick: bool, tokens, *, defaults, quick_defaults, token_table: dict,
                 small: bool, cpu_note: str):
    """``(shapes, source of the configs, notes)`` of a model suite: the given or default models at the given or
    default tokens (``token_table[(device, quick)]``); ``small``: the quick CPU parameter budget always."""
    from .shapes import make_shape, pick_models

    table, source, names, notes = pick_models(models, quick_defaults if quick else defaults)
    shapes = [make_shape(n, table[n], device, small or quick, T) for n in names
              for T in (tokens or token_table[(device, quick)])]
    if device == "cpu":
        notes.append(cpu_note)
    return shapes, source, notes


def per_shape(groups, make: Callable, device: str):
    """``(shape, op, inputs)`` of each ``(shape, op)`` group, the inputs made once per shape by ``make(shape)``
    (the previous shape's freed first)."""
    inp = None
    for s, op in groups:
        if inp is None or inp.s is not s:
            inp = None
            if device == "cuda":
                torch.cuda.empty_cache()
            inp = make(s)
        yield s, op, inp


def full_shape(s):
    """The model's real-size shape at the same tokens (the GPU run's; CPU runs are scaled down)."""
    from .shapes import make_shape

    return s if s.scale == 1 else make_shape(s.model, s.cfg, "cuda", False, s.T)


def fill_vs_bf16(group: list[dict], rows: list[dict], s, dense_op: str | None) -> None:
    """``vs_bf16`` of one group: the same backend's dense (``dense_op``) time on shape ``s`` over the row's
    (None for dense rows, ``dense_op`` None)."""
    base = {r["backend"]: r["median_ms"] for r in rows if r["op"] == dense_op and r["shape"] == s.label
            and r["T"] == s.T} if dense_op else {}
    for row in group:
        b = base.get(row["backend"])
        row["vs_bf16"] = sig(b / row["median_ms"], 3) if b and row["median_ms"] else None


def suite_facts(quick: bool, backends: list[str], ceilings: dict, notes: list[str], goals: dict, shapes) -> dict:
    """The ``facts`` of a suite's run for the harness (meta of the results)."""
    return {
        "quick": quick, "backends": backends, "ceilings": ceilings, "notes": notes, "goals": goals,
        "backend_status": {n: i.reason for n, i in mk.backends().items()},
        "shapes": [{"model": s.model, "label": s.label, "cpu_scale": s.scale} for s in shapes],
    }


QUANT_NOTE = ("{fmt} rows: quantized expert weights, forward only; bytes and w MB count the packed weights and "
              "their scales (fp8: 1 byte a weight; int8: 1 byte + fp32 per channel; int4: 4 bits + fp32 per group of "
              "128/64/32; mxfp4: 4 bits + an e8m0 byte per 32); fp8 activations are quantized dynamically, the "
              "weight-only formats (int8, int4 on Mixtral and Qwen3-30B-A3B; mxfp4 also on gpt-oss) keep bf16 "
              "activations; err_vs_ref against the torch reference of the same format; vs_bf16: the same backend's "
              "dense forward time over the row's")
CPU_QUANT_NOTE = ("CPU: quantized rows run the torch reference (it dequantizes the weights every call): correctness "
                  "and byte counts, not a speed path")
H200_NOTE = ("H200 ms: modelled roofline time of the row's op at the model's real size (not the CPU-scaled one) at "
             "the documented H200 ceilings (790 TFLOP/s bf16 dense, 4.3 TB/s): a model, not a measurement")


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
