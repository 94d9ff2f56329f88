import json

import torch

from moe_kernels.triton_kernels import configs


def test_default_config_is_sane():
    for M, E in ((1, 8), (64, 8), (4096, 8), (65536, 256)):
        cfg = configs.default_config(M, 4096, 7168, E, torch.bfloat16)
        assert set(cfg) == set(configs.KEYS)
        assert all(v > 0 and (v & (v - 1)) == 0 for k, v in cfg.items() if k.startswith("BLOCK"))
    assert configs.default_config(8, 512, 512, 8, torch.bfloat16)["BLOCK_M"] == 16  # decode: small row tiles


def test_tuned_file_nearest_m(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    configs._load.cache_clear()
    path = configs.config_file("gemm", 8, 256, 128, torch.float16, "cpu")
    small = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    large = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    path.write_text(json.dumps({"16": small, "4096": large}))
    get = lambda M: configs.get_config("gemm", M, 256, 128, 8, torch.float16, torch.device("cpu"))  # noqa: E731
    assert get(1) == small and get(100) == small and get(3000) == large and get(10**6) == large
    other = configs.get_config("gemm", 16, 256, 128, 9, torch.float16, torch.device("cpu"))
    assert other == configs.default_config(16, 256, 128, 9, torch.float16)
    configs._load.cache_clear()
