"""Routing API additions: weights in row order, and the 64-bit addressing test on a large GPU."""

import pytest
import torch

import moe_kernels as mk


def test_permute_returns_row_weights():
    ids = torch.tensor([[1, 0], [1, -1], [0, 1]])
    w = torch.rand(3, 2, requires_grad=True)
    plan = mk.plan_routing(ids, 2, block_size=2)
    x = torch.randn(3, 4)
    xs, rw = mk.permute(x, plan, topk_weights=w)
    assert torch.equal(xs, mk.permute(x, plan))
    slots = plan.sorted_slots
    for r in range(slots.shape[0]):
        s = int(slots[r])
        assert rw[r].item() == (w.view(-1)[s].item() if s >= 0 else 0.0)
    rw.sum().backward()
    assert torch.equal(w.grad, (ids >= 0).float())


def _big_gpu():
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 40 * 2**30


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_permute_unpermute_past_2_31_elements(backend):
    T, k, E, H = 2**17 + 3, 2, 8, 8192 + 64  # T*k*H > 2^31 elements in the permuted rows
    ids = torch.randint(0, E, (T, k))
    assert T * k * H > 2**31
    if not _big_gpu():  # the ids are built on CPU too; the 4 GB of rows only on a big GPU
        pytest.skip("needs a GPU with >= 40 GB")
    if not mk.backends()[backend].available:
        pytest.skip(mk.backends()[backend].reason)
    ids = ids.cuda()
    plan = mk.plan_routing(ids, E, backend=backend)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    xs = mk.permute(x, plan, backend=backend)
    assert xs.numel() > 2**31
    last = plan.sorted_slots[-1].long()
    assert torch.equal(xs[-1], x[last // k])
    y = mk.unpermute(xs, plan, backend=backend)  # unweighted sum of k copies of each token
    torch.testing.assert_close(y[-5:].float(), (x[-5:].float() * k), rtol=1e-2, atol=1e-2)
    del xs, y
    torch.cuda.empty_cache()
