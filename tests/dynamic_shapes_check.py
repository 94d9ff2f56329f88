"""Trace every public op that has a Triton launcher under torch.compile with a dynamic token count.

Run without ``TRITON_INTERPRET``: the kernels are then ``JITFunction``s, as on a GPU, and
``wrap_triton`` inside the ``triton_op`` bodies records each launch in the graph instead of running it.
The inputs are FakeTensors, so nothing runs at all: forward and backward are only traced. Each case is
compiled with ``torch._dynamo.mark_dynamic`` on the token dim and called at several token counts with
``error_on_recompile``: a launcher that turns the symbolic token count into a constant (a block size
from ``next_pow2(T)``, a Python ``min`` on it, a branch on it) raises ``ConstraintViolationError`` or
recompiles.

The fake tensors are CPU tensors with the triton backend opened for them: fake CUDA tensors can be made
without a GPU, but views of them and autograd on them need a CUDA build of torch. The launchers do not
depend on the device type beyond the tile configs, and ``MOE_KERNELS_ASSUME_DEVICE`` picks those.

    python tests/dynamic_shapes_check.py [case-substring ...]

Prints one line per case and ``N passed, M failed`` at the end.
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import _backends  # noqa: E402

TOKEN_COUNTS = (5, 37, 300)  # different next_pow2, grids and programs per token count
H, I, E, K, R = 64, 96, 8, 2, 4

os.environ.setdefault("MOE_KERNELS_ASSUME_DEVICE", "sm_90")
# The triton backend on (fake) CPU tensors with compiled, not interpreted, kernels: only tracing happens.
_backends._triton_status = lambda: (True, "tracing only")
_backends.interpreter_mode = lambda: True
DEV = "cpu"

OPS = torch.ops.moe_kernels
MODE = FakeTensorMode()


def _ids(T, k=K, e=E):
    return torch.randint(0, e, (T, k), device=DEV, dtype=torch.int32)


def _w(T, k=K):
    return torch.rand(T, k, device=DEV)


def _plan(ids):
    return mk.plan_routing(ids, E, backend="triton")


def _weights():
    return dict(w13=torch.randn(E, 2 * I, H, device=DEV, dtype=torch.bfloat16),
                w2=torch.randn(E, H, I, device=DEV, dtype=torch.bfloat16))


# name -> (make(T) -> dict of tensors (the first one has the token dim 0), fn(**tensors))
CASES = {
    "topk_gating": (lambda T: dict(x=torch.randn(T, 60, device=DEV)),
                    lambda x: mk.topk_gating(x, 4, backend="triton")),
    "topk_gating grouped+bias+stats": (
        lambda T: dict(x=torch.randn(T, 64, device=DEV, dtype=torch.bfloat16), b=torch.randn(64, device=DEV)),
        lambda x, b: mk.topk_gating(x, 8, scoring="sigmoid", correction_bias=b, num_groups=8, topk_groups=4,
                                    return_stats=True, backend="triton")[:2]),
    "topk_gating_backward": (
        lambda T: dict(x=torch.randn(T, 60, device=DEV), g=torch.randn(T, 4, device=DEV),
                       ids=_ids(T, 4, 60), gs=torch.randn(60, device=DEV)),
        lambda x, g, ids, gs: OPS.topk_gating_backward_triton(g, gs, x, ids, "softmax", True, 1.0)),
    "expert_choice_gating": (lambda T: dict(x=torch.randn(T, E, device=DEV)),
                             lambda x: mk.expert_choice_gating(x, 24, backend="triton")),
    "expert_choice_gating capacity from T": (  # capacity T*k/E: one graph per BLOCK_C bucket
        lambda T: dict(x=torch.randn(T, E, device=DEV)),
        lambda x: mk.expert_choice_gating(x, x.shape[0] * K // E + 1, backend="triton")),
    "plan_routing": (lambda T: dict(ids=_ids(T)),
                     lambda ids: (lambda p: (p.sorted_slots, p.slot_to_row))(
                         mk.plan_routing(ids, E, block_size=16, backend="triton"))),
    "plan_routing capacity+map": (
        lambda T: dict(ids=_ids(T, K, 2 * E), m=torch.randint(-1, E, (2 * E,), device=DEV, dtype=torch.int32)),
        lambda ids, m: mk.plan_routing(ids, E, capacity=4, expert_map=m, backend="triton").sorted_slots),
    "plan_routing drop policies": (
        lambda T: dict(ids=_ids(T), w=_w(T)),
        lambda ids, w: [mk.plan_routing(ids, E, capacity=3, drop_policy=p, topk_weights=w, backend="triton").sorted_slots
                        for p in ("position", "probs")]),
    "permute+unpermute": (
        lambda T: dict(x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), w=_w(T)),
        lambda x, ids, w: (lambda p: mk.unpermute(mk.permute(x, p, backend="triton"), p, w, backend="triton"))(_plan(ids))),
    "slot_dots": (
        lambda T: dict(x=torch.randn(T, H, device=DEV), ids=_ids(T)),
        lambda x, ids: (lambda p: OPS.slot_dots_triton(mk.permute(x, p, backend="triton"), p.slot_to_row, x, K))(_plan(ids))),
    "grouped_gemm": (
        lambda T: dict(x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), **_weights()),
        lambda x, ids, w13, w2: (lambda p: mk.grouped_gemm(mk.permute(x, p, backend="triton"), w13, p, backend="triton"))(
            _plan(ids))),
    "grouped_gemm_wgrad": (
        lambda T: dict(x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T)),
        lambda x, ids: (lambda p: OPS.grouped_gemm_wgrad_triton(
            mk.permute(x, p, backend="triton"), mk.permute(x, p, backend="triton"), p.expert_offsets, p.sorted_slots))(
            _plan(ids))),
    "fused_moe": (
        lambda T: dict(x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), w=_w(T), **_weights()),
        lambda x, ids, w, w13, w2: mk.fused_moe(x, w13, w2, w, ids, backend="triton")),
    "fused_moe_backward": (
        lambda T: dict(g=torch.randn(T, H, device=DEV, dtype=torch.bfloat16),
                       x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), w=_w(T), **_weights()),
        lambda g, x, ids, w, w13, w2: OPS.fused_moe_backward_triton(g, x, w13, w2, w, ids, "silu", True, None, None,
                                                                    False, None, None, False, None)),
    "lora_moe": (
        lambda T: dict(x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), w=_w(T),
                       w0=torch.randn(I, H, device=DEV, dtype=torch.bfloat16),
                       a=torch.randn(E, R, H, device=DEV, dtype=torch.bfloat16),
                       b=torch.randn(E, I, R, device=DEV, dtype=torch.bfloat16)),
        lambda x, ids, w, w0, a, b: mk.lora_moe(x, w0, a, b, w, ids, backend="triton")),
    "fused_moe across row buckets": (
        lambda T: dict(x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), w=_w(T), **_weights()),
        lambda x, ids, w, w13, w2: mk.fused_moe(x, w13, w2, w, ids, backend="triton")),
    "lora_moe_backward": (
        lambda T: dict(g=torch.randn(T, I, device=DEV, dtype=torch.bfloat16),
                       x=torch.randn(T, H, device=DEV, dtype=torch.bfloat16), ids=_ids(T), w=_w(T),
                       w0=torch.randn(I, H, device=DEV, dtype=torch.bfloat16),
                       a=torch.randn(E, R, H, device=DEV, dtype=torch.bfloat16),
                       b=torch.randn(E, I, R, device=DEV, dtype=torch.bfloat16)),
        lambda g, x, ids, w, w0, a, b: OPS.lora_moe_backward_triton(g, x, w0, None, a, b, w, ids, 1.0,
                                                                    [True, False, False, True, True, True])),
}


# Explicit, documented buckets: (token counts, graphs). The grouped GEMM picks its tiles per bucket of rows
# per expert (<= 16, <= 32, <= 256, more: configs.default_config), expert choice its BLOCK_C per bucket
# of the capacity; within a bucket one graph serves every token count.
ONE_GEMM_BUCKET = ((5, 37, 60), 1)  # T*k/E = 1, 9, 15 rows per expert
BUCKETS = {
    "expert_choice_gating capacity from T": ((5, 37, 60), 1),  # capacity 2, 10, 16: BLOCK_C 16
    "grouped_gemm": ONE_GEMM_BUCKET, "grouped_gemm_wgrad": ONE_GEMM_BUCKET, "fused_moe": ONE_GEMM_BUCKET,
    "fused_moe_backward": ONE_GEMM_BUCKET, "lora_moe": ONE_GEMM_BUCKET, "lora_moe_backward": ONE_GEMM_BUCKET,
    "fused_moe across row buckets": ((5, 100, 2000), 3),  # 1, 25, 500 rows per expert: tiles of 16, 32, 128 rows
}

GRAD = {  # cases traced forward and backward: the inputs that get a gradient
    "topk_gating": ("x",), "topk_gating grouped+bias+stats": ("x",), "expert_choice_gating": ("x",),
    "permute+unpermute": ("x", "w"), "grouped_gemm": ("x", "w13"), "fused_moe": ("x", "w", "w13", "w2"),
    "lora_moe": ("x", "w", "a", "b"), "fused_moe across row buckets": ("x", "w"),
}


def _float_leaves(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]


def trace(name: str) -> str | None:
    """None when the case traces once for every token count, else the error."""
    make, fn = CASES[name]
    torch._dynamo.reset()
    graphs = []
    aot = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        run = aot(gm, example_inputs)

        def in_fake_mode(*args):  # the graph allocates: under the fake mode its outputs are fake too
            with MODE:
                return run(*args)

        return in_fake_mode

    compiled = torch.compile(lambda kw: fn(**kw), fullgraph=True, backend=backend)
    counts, expected = BUCKETS.get(name, (TOKEN_COUNTS, 1))
    torch._dynamo.config.error_on_recompile = expected == 1
    try:
        for T in counts:
            with MODE:
                args = make(T)
                for key in GRAD.get(name, ()):
                    args[key].requires_grad_(True)
            for t in args.values():
                if t.shape and t.shape[0] == T:
                    torch._dynamo.mark_dynamic(t, 0)
            out = compiled(args)
            leaves = _float_leaves(out)
            if GRAD.get(name):
                with MODE:
                    sum(o.float().sum() for o in leaves).backward()
                missing = [k for k in GRAD[name] if args[k].grad is None]
                if missing:
                    return f"T={T}: no gradient reached {missing}"
    except Exception as exc:  # noqa: BLE001 - reported per case
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return f"T={T}: {last[:1500]}"
    if len(graphs) != expected:
        return f"{len(graphs)} graphs for token counts {counts} (expected {expected})"
    return None


def main(argv: list[str]) -> int:
    torch._dynamo.config.error_on_recompile = True
    torch._dynamo.config.cache_size_limit = 64
    names = [n for n in CASES if not argv or any(a in n for a in argv)]
    failed = 0
    for name in names:
        err = trace(name)
        failed += err is not None
        print(f"{'FAIL' if err else 'ok  '} {name}" + (f"\n     {err}" if err else ""), flush=True)
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
