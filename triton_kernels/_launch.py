"""The one launch path of every Triton kernel, and the GPU architecture it targets.

Every launcher writes ``launch(kernel)[grid](*args, **kwargs)`` with the ``launch`` it was given:
:data:`DIRECT` (a plain launch) or ``Launcher(wrap_triton)`` inside a ``torch.library.triton_op``.
Either way the launch comes here, which

- enters the device of the kernel's tensors, so that a launch on ``cuda:1`` tensors runs on
  ``cuda:1`` and on its current stream even when ``cuda:0`` is the current device (Triton launches on
  the current device and stream);
- passes the launch to the hooks first: a hook that returns True swallows it (the recorder of
  :func:`record` collects launches instead of running them, for the compile check).

:func:`target` says which architecture the configs are chosen for: the properties of the tensors'
GPU, or for CPU and meta tensors the one named by ``MOE_KERNELS_ASSUME_DEVICE`` (``sm_80``, ``sm_86``,
``sm_89``, ``sm_90``, ``sm_100``; ``sm_90`` when unset).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional

import torch


@dataclass(frozen=True)
class Target:
    """What a config must fit: compute capability, shared memory per block (opt-in), SM count."""

    arch: str  # "sm_90"
    capability: tuple  # (9, 0)
    smem_per_block: int  # bytes
    sm_count: int
    name: str = ""  # device name, for tuned config files

    @property
    def has_wgmma(self) -> bool:
        return self.capability[0] == 9

    @property
    def has_tma(self) -> bool:
        return self.capability[0] >= 9


# Shared memory per block with the opt-in attribute (cudaDevAttrMaxSharedMemoryPerBlockOptin).
TARGETS = {
    "sm_80": Target("sm_80", (8, 0), 166_912, 108, "NVIDIA_A100"),
    "sm_86": Target("sm_86", (8, 6), 101_376, 84, "NVIDIA_GeForce_RTX_3090"),
    "sm_89": Target("sm_89", (8, 9), 101_376, 128, "NVIDIA_GeForce_RTX_4090"),
    "sm_90": Target("sm_90", (9, 0), 232_448, 132, "NVIDIA_H100"),
    "sm_100": Target("sm_100", (10, 0), 232_448, 148, "NVIDIA_B200"),
}
DEFAULT_ASSUMED = "sm_90"


def assumed_target() -> Target:
    """The target of CPU and meta tensors: ``MOE_KERNELS_ASSUME_DEVICE`` (read at every call)."""
    name = os.environ.get("MOE_KERNELS_ASSUME_DEVICE", "") or DEFAULT_ASSUMED
    if name not in TARGETS:
        raise ValueError(f"MOE_KERNELS_ASSUME_DEVICE must be one of {tuple(TARGETS)}, got {name!r}")
    return TARGETS[name]


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or getattr(p, "shared_memory_per_block", 49_152)
    name = p.name.replace(" ", "_").replace("/", "_")
    return Target(f"sm_{p.major}{p.minor}", (p.major, p.minor), int(smem), int(p.multi_processor_count), name)


def target(device: torch.device) -> Target:
    """The architecture that configs for tensors on ``device`` are chosen for."""
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return assumed_target()


@dataclass
class LaunchRecord:
    """One kernel launch as the launcher made it: ``kernel[grid](*args, **kwargs)``."""

    kernel: Any  # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict
    target: Target
    tags: dict = field(default_factory=dict)  # what the recorder's caller was driving

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or getattr(getattr(self.kernel, "fn", None), "__name__", "?")


_HOOKS: List[Callable[[LaunchRecord], Optional[bool]]] = []


def add_hook(hook: Callable[[LaunchRecord], Optional[bool]]) -> Callable[[], None]:
    """Call ``hook(record)`` before every launch; a True result swallows the launch. Returns the remover."""
    _HOOKS.append(hook)
    return lambda: _HOOKS.remove(hook)


def recording() -> bool:
    """True while a hook is installed (the backends then accept meta tensors for the triton backend)."""
    return bool(_HOOKS)


@contextlib.contextmanager
def record(**tags) -> Iterator[List[LaunchRecord]]:
    """Collect every launch made inside (tagged with ``tags``) instead of running it.

    The launchers still allocate and compute their torch glue, so drive them with meta tensors::

        with record(model="mixtral") as launches:
            moe_kernels.fused_moe(x_meta, w13_meta, w2_meta, w, ids, backend="triton")
    """
    out: List[LaunchRecord] = []

    def hook(rec: LaunchRecord) -> bool:
        rec.tags.update(tags)
        out.append(rec)
        return True

    remove = add_hook(hook)
    try:
        yield out
    finally:
        remove()


def _device_of(args, kwargs) -> Optional[torch.device]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def device_guard(device: Optional[torch.device], fake: bool = False):
    """The context a launch on ``device`` runs in: that GPU current (a no-op when it already is, for CPU
    tensors, and while tensors are fake: a traced graph gets its device guards from the compiler)."""
    if device is None or device.type != "cuda" or fake or device.index is None:
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def _is_fake(args) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def _run(kernel, wrap, grid, args, kwargs):
    device = _device_of(args, kwargs)
    if _HOOKS:
        rec = LaunchRecord(kernel, tuple(grid), tuple(args), dict(kwargs),
                           target(device) if device is not None else assumed_target())
        for hook in list(_HOOKS):
            if hook(rec) is True:
                return None
    fake = device is not None and device.type == "cuda" and _is_fake(args)
    with device_guard(device, fake):
        return (wrap(kernel) if wrap is not None else kernel)[grid](*args, **kwargs)


class _Bound:
    __slots__ = ("kernel", "wrap")

    def __init__(self, kernel, wrap):
        self.kernel, self.wrap = kernel, wrap

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _run(self.kernel, self.wrap, grid, args, kwargs)


class Launcher:
    """``launch(kernel)[grid](*args, **kwargs)`` through the launch path; ``wrap`` (``wrap_triton``
    inside a triton_op, so torch.compile sees the kernel) is applied last."""

    def __init__(self, wrap: Optional[Callable] = None):
        self.wrap = wrap

    def __call__(self, kernel) -> _Bound:
        return _Bound(kernel, self.wrap)


DIRECT = Launcher(None)
