"""Expert-choice gating: every expert takes its C best tokens (Zhou et al., 2022).

One program per expert streams the expert's column of scores in chunks of ``BLOCK_C`` tokens and
keeps a running top-C: the running keys and the chunk's keys are joined, sorted (bitonic, in
registers) and the better half kept. Keys order (score descending, token ascending) in one int64,
as in the top-k kernel, so ties go to the lower token and NaN ranks last (below -inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import identity_launch
from .gating import NAN_MONO

MAX_CAPACITY = 2048  # the running top-C lives in registers
CAPACITY_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # BLOCK_C: the smallest bucket that holds C


def capacity_block(capacity) -> int:
    """``BLOCK_C`` of a capacity: an explicit bucket (comparisons, so a symbolic capacity under
    torch.compile gives one graph per bucket instead of being turned into a constant)."""
    for b in CAPACITY_BUCKETS:
        if capacity <= b:
            return b
    raise ValueError(f"expert_choice_gating: capacity {capacity} > {MAX_CAPACITY}")
KEY_NONE = tl.constexpr(-(2**63))  # constexpr: read by jit code


@triton.jit
def _token_key(v, tok):
    bits = (v + 0.0).to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    mono = tl.where(v != v, NAN_MONO, mono)  # NaN below -inf
    return (mono.to(tl.int64) << 32) | (0xFFFFFFFF - tok)


@triton.jit
def _score(logits_ptr, lse_ptr, tok, e, mask, stride_t, stride_e, SOFTMAX: tl.constexpr):
    x = tl.load(logits_ptr + tok * stride_t + e * stride_e, mask=mask, other=0.0).to(tl.float32)
    if SOFTMAX:
        lse = tl.load(lse_ptr + tok, mask=mask, other=0.0)
        s = tl.exp(x - lse)
        return tl.where(lse == float("inf"), float("nan"), s)  # a row with +inf is NaN, as softmax gives
    return tl.sigmoid(x)


@triton.jit
def expert_choice_kernel(
    logits_ptr, lse_ptr, weights_ptr, ids_ptr, T, stride_t, stride_e, capacity,
    SOFTMAX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    e = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    best = tl.full([BLOCK_C], KEY_NONE, tl.int64)
    for start in range(0, T, BLOCK_C):
        tok = start + c
        m = tok < T
        key = tl.where(m, _token_key(_score(logits_ptr, lse_ptr, tok, e, m, stride_t, stride_e, SOFTMAX), tok), KEY_NONE)
        merged = tl.sort(tl.reshape(tl.join(best, key), [2 * BLOCK_C]), descending=True)
        best, _ = tl.split(tl.trans(tl.reshape(merged, [2, BLOCK_C])))
    found = best != KEY_NONE
    tok = tl.where(found, 0xFFFFFFFF - (best & 0xFFFFFFFF), 0)
    w = tl.where(found, _score(logits_ptr, lse_ptr, tok, e, found, stride_t, stride_e, SOFTMAX), 0.0)
    out = e * capacity + c
    keep = c < capacity
    tl.store(weights_ptr + out, w, mask=keep)
    tl.store(ids_ptr + out, tl.where(found, tok, -1).to(tl.int32), mask=keep)


def supports(logits: torch.Tensor, capacity: int, *args, **kwargs) -> str | None:
    if logits.dtype == torch.float64:
        return "float64 inputs are served by the torch backend only"
    if capacity > MAX_CAPACITY:
        return f"capacity {capacity} > {MAX_CAPACITY} (the running top-C is kept in registers)"
    if logits.shape[0] >= 2**32:
        return "more than 2^32 tokens"
    return None


def expert_choice_gating(logits, capacity, scoring, *, launch=identity_launch, empty):
    """Launcher: ``logits [T, E]`` -> ``(weights [E, C] fp32, token_ids [E, C] int32)``."""
    T, E = logits.shape
    weights = empty((E, capacity), dtype=torch.float32, device=logits.device)
    ids = empty((E, capacity), dtype=torch.int32, device=logits.device)
    softmax = scoring == "softmax"
    lse = torch.logsumexp(logits.float(), -1) if softmax else logits  # [T] per-token softmax normaliser
    launch(expert_choice_kernel)[(E,)](
        logits, lse, weights, ids, T, logits.stride(0), logits.stride(1), capacity,
        SOFTMAX=softmax, BLOCK_C=capacity_block(capacity),
    )
    return weights, ids
