"""The ``"moe_kernels"`` transformers experts implementation (integrations.transformers.register, hf_experts)
and fused_moe's interleaved gate/up layout."""

import subprocess
import sys
import warnings

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import assert_close

import hf_families

transformers = pytest.importorskip("transformers")

from moe_kernels.integrations import hf_experts  # noqa: E402
from moe_kernels.integrations.transformers import register  # noqa: E402

# one family per layout (CI budget; `python -m tests.hf_families` runs them all): plain, grouped routing + shared
# experts, interleaved + transposed + biases, non-gated relu2 (composed), clamped SwiGLU (composed), post-expert
# norm (composed)
CI_FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss", "nemotron_h", "deepseek_v4", "muse_spark")
INTERPRETER_FAMILIES = ("gpt_oss",)


def test_import_does_not_touch_transformers():
    code = "import sys, moe_kernels, moe_kernels.integrations.transformers; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_register_is_idempotent_and_listed():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    expected = ["ALL_EXPERTS_FUNCTIONS"]
    try:  # the FP8 experts registry (fine-grained FP8 checkpoints) where this transformers has one
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS  # noqa: F401
        expected.append("ALL_FP8_EXPERTS_FUNCTIONS")
    except ImportError:
        pass
    assert register() == register() == expected
    assert ALL_EXPERTS_FUNCTIONS["moe_kernels"] is hf_experts.experts_forward
    with pytest.raises(ValueError, match="backend must be one of"):
        register(backend="tpu")


def test_families_are_enumerated():
    fams = hf_families.families()
    assert len(fams) >= 50 and {"mixtral", "gpt_oss", "deepseek_v3", "qwen3_moe"} <= set(fams)


@pytest.mark.parametrize("family", CI_FAMILIES)
def test_family_matches_eager(family):
    r = hf_families.compare(family, "torch")
    assert r.status == "served", (r.status, r.detail)
    assert r.out_err <= hf_families.TOL and r.grad_err <= hf_families.TOL


@pytest.mark.parametrize("family", INTERPRETER_FAMILIES)
def test_family_matches_eager_triton_interpreter(family):
    if not mk.backends()["triton"].available:
        pytest.skip(mk.backends()["triton"].reason)
    r = hf_families.compare(family, "triton")
    assert r.status == "served", (r.status, r.detail)
    assert r.out_err <= 1e-5 and r.grad_err <= 1e-5


def _mixtral(E=5, **kw):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=E, num_experts_per_tok=2, **kw)
    cfg._experts_implementation = "moe_kernels"
    torch.manual_seed(0)
    ex = MixtralExperts(cfg).double()
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.2)
    return ex


def _eager(ex, x, ids, w):
    ex.config._experts_implementation = "eager"
    try:
        return ex(x, ids, w)
    finally:
        ex.config._experts_implementation = "moe_kernels"


def test_sentinel_ids_are_dropped():
    """Expert-parallel sentinels (ids >= E) contribute nothing and get no router gradient."""
    register()
    ex = _mixtral()
    T, k, E = 7, 2, 5
    x = torch.randn(T, 32, dtype=torch.float64)
    ids = torch.randint(0, E, (T, k))
    ids[1, 0], ids[4, 1], ids[6] = E, E + 3, E  # row 6: both slots elsewhere
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    out = ex(x, ids, w)
    kept = ids < E
    want = _eager(ex, x, torch.where(kept, ids, 0), torch.where(kept, w, 0.0))
    assert_close("out", out, want, rms_tol=1e-12)
    assert out[6].abs().max() == 0
    out.sum().backward()
    assert (w.grad[~kept] == 0).all() and (w.grad[kept] != 0).all()


def test_fallback_warns_once_with_the_reason():
    register()
    ex = _mixtral()
    ex.has_bias = True  # flags a bias the module does not hold: cannot be served
    ex.__dict__.pop(hf_experts._SPEC_ATTR, None)
    x, ids, w = torch.randn(4, 32, dtype=torch.float64), torch.randint(0, 5, (4, 2)), torch.rand(4, 2, dtype=torch.float64)
    ex.has_bias = False
    want = _eager(ex, x, ids, w)
    ex.has_bias = True
    hf_experts._WARNED.clear()
    with pytest.warns(UserWarning, match=r"MixtralExperts runs on transformers' grouped_mm .*has_bias is set"):
        ex.__dict__["gate_up_proj_bias"] = None
        with pytest.raises(Exception):  # grouped_mm itself needs the bias the flag announces
            ex(x, ids, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        with pytest.raises(Exception):
            ex(x, ids, w)
    ex.has_bias = False
    ex.__dict__.pop(hf_experts._SPEC_ATTR)
    assert_close("out", ex(x, ids, w), want, rms_tol=1e-12)


def test_layout_is_read_by_value():
    """The activation is recognised by what the gate computes, in either gate/up layout."""
    register()
    ex = _mixtral()
    assert hf_experts.experts_layout(ex) == hf_experts.ExpertsLayout("fused", activation="silu")
    ex2 = _mixtral(hidden_act="gelu_pytorch_tanh")
    spec = hf_experts.experts_layout(ex2)
    assert spec.path == "composed" and "none of fused_moe's" in spec.reason
    x, ids, w = torch.randn(5, 32, dtype=torch.float64), torch.randint(0, 5, (5, 2)), torch.rand(5, 2, dtype=torch.float64)
    assert_close("out", ex2(x, ids, w), _eager(ex2, x, ids, w), rms_tol=1e-12)


def test_zero_tokens():
    register()
    ex = _mixtral()
    x = torch.randn(0, 32, dtype=torch.float64, requires_grad=True)
    out = ex(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.float64))
    assert out.shape == (0, 32)
    out.sum().backward()
    assert ex.gate_up_proj.grad is not None and (ex.gate_up_proj.grad == 0).all()


def _interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    g, u = t.chunk(2, dim)
    return torch.stack([g, u], dim + 1).flatten(dim, dim + 1)


@pytest.mark.parametrize("backend,activation", [("torch", "silu"), ("torch", "swiglu_oai"), ("triton", "swiglu_oai")])
def test_fused_moe_interleaved(backend, activation):
    """gate_up_interleaved on w13 [E, 2I, H] with alternating rows equals the concatenated layout; a transposed
    view (gpt-oss's gate_up_proj [E, H, 2I]) is read in place."""
    if backend == "triton" and not mk.backends()["triton"].available:
        pytest.skip(mk.backends()["triton"].reason)
    dt = torch.float64 if backend == "torch" else torch.float32
    T, H, I, E, k = 11, 64, 40, 5, 2
    x = torch.randn(T, H, dtype=dt)
    w13 = torch.randn(E, 2 * I, H, dtype=dt) / 8
    w2 = torch.randn(E, H, I, dtype=dt) / 8
    b13, b2 = torch.randn(E, 2 * I, dtype=dt), torch.randn(E, H, dtype=dt)
    w = torch.rand(T, k, dtype=dt)
    ids = torch.randint(0, E, (T, k))
    ids[0, 1] = -1
    gu = _interleave(w13, 1).transpose(1, 2).contiguous()  # [E, H, 2I], as gpt-oss stores it
    leaves = [t.clone().requires_grad_() for t in (x, gu, b13, w)]
    bi = _interleave(leaves[2], 1)
    out = mk.fused_moe(leaves[0], leaves[1].transpose(1, 2), w2, leaves[3], ids, activation=activation,
                       w13_bias=bi, w2_bias=b2, gate_up_interleaved=True, backend=backend)
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, w13, b13, w)]
    want = mk.fused_moe(ref_leaves[0], ref_leaves[1], w2.double(), ref_leaves[3], ids, activation=activation,
                        w13_bias=ref_leaves[2], w2_bias=b2.double(), backend="torch")
    tol = 1e-12 if dt == torch.float64 else 2e-6
    assert_close("out", out, want, rms_tol=tol)
    g = torch.randn_like(want)
    out.backward(g.to(dt))
    want.backward(g)
    assert_close("grad x", leaves[0].grad, ref_leaves[0].grad, rms_tol=tol)
    assert_close("grad gate_up", leaves[1].grad, _interleave(ref_leaves[1].grad, 1).transpose(1, 2), rms_tol=tol)
    assert_close("grad b13", leaves[2].grad, ref_leaves[2].grad, rms_tol=tol)
    assert_close("grad weights", leaves[3].grad, ref_leaves[3].grad, rms_tol=tol)
