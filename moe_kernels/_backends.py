"""Backends, what each can serve, and the choice behind ``backend="auto"``.

A backend is one implementation family: ``torch`` (the reference, any device), ``triton``
(Triton kernels; GPU, or CPU under ``TRITON_INTERPRET=1``) and ``cuda`` (the ``moe_kernels._C``
extension). Ops register an implementation per backend with :func:`register`; a public function asks
:func:`select` for the implementation that serves its tensors, and gets a clear error when an
explicitly requested backend cannot.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict

import torch

BACKENDS = ("cuda", "triton", "torch")  # "auto" tries them in this order
_IMPLS: Dict[str, Dict[str, Callable]] = {}


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run in this process, and why not when it cannot."""

    name: str
    available: bool
    reason: str


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    from . import _triton

    if _triton.IMPORT_ERROR is not None:
        return False, f"the Triton kernels failed to load ({_triton.IMPORT_ERROR})"
    if interpreter_mode():
        return True, f"interpreter mode (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly; triton {triton.__version__}"
    if not torch.cuda.is_available():
        return False, f"no GPU (torch.cuda.is_available() is False); triton {triton.__version__} is installed"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


@functools.lru_cache(maxsize=None)
def _cuda_status() -> tuple[bool, str]:
    try:
        importlib.import_module("moe_kernels._C")
    except ImportError as exc:
        return False, f"extension moe_kernels._C not built or not loadable ({exc})"
    if not torch.cuda.is_available():
        return False, "no GPU (torch.cuda.is_available() is False)"
    return True, f"moe_kernels._C on {torch.cuda.get_device_name()}"


def _recording_launches() -> bool:
    try:
        from .triton_kernels._launch import recording
    except Exception:  # triton missing
        return False
    return recording()


def _triton_loaded() -> bool:
    from . import _triton

    return _triton.IMPORT_ERROR is None


def backends() -> Dict[str, BackendInfo]:
    """Report every backend as available or not, with the reason.

    Example::

        >>> moe_kernels.backends()["torch"].available
        True
    """
    t_ok, t_why = _triton_status()
    c_ok, c_why = _cuda_status()
    return {
        "torch": BackendInfo("torch", True, f"pure PyTorch reference (torch {torch.__version__}), any device"),
        "triton": BackendInfo("triton", t_ok, t_why),
        "cuda": BackendInfo("cuda", c_ok, c_why),
    }


def register(op: str, backend: str, supports: Callable[..., str | None] | None = None):
    """Decorator: ``fn`` implements public op ``op`` for ``backend``.

    ``supports(*args, **kwargs)`` returns ``None`` when the backend can serve the call, else the reason.
    """

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = (fn, supports)
        return fn

    return deco


def _refusal(op: str, backend: str, device: torch.device, args, kwargs) -> str | None:
    impls = _IMPLS.get(op, {})
    if backend not in impls:
        return f"backend {backend!r} has no implementation of {op}"
    if backend == "triton":
        ok, why = _triton_status()
        if device.type == "meta" and _recording_launches():  # the compile check: launches recorded, not run
            ok = ok or _triton_loaded()
        if not ok:
            return why
        if device.type == "cpu" and not interpreter_mode():
            return "triton kernels need a GPU tensor (or TRITON_INTERPRET=1 for CPU tensors)"
        if device.type not in ("cpu", "cuda") and not (device.type == "meta" and _recording_launches()):
            return f"triton kernels do not run on {device.type} tensors"
    if backend == "cuda":
        ok, why = _cuda_status()
        if not ok:
            return why
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    supports = impls[backend][1]
    return supports(*args, **kwargs) if supports is not None else None


def select(op: str, backend: str, device: torch.device, *args, **kwargs) -> Callable:
    """The implementation of ``op`` that ``backend`` gives for tensors on ``device``.

    ``auto`` takes the first of cuda, triton, torch that accepts; on CPU tensors the triton
    interpreter is never chosen automatically (it is a test vehicle, not a fast path).
    """
    if backend == "auto":
        for name in BACKENDS:
            if name == "triton" and device.type == "cpu":
                continue
            if _refusal(op, name, device, args, kwargs) is None:
                return _IMPLS[op][name][0]
        raise ValueError(f"{op}: no backend can serve these inputs: {not_supported_reasons(op, device, *args, **kwargs)}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of ('auto',) + {BACKENDS}, got {backend!r}")
    why = _refusal(op, backend, device, args, kwargs)
    if why is not None:
        raise ValueError(f"{op}: backend {backend!r} cannot serve these inputs: {why}")
    return _IMPLS[op][backend][0]


def not_supported_reasons(op: str, device: torch.device, *args, **kwargs) -> Dict[str, str]:
    """For each backend that would refuse this call, why."""
    out = {}
    for name in BACKENDS:
        why = _refusal(op, name, device, args, kwargs)
        if why is not None:
            out[name] = why
    return out
