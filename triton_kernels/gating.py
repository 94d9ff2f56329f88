"""Fused top-k gating in one pass over the logits: scores, bias, group-limited selection, top-k,
renormalisation and scaling; and its backward.

Block sizes depend on E and k only (``_blocks``): never on the token count, so torch.compile traces
one graph for every T and a token's results are bitwise independent of the batch it comes in.

Selection keys: a score ``v`` is turned into an int64 whose order is the order of (``v`` descending,
column ascending): the fp32 bits mapped to a monotone int32 in the high word, ``BLOCK_E-1-col`` in
the low word. Every key in a row is unique, so one ``max`` finds the best expert and ties go to the
lower index, exactly as the reference. NaN ranks below every number, -inf included (a group's score
counts NaN as -inf); columns past E and experts outside the chosen groups get keys below every real one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import identity_launch, next_pow2

# Globals read by jit code must be constexpr for the compiler (the interpreter would take plain ints).
KEY_TAKEN = tl.constexpr(-(2**63))  # padding columns and experts already chosen
KEY_EXCLUDED = tl.constexpr(-(2**63) + 1)  # experts of groups that were not chosen
NAN_MONO = tl.constexpr(-(2**31) + 1)  # high word of a NaN score: below -inf, above the two keys above


@triton.jit
def _select_key(v, col, BLOCK: tl.constexpr):
    bits = (v + 0.0).to(tl.int32, bitcast=True)  # -0.0 -> +0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32 order == float order
    mono = tl.where(v != v, NAN_MONO, mono)  # NaN below -inf
    return (mono.to(tl.int64) << 32) | (BLOCK - 1 - col).to(tl.int64)


FLT_MAX = tl.constexpr(3.4028234663852886e38)  # +-inf logits are clamped to it for sigmoid / sqrtsoftplus
SOFTMAX, SIGMOID, SQRTSOFTPLUS = 0, 1, 2  # SCORING
SCORING_CODES = {"softmax": SOFTMAX, "sigmoid": SIGMOID, "sqrtsoftplus": SQRTSOFTPLUS}


@triton.jit
def _safe_softmax(x, valid):
    """Row softmax of fp32 ``x [R, C]`` over the ``valid`` entries under the non-finite rule: NaN weighs 0
    and is left out of the normaliser; +inf entries share the row's mass equally; a row without a
    finite or +inf entry is 0. Never 0/0. Also returns whether the row had a +inf (gradient 0 there)."""
    xs = tl.where(valid & (x == x), x, float("-inf"))
    m = tl.max(xs, 1)
    pinf = m == float("inf")
    shift = tl.where((m > float("-inf")) & ~pinf, m, 0.0)
    z = tl.where(pinf[:, None], tl.where(xs == float("inf"), 0.0, float("-inf")), xs - shift[:, None])
    e = tl.exp(z)
    d = tl.sum(e, 1)
    return e / tl.where(d > 0, d, 1.0)[:, None], pinf


@triton.jit
def _log1p(y):
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))  # log1p to full precision from log


@triton.jit
def _scores(logits_ptr, rows, cols, T, E, stride_t, stride_e, SCORING: tl.constexpr):
    """``(x, s, flat)``: fp32 logits [BLOCK_T, BLOCK_E] (NaN past E), finite scores (0 past E and for NaN
    logits) and, for softmax, the rows whose scores are constant (a +inf logit)."""
    rmask, cmask = rows < T, cols < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :].to(tl.int64) * stride_e
    x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, float("nan"))
    if SCORING == 0:
        s, flat = _safe_softmax(x, cmask[None, :])
    else:
        flat = rows < 0  # all False
        xc = tl.where(x > FLT_MAX, FLT_MAX, tl.where(x < -FLT_MAX, -FLT_MAX, x))
        if SCORING == 1:
            s = tl.sigmoid(xc)
        else:  # sqrt(softplus(x)), softplus(x) = x above 20 (torch's threshold)
            s = tl.sqrt(tl.where(xc > 20.0, xc, _log1p(tl.exp(tl.minimum(xc, 20.0)))))
        s = tl.where(x == x, s, 0.0)
    return x, s, flat


@triton.jit
def topk_gating_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, counts_part_ptr, sums_part_ptr,
    T, E, stride_t, stride_e, top_k, num_groups, topk_groups, group_size, group_n, scaling,
    HAS_BIAS: tl.constexpr, SCORING: tl.constexpr, RENORM: tl.constexpr, GROUPED: tl.constexpr,
    WITH_STATS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    x, s, unused_flat = _scores(logits_ptr, rows, cols, T, E, stride_t, stride_e, SCORING)  # [BT, BE] fp32
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sel = tl.where(x == x, sel, float("nan"))  # a NaN logit ranks last whatever its bias
    key = tl.where(cmask[None, :], _select_key(sel, cols[None, :], BLOCK_E), KEY_TAKEN)  # [BT, BE] int64

    if GROUPED:
        clean = tl.where(cmask[None, :] & (sel == sel), sel, float("-inf"))
        gcol = cols // group_size
        gidx = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in range(num_groups):  # group score: the sum of the group's group_n best selection scores
            gk = tl.where((gcol == g)[None, :] & cmask[None, :], key, KEY_TAKEN)
            total = tl.zeros([BLOCK_T], tl.float32)
            for _ in range(group_n):
                hit = gk == tl.max(gk, 1)[:, None]
                total += tl.sum(tl.where(hit, clean, 0.0), 1)
                gk = tl.where(hit, KEY_TAKEN, gk)
            gscore = tl.where(gidx[None, :] == g, total[:, None], gscore)
        gkey = tl.where((gidx < num_groups)[None, :], _select_key(gscore, gidx[None, :], BLOCK_G), KEY_TAKEN)
        chosen = tl.zeros([BLOCK_T, BLOCK_G], tl.int32) != 0  # all False; full shape: it is loop-carried
        for _ in range(topk_groups):
            hit = gkey == tl.max(gkey, 1)[:, None]
            chosen = chosen | hit
            gkey = tl.where(hit, KEY_TAKEN, gkey)
        allowed = tl.zeros([BLOCK_T, BLOCK_E], tl.int32) != 0
        for g in range(num_groups):
            g_on = tl.sum(tl.where(chosen & (gidx[None, :] == g), 1, 0), 1) > 0
            allowed = allowed | ((gcol == g)[None, :] & g_on[:, None])
        key = tl.where(allowed | ~cmask[None, :], key, KEY_EXCLUDED)

    kcol = tl.arange(0, BLOCK_K)
    w_out = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    x_out = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)  # selected logits (softmax renormalisation)
    id_out = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for j in range(top_k):
        best = tl.max(key, 1)
        hit = key == best[:, None]
        w_j = tl.sum(tl.where(hit, s, 0.0), 1)
        x_j = tl.sum(tl.where(hit, x, 0.0), 1)
        id_j = (BLOCK_E - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
        w_out = tl.where(kcol[None, :] == j, w_j[:, None], w_out)
        x_out = tl.where(kcol[None, :] == j, x_j[:, None], x_out)
        id_out = tl.where(kcol[None, :] == j, id_j[:, None], id_out)
        key = tl.where(hit, KEY_TAKEN, key)
    if WITH_STATS:
        # Chosen experts are exactly the columns whose key is now KEY_TAKEN. Per-program partials,
        # reduced by the launcher in a fixed order: no float atomics, the same bits on every run.
        rmask = (rows < T)[:, None]
        chosen = (key == KEY_TAKEN) & cmask[None, :] & rmask
        q = s
        if SCORING != 0:
            q = s / (tl.sum(s, 1)[:, None] + 1e-20)
        part = tl.program_id(0).to(tl.int64) * E + cols
        tl.store(counts_part_ptr + part, tl.sum(chosen.to(tl.int32), 0), mask=cmask)
        tl.store(sums_part_ptr + part, tl.sum(tl.where(rmask, q, 0.0), 0), mask=cmask)
    if RENORM:
        if SCORING == 0:  # the softmax of the selected logits: never 0/0
            w_out, unused_pinf = _safe_softmax(x_out, (kcol < top_k)[None, :])
        else:
            w_out = w_out / (tl.sum(w_out, 1) + 1e-20)[:, None]
    w_out = w_out * scaling
    out_off = rows[:, None] * top_k + kcol[None, :]
    out_mask = (rows < T)[:, None] & (kcol < top_k)[None, :]
    tl.store(weights_ptr + out_off, w_out, mask=out_mask)
    tl.store(ids_ptr + out_off, id_out, mask=out_mask)


@triton.jit
def topk_gating_backward_kernel(
    grad_w_ptr, grad_sums_ptr, logits_ptr, ids_ptr, grad_logits_ptr,
    T, E, stride_t, stride_e, top_k, scaling,
    SCORING: tl.constexpr, RENORM: tl.constexpr, HAS_GRAD_SUMS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcol = tl.arange(0, BLOCK_K)
    rmask, cmask = rows < T, cols < E
    x, s, flat = _scores(logits_ptr, rows, cols, T, E, stride_t, stride_e, SCORING)  # [BT, BE]
    kvalid = (kcol < top_k)[None, :]
    kmask = rmask[:, None] & kvalid
    koff = rows[:, None] * top_k + kcol[None, :]
    dw = tl.load(grad_w_ptr + koff, mask=kmask, other=0.0).to(tl.float32) * scaling  # [BT, BK]
    ids = tl.load(ids_ptr + koff, mask=kmask, other=-1)
    # g[t, j] = s[t, ids[t, j]] (unnormalised weights), xk[t, j] = x[t, ids[t, j]] (selected logits)
    g = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    xk = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for j in range(top_k):
        id_j = tl.sum(tl.where(kcol[None, :] == j, ids, 0), 1)
        at = cols[None, :] == id_j[:, None]
        g = tl.where(kcol[None, :] == j, tl.sum(tl.where(at, s, 0.0), 1)[:, None], g)
        xk = tl.where(kcol[None, :] == j, tl.sum(tl.where(at, x, 0.0), 1)[:, None], xk)
    dx = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)  # gradient reaching the logits directly
    if RENORM and SCORING == 0:  # w = softmax(x[ids]): the backward of that softmax, 0 where it is flat
        w, wflat = _safe_softmax(xk, kvalid)
        dg = tl.where(wflat[:, None], 0.0, w * (dw - tl.sum(dw * w, 1)[:, None]))
    elif RENORM:  # w = g / (sum g + eps); written with w so that a weight of exactly 1 gets exactly 0
        denom = tl.sum(g, 1) + 1e-20
        dg = (dw - tl.sum(dw * (g / denom[:, None]), 1)[:, None]) / denom[:, None]
    else:
        dg = dw
    ds = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)  # gradient reaching the scores
    for j in range(top_k):
        id_j = tl.sum(tl.where(kcol[None, :] == j, ids, 0), 1)
        dg_j = tl.sum(tl.where(kcol[None, :] == j, dg, 0.0), 1)
        if RENORM and SCORING == 0:
            dx = tl.where(cols[None, :] == id_j[:, None], dx + dg_j[:, None], dx)
        else:
            ds = tl.where(cols[None, :] == id_j[:, None], ds + dg_j[:, None], ds)
    if HAS_GRAD_SUMS:  # score_sums = sum_t q[t]: q = s (softmax) or s / (sum s + 1e-20) (otherwise)
        dq = tl.load(grad_sums_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SCORING == 0:
            ds = ds + dq
        else:
            z = tl.sum(s, 1)[:, None] + 1e-20
            ds = ds + dq / z - tl.sum(dq * s, 1)[:, None] / (z * z)
    if SCORING == 0:
        dx += tl.where(flat[:, None], 0.0, s * (ds - tl.sum(ds * s, 1)[:, None]))
    elif SCORING == 1:
        dx += ds * s * (1.0 - s)
    else:  # d sqrt(softplus(x)) / dx = sigmoid(x) / (2 sqrt(softplus(x))); 0 at non-finite logits
        ok = (s > 0) & (x == x) & (x < float("inf")) & (x > float("-inf"))
        dx += tl.where(ok, ds * tl.sigmoid(x) / (2.0 * tl.where(ok, s, 1.0)), 0.0)
    out = grad_logits_ptr + rows[:, None] * E + cols[None, :]
    tl.store(out, dx.to(grad_logits_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _blocks(E: int, k: int, budget: int = 4096):
    """``(BLOCK_T, BLOCK_E, BLOCK_K)``: a function of E and k only, never of the token count. So one
    compiled kernel serves every T (torch.compile with a dynamic token count traces it once), and the
    tile layout, hence the order of every per-row reduction (softmax, renormalisation, statistics,
    backward), is the same whatever batch a token comes in: results are bitwise batch-invariant."""
    block_e = max(next_pow2(E), 16)
    block_t = max(1, min(128, budget // block_e))
    return block_t, block_e, max(next_pow2(k), 2)


def _warps(block_t: int, block_e: int) -> int:
    """Warps of the forward kernel: 16 elements a thread at the 4096-element tile. It holds the logits, scores and
    int64 keys of the tile through the top-k loop; 32 a thread spilled on sm_80 and sm_90a at E = 60, k = 4 with
    renormalisation and statistics. The extra warps extend the rows a program covers, never the columns (up to
    512 columns 4 warps span a row): every per-row reduction keeps the order it has with 4 warps."""
    return 8 if block_t * block_e >= 4096 and block_e <= 512 else 4


def topk_gating(logits, bias, top_k, scoring, renormalize, num_groups, topk_groups, scaling_factor, with_stats,
                group_n=1, *, launch=identity_launch, empty):
    """Launcher: ``logits [T, E]`` -> ``(weights [T, k] fp32, ids [T, k] int32, counts, score_sums)``;
    the statistics are ``[E]`` (int32, fp32) with ``with_stats``, else empty. ``group_n``: how many best
    scores a group's score sums. Arguments already checked."""
    T, E = logits.shape
    dev = logits.device
    weights = empty((T, top_k), dtype=torch.float32, device=dev)
    ids = empty((T, top_k), dtype=torch.int32, device=dev)
    # group-limited selection holds the group scores too: half the rows a program (no spills on sm_80 at E=256)
    block_t, block_e, block_k = _blocks(E, top_k, 2048 if num_groups > 1 else 4096)
    grid = triton.cdiv(T, block_t)
    # Partials: one row per program plus a zero row, so their count is never 1 (torch.compile would
    # otherwise specialise on it: one graph for T <= BLOCK_T, another for the rest).
    n_part = grid + 1 if with_stats else 0
    counts_part = torch.zeros((n_part, E), dtype=torch.int32, device=dev)
    sums_part = torch.zeros((n_part, E), dtype=torch.float32, device=dev)
    if T > 0:
        launch(topk_gating_kernel)[(grid,)](
            logits, bias if bias is not None else logits, weights, ids, counts_part, sums_part,
            T, E, logits.stride(0), logits.stride(1), top_k, num_groups, topk_groups, E // num_groups, group_n,
            scaling_factor, HAS_BIAS=bias is not None, SCORING=SCORING_CODES[scoring], RENORM=renormalize,
            GROUPED=num_groups > 1, WITH_STATS=with_stats,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_G=max(next_pow2(num_groups), 2),
            num_warps=_warps(block_t, block_e),
        )
    if not with_stats:
        return weights, ids, ids.new_empty(0), weights.new_empty(0)
    return weights, ids, counts_part.sum(0, dtype=torch.int32), sums_part.sum(0)


def topk_gating_backward(grad_weights, grad_score_sums, logits, topk_ids, scoring, renormalize, scaling_factor,
                         *, launch=identity_launch, empty):
    """Launcher: d loss / d logits ``[T, E]`` (dtype of logits) from d loss / d weights ``[T, k]`` and,
    optionally, d loss / d score_sums ``[E]``."""
    T, E = logits.shape
    k = topk_ids.shape[1]
    grad_logits = empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return grad_logits
    block_t, block_e, block_k = _blocks(E, k)
    has_sums = grad_score_sums is not None
    launch(topk_gating_backward_kernel)[(triton.cdiv(T, block_t),)](
        grad_weights.contiguous(), grad_score_sums.contiguous() if has_sums else grad_weights, logits,
        topk_ids.contiguous(), grad_logits, T, E, logits.stride(0), logits.stride(1), k, scaling_factor,
        SCORING=SCORING_CODES[scoring], RENORM=renormalize, HAS_GRAD_SUMS=has_sums,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
    )
    return grad_logits
