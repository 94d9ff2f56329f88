"""Every MoE family of the installed transformers, built tiny, on ``experts_implementation="moe_kernels"``.

A family is a modeling module that uses ``@use_experts_implementation``. :func:`build` makes its model from a
shrunk config (random init, nothing downloaded): the causal LM when there is one, else the text model.
:func:`compare` runs a forward and a backward of the whole model on ``"eager"`` and on ``"moe_kernels"``
and returns the relative errors of the output and of every parameter gradient (expert weights and router
included). ``python -m tests.hf_families [--interpret] [--out FILE]`` writes the table of README's
"Hugging Face experts backend" section.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import warnings
from dataclasses import dataclass

import torch

TOL = 1e-5  # fp32, relative to the largest magnitude of each compared tensor

# sizes for every config attribute of these names that the family's config has
TINY = dict(
    hidden_size=64, intermediate_size=64, moe_intermediate_size=32, expert_intermediate_size=32,
    shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32, ffn_hidden_size=64,
    num_hidden_layers=2, num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=128, max_position_embeddings=256, num_local_experts=6, num_experts=6, n_routed_experts=6,
    moe_num_experts=6, num_experts_per_tok=2, moe_k=2, moe_topk=2, top_k=2, n_shared_experts=1, num_shared_experts=1,
    n_group=1, topk_group=1, num_expert_group=1, topk_groups=1, first_k_dense_replace=0, first_k_dense=0,
    decoder_sparse_step=1, moe_layer_freq=1, mlp_only_layers=[], kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=16, router_jitter_noise=0.0,
    attention_dropout=0.0, hidden_dropout=0.0, pad_token_id=0, moe_router_topk=2, num_dense_layers=0,
    dense_intermediate_size=64, moe_ffn_hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, mamba_n_heads=4, mamba_d_head=16, mamba_head_dim=16,
    mamba_d_state=16, ssm_state_size=16, n_groups=1, mamba_n_groups=1, index_n_heads=2, index_head_dim=16,
    index_topk=8, global_head_dim=16, num_global_key_value_heads=2, depth=1, embed_dim=32, num_heads=2,
    out_hidden_size=64, projector_hidden_size=64, text_hidden_size=64, vision_hidden_size=32,
)
MAX_PARAMS = 16_000_000  # a tiny model has well under this; larger ones are not built (memory of the CI machine)


@dataclass
class Result:
    """One family: ``status`` is ``served`` (every compared tensor within TOL), ``mismatch``, ``fell back``
    (the backend ran transformers' grouped_mm) or ``not buildable`` (the tiny model could not be made)."""

    family: str
    model_type: str = ""
    model_class: str = ""
    status: str = ""
    path: str = ""  # fused / composed (how the experts ran)
    detail: str = ""
    out_err: float = float("nan")
    grad_err: float = float("nan")
    seconds: float = 0.0


def families() -> list[str]:
    """The modeling modules of the installed transformers that use ``@use_experts_implementation``."""
    import transformers.models as tm
    from pathlib import Path

    root = Path(tm.__file__).parent
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        f = d / f"modeling_{d.name}.py"
        if f.exists() and "@use_experts_implementation" in f.read_text():
            out.append(d.name)
    return out


def _model_types(family: str) -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    return [mt for mt in CONFIG_MAPPING_NAMES if model_type_to_module_name(mt) == family]


def _kinds(v) -> list:
    """One layer of each distinct kind in ``v``, in order of appearance (MoE-like kinds kept)."""
    return list(dict.fromkeys(v))


def _get(cfg, name: str):
    """``getattr(cfg, name, None)``, also None for per-layer attributes and read-only properties."""
    prop = getattr(type(cfg), name, None)
    if isinstance(prop, property) and prop.fset is None:
        return None
    try:
        return getattr(cfg, name, None)
    except Exception:
        return None


def _tiny_kwargs(default, depth: int = 0) -> dict:
    """Constructor arguments that shrink a config like ``default`` (its sub-configs included)."""
    from transformers import PretrainedConfig

    kw = {name: (list(v) if isinstance(v, list) else v) for name, v in TINY.items() if _get(default, name) is not None}
    if _get(default, "qk_rope_head_dim") is not None:  # MLA: head_dim is derived from the rope part
        kw.pop("head_dim", None)
    if depth < 3:
        for name, v in list(vars(default).items()):
            if isinstance(v, PretrainedConfig) and not name.startswith("_"):
                try:
                    kw[name] = type(v)(**_tiny_kwargs(v, depth + 1))
                except Exception:
                    pass
    n = None
    for name in ("layer_types", "layers_block_type", "mlp_layer_types", "moe_layer_types"):
        v = _get(default, name)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            kinds = _kinds(v)
            n = max(n or 0, len(kinds), 2)
    if n is not None:
        for name in ("layer_types", "layers_block_type", "mlp_layer_types", "moe_layer_types"):
            v = _get(default, name)
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
                kinds = _kinds(v)
                kw[name] = (kinds * n)[:n]
        if "num_hidden_layers" in kw:
            kw["num_hidden_layers"] = n
    if "layers_block_type" in kw:
        kw.pop("num_hidden_layers", None)
    return kw


def tiny_config(model_type: str):
    """A config of ``model_type`` shrunk to :data:`TINY` sizes."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return cls(**_tiny_kwargs(cls()))


def _classes(family: str, cfg):
    """Model classes of ``family`` for ``cfg``: causal LMs first, then base models."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    from transformers import PreTrainedModel

    found = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)
             and getattr(c, "config_class", None) is type(cfg)]
    rank = lambda c: (0 if c.__name__.endswith("ForCausalLM") else 1 if c.__name__.endswith("Model") else 2, c.__name__)
    return sorted(found, key=rank)


def build(family: str, dtype=torch.float32):
    """``(model, model_type)`` of a tiny random model of ``family``; raises with the reason when it cannot."""
    errors = []
    types = _model_types(family)
    types = sorted(types, key=lambda t: (t != family + "_text", t != family, t))
    for mt in types:
        try:
            cfg = tiny_config(mt)
        except Exception as exc:
            errors.append(f"{mt}: config ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        for cls in _classes(family, cfg):
            try:
                cfg._experts_implementation = "eager"
                with torch.device("meta"):
                    n = sum(p.numel() for p in cls(cfg).parameters())
                if n > MAX_PARAMS:
                    errors.append(f"{cls.__name__}: {n / 1e6:.0f}M parameters after shrinking the config")
                    continue
                torch.manual_seed(0)
                model = cls(cfg).to(dtype).eval()
            except Exception as exc:
                errors.append(f"{cls.__name__}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            if not any(_is_experts(m) for m in model.modules()):
                errors.append(f"{cls.__name__}: no experts module in the tiny model")
                continue
            return model, mt
    raise RuntimeError("; ".join(errors) or "no model type or class found")


def _is_experts(m) -> bool:
    return hasattr(m, "has_gate") and hasattr(m, "_apply_gate") and hasattr(m, "down_proj")


def _run(model, inputs, impl: str):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    torch.manual_seed(1)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach().clone(), grads


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Max error relative to the largest magnitude of ``b`` (or ``floor`` when ``b`` is smaller)."""
    scale = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def compare(family: str, backend: str | None = None) -> Result:
    """Build ``family`` tiny and compare ``"eager"`` with ``"moe_kernels"`` (``backend``: torch/triton, passed
    through ``MOE_KERNELS_HF_BACKEND``); see :class:`Result`."""
    from moe_kernels.integrations import hf_experts
    from moe_kernels.integrations.transformers import register

    register()
    r = Result(family)
    t0 = time.perf_counter()
    try:
        model, r.model_type = build(family)
    except Exception as exc:
        r.status, r.detail = "not buildable", str(exc)[:300]
        return r
    r.model_class = type(model).__name__
    torch.manual_seed(2)
    vocab = getattr(model.config.get_text_config(), "vocab_size", 128) or 128
    inputs = {"input_ids": torch.randint(1, min(vocab, 128), (2, 6)), "use_cache": False}
    try:
        y0, g0 = _run(model, inputs, "eager")
    except Exception as exc:
        r.status, r.detail = "not buildable", f"eager forward failed: {type(exc).__name__}: {str(exc)[:200]}"
        return r
    old = hf_experts.BACKEND
    hf_experts.BACKEND = backend or old
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1, g1 = _run(model, inputs, "moe_kernels")
    except Exception as exc:
        r.status, r.detail = "mismatch", f"moe_kernels run failed: {type(exc).__name__}: {str(exc)[:200]}"
        return r
    finally:
        hf_experts.BACKEND = old
    paths = sorted({m.__dict__[hf_experts._SPEC_ATTR].path for m in model.modules() if hf_experts._SPEC_ATTR in m.__dict__})
    reasons = sorted({m.__dict__[hf_experts._SPEC_ATTR].reason for m in model.modules()
                      if hf_experts._SPEC_ATTR in m.__dict__ and m.__dict__[hf_experts._SPEC_ATTR].reason})
    r.path = "+".join(paths)
    r.out_err = _rel(y1, y0)
    missing = sorted(set(g0) ^ set(g1))
    # a gradient that is rounding noise (|g| < 1e-4 of the largest gradient) is compared at that floor
    floor = 1e-4 * max((g.abs().max().item() for g in g0.values()), default=0.0)
    r.grad_err = max((_rel(g1[n], g0[n], floor) for n in g0 if n in g1), default=0.0)
    fell = [str(w.message) for w in caught if "grouped_mm experts instead" in str(w.message)]
    if fell or paths == ["fallback"]:
        r.status, r.detail = "fell back", (fell[0] if fell else "; ".join(reasons))[:300]
    elif missing:
        r.status, r.detail = "mismatch", f"gradients present in one run only: {missing[:4]}"
    elif r.out_err <= TOL and r.grad_err <= TOL:
        r.status, r.detail = "served", "; ".join(reasons)
    else:
        r.status, r.detail = "mismatch", f"out err {r.out_err:.1e}, grad err {r.grad_err:.1e}"
    r.seconds = time.perf_counter() - t0
    return r


def table(results: list[Result]) -> str:
    lines = ["| family | model class | result | experts path | out err | grad err | note |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        err = lambda v: "" if v != v else f"{v:.0e}"
        note = r.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.family} | {r.model_class} | {r.status} | {r.path} | {err(r.out_err)} | {err(r.grad_err)} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch", help="moe_kernels backend of the experts (torch, triton, auto)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("families", nargs="*", help="default: every family")
    a = p.parse_args(argv)
    results = []
    for fam in a.families or families():
        r = compare(fam, a.backend)
        print(f"{fam:24s} {r.status:13s} {r.path:9s} out {r.out_err:.1e} grad {r.grad_err:.1e} {r.seconds:5.1f}s {r.detail[:150]}",
              flush=True)
        results.append(r)
    buildable = [r for r in results if r.status != "not buildable"]
    served = [r for r in buildable if r.status == "served"]
    summary = (f"{len(results)} families, {len(buildable)} buildable tiny, {len(served)} served and matching "
               f"({100 * len(served) / max(len(buildable), 1):.0f}%)")
    print(summary)
    if a.out:
        with open(a.out, "w") as f:
            f.write(summary + "\n\n" + table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
