"""torch.compile with a dynamic token count: one graph for every T, forward and backward.

The Triton launchers are traced in a subprocess (``tests/dynamic_shapes_check.py``: compiled, not
interpreted, kernels on FakeTensors); the MoE layer on the torch backend runs here, for real."""

import os
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = {
    "gating": ["topk_gating", "expert_choice"],
    "routing": ["plan_routing", "permute", "slot_dots"],
    "gemm": ["grouped_gemm", "fused_moe", "lora_moe"],
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_triton_launchers_do_not_specialise_on_the_token_count(group):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(HERE, "dynamic_shapes_check.py"), *GROUPS[group]],
                         capture_output=True, text=True, env=env, timeout=900)
    report = "\n".join(line for line in out.stdout.splitlines() if not line.startswith(("E1", "W1", "I1")))
    assert out.returncode == 0 and " 0 failed" in out.stdout, report[-6000:] + out.stderr[-3000:]


@pytest.fixture
def strict_dynamo():
    torch._dynamo.reset()
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    yield
    torch._dynamo.config.error_on_recompile = saved
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(scoring="sigmoid", correction_bias=True, num_groups=4, topk_groups=2, aux_loss_coef=0.01, z_loss_coef=0.001,
         shared_intermediate_size=16),
    dict(scoring="sqrtsoftplus", num_groups=4, topk_groups=2, group_score="topk_sum", aux_loss_coef=0.01),
], ids=["softmax", "sigmoid+groups+losses", "sqrtsoftplus"])
def test_moe_torch_backend_one_graph_for_every_token_count(strict_dynamo, kwargs):
    H, I, E, k = 32, 24, 8, 2
    moe = mk.MoE(H, I, E, k, backend="torch", **kwargs)
    graphs = []
    aot = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot(gm, example_inputs)

    def step(x):
        y = moe(x)
        loss = y.square().mean()
        return loss + moe.aux_loss if moe.aux_loss is not None else loss

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    first = None
    for T in (5, 37, 300):
        x = torch.randn(T, H, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        moe.zero_grad()
        loss = compiled(x)
        loss.backward()
        want = step(x.detach().requires_grad_())
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        assert x.grad is not None and moe.router.weight.grad is not None and moe.w13.grad is not None
        first = len(graphs) if first is None else first
    # the first call may trace twice (run_stats' in-place counters are lifted on the first trace); no token
    # count after it may add a graph
    assert 1 <= first <= 2 and len(graphs) == first
