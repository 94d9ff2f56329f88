"""Benchmark shapes: model configs from ``shared/models.json``, scaled down on CPU."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Used when no models.json is found: one model per routing style (few/many experts, oai activation).
BUILTIN_MODELS = {
    "mixtral-8x7b": {"hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2, "scoring": "softmax",
                     "renormalize": True, "shared_intermediate": 0, "activation": "silu"},
    "deepseek-v3": {"hidden": 7168, "intermediate": 2048, "experts": 256, "top_k": 8, "scoring": "sigmoid",
                    "renormalize": True, "shared_intermediate": 2048, "activation": "silu", "num_groups": 8,
                    "topk_groups": 4, "scaling_factor": 2.5, "correction_bias": True},
    "gpt-oss-20b": {"hidden": 2880, "intermediate": 2880, "experts": 32, "top_k": 4, "scoring": "softmax",
                    "renormalize": True, "shared_intermediate": 0, "activation": "swiglu_oai", "bias": True},
}
QUICK_MODELS = ("mixtral-8x7b", "deepseek-v3", "gpt-oss-20b")

# CPU runs keep every expert and k but shrink H and I until the expert weights fit this many parameters.
CPU_PARAM_BUDGET = {True: 2_000_000, False: 8_000_000}  # keyed by quick
DEFAULT_TOKENS = {("cpu", True): 64, ("cpu", False): 256, ("cuda", True): 1024, ("cuda", False): 4096}
CPU_MIN_H, CPU_MIN_I = 128, 64  # floors that keep many-expert models from shrinking to toy sizes
ALIGN = 32  # scaled H and I stay multiples of this (16-byte rows for grouped_mm in any dtype)


@dataclass(frozen=True)
class Shape:
    """One MoE layer to benchmark: sizes after scaling plus the model's routing options."""

    model: str
    T: int  # tokens
    H: int  # hidden
    I: int  # per-expert intermediate  # noqa: E741
    E: int  # experts
    k: int  # top_k
    dtype: torch.dtype
    shared_I: int = 0  # shared-expert intermediate (0: none)
    scale: int = 1  # H and I were divided by about this much
    cfg: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def gated(self) -> bool:
        return bool(self.cfg.get("gated", True))

    @property
    def I2(self) -> int:
        """Rows of w13: 2I when gated, else I."""
        return 2 * self.I if self.gated else self.I

    @property
    def activation(self) -> str:
        return self.cfg.get("activation", "silu")

    @property
    def capacity(self) -> int | None:
        cf = self.cfg.get("capacity_factor")
        return None if cf is None else math.ceil(cf * self.T * self.k / self.E)

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")
        return f"{self.model} T{self.T} H{self.H} I{self.I} E{self.E} k{self.k} {dt}"

    def moe_kwargs(self) -> dict:
        """Keyword arguments of ``moe_kernels.MoE`` for this model (sizes excluded)."""
        c = self.cfg
        return dict(
            scoring=c.get("scoring", "softmax"), renormalize=bool(c.get("renormalize", True)),
            num_groups=int(c.get("num_groups", 1)), topk_groups=int(c.get("topk_groups", 1)),
            scaling_factor=float(c.get("scaling_factor", 1.0)), correction_bias=bool(c.get("correction_bias", False)),
            shared_intermediate_size=self.shared_I, shared_gate=bool(c.get("shared_gate", False)),
            activation=self.activation, gated=self.gated, expert_bias=bool(c.get("bias", False)),
            capacity_factor=c.get("capacity_factor"),
        )


def find_models_json(start: Path = REPO) -> Path | None:
    """``shared/models.json`` in the repo root or the nearest folder above it (``<repo>/../shared``)."""
    for d in (start, *start.parents):
        p = d / "shared" / "models.json"
        if p.is_file():
            return p
    return None


def load_models(path: Path | None = None) -> tuple[dict, str]:
    """Model configs by name and where they came from (a path, or ``builtin``)."""
    path = path or find_models_json()
    if path is None:
        return dict(BUILTIN_MODELS), "builtin"
    with open(path) as f:
        raw = json.load(f)
    return {k: v for k, v in raw.items() if not k.startswith("_")}, str(path)


def pick_models(models: list[str] | None, default: list[str]) -> tuple[dict, str, list[str], list[str]]:
    """``(configs by name, their source, names to run, notes)``: the given names (unknown ones raise
    ValueError) or the defaults found in the model list."""
    table, source = load_models()
    notes = []
    if models:
        unknown = [m for m in models if m not in table]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(table)}")
        return table, source, list(models), notes
    names = [m for m in default if m in table]
    if len(names) < len(default):
        notes.append(f"not in {source}, left out: {', '.join(m for m in default if m not in table)}")
    return table, source, names, notes


def _round(v: float) -> int:
    return max(ALIGN, int(round(v / ALIGN)) * ALIGN)


def make_shape(name: str, cfg: dict, device: str, quick: bool, tokens: int | None = None) -> Shape:
    """Real sizes on GPU (bf16); on CPU (fp32) H, I and the shared I divided by one factor so the
    expert weights stay within about ``CPU_PARAM_BUDGET`` (H and I no smaller than the CPU floors)."""
    H, I, E, k = int(cfg["hidden"]), int(cfg["intermediate"]), int(cfg["experts"]), int(cfg["top_k"])
    shared = int(cfg.get("shared_intermediate", 0))
    T = tokens or DEFAULT_TOKENS[(device, quick)]
    if device == "cuda":
        return Shape(name, T, H, I, E, k, torch.bfloat16, shared, 1, dict(cfg))
    rows = 3 if cfg.get("gated", True) else 2
    scale = max(4, math.ceil(math.sqrt(E * rows * H * I / CPU_PARAM_BUDGET[quick])))
    sI = _round(shared / scale) if shared else 0
    H_cpu, I_cpu = min(H, max(CPU_MIN_H, _round(H / scale))), min(I, max(CPU_MIN_I, _round(I / scale)))
    return Shape(name, T, H_cpu, I_cpu, E, k, torch.float32, sI, scale, dict(cfg))


def select_shapes(models: list[str] | None, device: str, quick: bool, tokens: list[int] | None) -> tuple[list[Shape], str]:
    """The shapes of one run and the source of the configs; unknown model names raise ValueError."""
    table, source = load_models()
    if models:
        unknown = [m for m in models if m not in table]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(table)}")
        names = models
    elif quick:
        names = [m for m in QUICK_MODELS if m in table] or list(table)[:3]
    else:
        names = list(table)
    return [make_shape(n, table[n], device, quick, t) for n in names for t in (tokens or [None])], source
