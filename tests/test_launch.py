"""The one launch path (device guard, hooks, recorder), the architecture targets and the fit of every
config to its target; the value checks under CUDA-graph capture; the CUDA histogram's fallback."""

import types

import pytest
import torch

import moe_kernels as mk
from moe_kernels import _checks, _cuda
from moe_kernels.triton_kernels import _launch, configs

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----- targets and configs ---------------------------------------------------------------------------

def test_assumed_target_from_env(monkeypatch):
    for arch, t in _launch.TARGETS.items():
        monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", arch)
        assert _launch.target(torch.device("cpu")) == t
        assert _launch.target(torch.device("meta")) == t
    monkeypatch.delenv("MOE_KERNELS_ASSUME_DEVICE")
    assert _launch.target(torch.device("cpu")).arch == _launch.DEFAULT_ASSUMED
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_75")
    with pytest.raises(ValueError, match="MOE_KERNELS_ASSUME_DEVICE must be one of"):
        _launch.target(torch.device("cpu"))


def test_shared_memory_limits():
    t = _launch.TARGETS
    assert (t["sm_80"].smem_per_block, t["sm_86"].smem_per_block, t["sm_89"].smem_per_block) == (166_912, 101_376, 101_376)
    assert t["sm_90"].smem_per_block == 232_448 and t["sm_90"].has_wgmma and not t["sm_80"].has_wgmma


def test_decode_config_of_the_gated_gemm_fits_every_target(monkeypatch):
    """The decode config (16-row tiles, 128-long K tiles, 4 stages) needs 208,896 B: fitted on A100 and sm_89."""
    bf16 = torch.bfloat16
    raw = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    assert configs.smem_bytes(raw, bf16, gated=True) == 208_896
    for arch, t in _launch.TARGETS.items():
        monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", arch)
        cfg = configs.get_config("gemm_gated", 8, 2048, 7168, 8, bf16, torch.device("cpu"))
        assert configs.smem_bytes(cfg, bf16, gated=True) <= t.smem_per_block - configs.SMEM_RESERVE, arch
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_80")  # shorter K tiles first, the 4 stages kept
    assert configs.get_config("gemm_gated", 8, 2048, 7168, 8, bf16, torch.device("cpu")) == {**raw, "BLOCK_K": 64}
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_90")
    assert configs.get_config("gemm_gated", 8, 2048, 7168, 8, bf16, torch.device("cpu")) == raw  # fits as it is


@pytest.mark.parametrize("arch", list(_launch.TARGETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_config_fits_shared_memory_and_registers(arch, dtype):
    t = _launch.TARGETS[arch]
    for E in (1, 8, 257):
        for M in (1, 16, 100, 4096, 1 << 20):
            for N, K in ((16, 16), (1408, 2048), (14336, 4096), (2880, 2880), (111, 989)):
                for gated in (False, True):
                    cfg = configs.default_config(M, N, K, E, dtype, t, gated)
                    assert configs.smem_bytes(cfg, dtype, gated) <= t.smem_per_block - configs.SMEM_RESERVE
                    acc = (2 if gated else 1) * cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
                    assert acc <= configs.MAX_ACC_PER_THREAD


def test_tuned_entries_are_fitted_too(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_89")
    configs._load.cache_clear()
    big = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    configs.config_file("gemm_gated", 8, 256, 128, torch.float16, "cpu").write_text('{"16": %s}' % str(big).replace("'", '"'))
    cfg = configs.get_config("gemm_gated", 16, 256, 128, 8, torch.float16, torch.device("cpu"))
    assert configs.smem_bytes(cfg, torch.float16, True) <= _launch.TARGETS["sm_89"].smem_per_block
    configs._load.cache_clear()


# ----- the launch path ---------------------------------------------------------------------------------

def test_device_guard_logic(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda idx: entered.append(idx) or "guard")
    assert _launch.device_guard(torch.device("cuda", 1)) == "guard" and entered == [1]
    assert isinstance(_launch.device_guard(torch.device("cuda", 0)), type(_launch.contextlib.nullcontext()))
    assert isinstance(_launch.device_guard(torch.device("cpu")), type(_launch.contextlib.nullcontext()))
    assert isinstance(_launch.device_guard(torch.device("cuda", 1), fake=True), type(_launch.contextlib.nullcontext()))
    assert isinstance(_launch.device_guard(None), type(_launch.contextlib.nullcontext()))
    assert entered == [1]


class _Kernel:
    """Stands in for a jit kernel: records the launches that reach it."""

    __name__ = "fake_kernel"

    def __init__(self):
        self.runs = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.runs.append((grid, a, kw))


def test_launch_path_enters_the_tensors_device_then_launches(monkeypatch):
    seen = []
    real = _launch.device_guard
    monkeypatch.setattr(_launch, "device_guard", lambda dev, fake=False: seen.append(dev) or real(None))
    k = _Kernel()
    x = torch.zeros(3)
    _launch.DIRECT(k)[(2,)](x, 5, FLAG=True)
    assert seen == [x.device] and k.runs == [((2,), (x, 5), {"FLAG": True})]
    wrapped = []
    _launch.Launcher(lambda kern: wrapped.append(kern) or kern)(k)[(1,)](x)
    assert wrapped == [k] and len(k.runs) == 2


def test_recorder_swallows_launches_and_tags_them(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_ASSUME_DEVICE", "sm_80")
    k = _Kernel()
    x = torch.zeros(3)
    with _launch.record(op="probe") as recs:
        assert _launch.recording()
        _launch.DIRECT(k)[(4, 2)](x, 7, BLOCK=16, num_warps=4)
    assert not _launch.recording() and k.runs == []
    (r,) = recs
    assert r.kernel is k and r.grid == (4, 2) and r.args == (x, 7) and r.kwargs == {"BLOCK": 16, "num_warps": 4}
    assert r.target.arch == "sm_80" and r.tags == {"op": "probe"} and r.name == "fake_kernel"


def test_public_ops_on_meta_tensors_are_recorded_not_run():
    """What the compile check relies on: the real launchers driven through the public API, forward and backward."""
    if mk._triton.IMPORT_ERROR is not None:
        pytest.skip("triton missing")
    T, H, I, E, k = 5, 64, 32, 4, 2
    m = dict(device="meta")
    x = torch.empty(T, H, **m, requires_grad=True)
    w13 = torch.empty(E, 2 * I, H, **m, requires_grad=True)
    w2 = torch.empty(E, H, I, **m, requires_grad=True)
    w = torch.empty(T, k, **m, requires_grad=True)
    ids = torch.empty(T, k, dtype=torch.int32, **m)
    with _launch.record() as recs:
        mk.fused_moe(x, w13, w2, w, ids, backend="triton").sum().backward()
    names = {r.name for r in recs}
    assert {"plan_hist_kernel", "plan_rank_kernel", "grouped_gemm_kernel", "unpermute_kernel", "permute_kernel",
            "grouped_wgrad_kernel", "slot_dots_kernel"} <= names
    with pytest.raises(ValueError, match="meta"):  # outside a recording meta tensors are refused
        mk.fused_moe(x, w13, w2, w, ids, backend="triton")


def test_launch_on_the_second_gpu_from_the_first():
    x, w13, w2 = torch.randn(9, 64), torch.randn(4, 64, 64) / 8, torch.randn(4, 64, 32) / 6
    w, ids = torch.rand(9, 2), torch.randint(0, 4, (9, 2), dtype=torch.int32)
    if torch.cuda.device_count() < 2 or not mk.backends()["triton"].available:
        pytest.skip("needs 2 GPUs and triton")
    ref = mk.fused_moe(*(t.to("cuda:0") for t in (x, w13, w2, w, ids)), backend="triton")
    torch.cuda.set_device(0)
    s = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(s):
        out = mk.fused_moe(*(t.to("cuda:1") for t in (x, w13, w2, w, ids)), backend="triton")
    s.synchronize()
    assert torch.cuda.current_device() == 0 and out.device == torch.device("cuda", 1)
    assert torch.equal(out.cpu(), ref.cpu())


# ----- value checks under capture; the histogram's fallback --------------------------------------------

def test_value_checks_skip_while_capturing(monkeypatch):
    t = types.SimpleNamespace(device=torch.device("cuda", 0))  # only the device is read
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _checks.value_checks_enabled(t)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _checks.value_checks_enabled(t)
    assert _checks.value_checks_enabled(torch.zeros(1))  # CPU checks are free, capture or not


@pytest.mark.parametrize("where", ["capture"])
def test_value_checks_inside_a_cuda_graph(where, monkeypatch):
    ids = torch.randint(0, 8, (16, 2), dtype=torch.int32)
    if DEV != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")
    ids = ids.cuda()
    mk.plan_routing(ids, 8)  # warm up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan = mk.plan_routing(ids, 8)
    g.replay()
    torch.cuda.synchronize()
    assert int(plan.tokens_per_expert.sum()) == 32


def test_expert_counts_cuda_refuses_more_experts_than_its_histogram_holds():
    ids = torch.randint(0, 20000, (8, 2), dtype=torch.int32)
    assert _cuda._counts_supports(ids, _cuda.MAX_COUNT_EXPERTS) is None
    assert "E <= 12288" in _cuda._counts_supports(ids, _cuda.MAX_COUNT_EXPERTS + 1)
    expected = torch.bincount(ids.flatten().long(), minlength=20000).to(torch.int32)
    assert torch.equal(mk.expert_counts(ids, 20000), expected)
    if DEV == "cuda":  # auto falls back to another backend instead of raising
        assert torch.equal(mk.expert_counts(ids.cuda(), 20000).cpu(), expected)
