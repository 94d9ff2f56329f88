"""Launch configs of the plan scan and the gating forward: functions of E and k only, the same for every token
count, with the warps that keep their tiles within the registers (``triton_compile_check.py`` proves the fit on
sm_80 and sm_90a; here: that the choice never moves with T). Launches are recorded on meta tensors, not run."""

import pytest
import torch

pytest.importorskip("triton")

import moe_kernels as mk  # noqa: E402
from moe_kernels.triton_kernels import _launch  # noqa: E402

TOKENS = (1, 16, 130, 4096)


def _config(rec):
    return {k: v for k, v in rec.kwargs.items() if k.startswith("BLOCK") or k == "num_warps"}


def _configs(name, drive):
    out = []
    for T in TOKENS:
        with _launch.record() as recs:
            drive(T)
        got = [_config(r) for r in recs if r.name == name]
        assert got, f"{name} was never launched at T={T}"
        out.append(got)
    return out


@pytest.mark.parametrize("E", [8, 60, 64, 256, 257])
def test_plan_scan_config_is_a_function_of_e_only(E):
    ids = lambda T: torch.empty(T, 4, dtype=torch.int32, device="meta")  # noqa: E731
    configs = _configs("plan_scan_kernel", lambda T: mk.plan_routing(ids(T), E, backend="triton"))
    assert all(c == configs[0] for c in configs), configs
    cfg = configs[0][0]
    assert cfg["num_warps"] == 8 and cfg["BLOCK_P"] * cfg["BLOCK_E"] <= 4096  # 16 counts a thread at most
    assert cfg["BLOCK_E"] > E


@pytest.mark.parametrize("E,k,groups,warps", [(8, 2, 1, 4), (60, 4, 1, 8), (64, 8, 1, 8), (128, 8, 1, 8),
                                              (256, 8, 8, 4), (512, 8, 1, 8), (1000, 8, 1, 4)])
def test_gating_config_is_a_function_of_e_k_and_groups_only(E, k, groups, warps):
    def drive(T):
        logits = torch.empty(T, E, dtype=torch.float32, device="meta")
        mk.topk_gating(logits, k, renormalize=True, num_groups=groups, topk_groups=min(groups, 2), return_stats=True,
                       backend="triton")

    configs = _configs("topk_gating_kernel", drive)
    assert all(c == configs[0] for c in configs), configs
    cfg = configs[0][0]
    assert cfg["num_warps"] == warps
    assert cfg["BLOCK_T"] * cfg["BLOCK_E"] // (32 * warps) <= 16 or warps == 4
