"""Weight-only integer and microscaling formats of :class:`~moe_kernels.quant.QuantizedWeight`: ``int8`` (w8a16),
``int4`` (w4a16, GPTQ/AWQ-style in vLLM's ``use_int4_w4a16`` layout) and ``mxfp4`` (OCP MX, gpt-oss).

Layouts of a dense per-expert weight ``[E, N, K]`` (nn.Linear layout), bit for bit:

====== ================================= ======================================== ==============================
fmt    data                              scale                                    value ``w[e, n, k]``
====== ================================= ======================================== ==============================
int8   ``[E, N, K]`` int8                fp32 ``[E, N]`` (per channel) or         ``q * s``
                                         ``[E, N, K/g]`` (``group_size`` g)
int4   ``[E, N, K/2]`` uint8: element k  fp32 ``[E, N, K/g]``; optional zero       ``(q - z) * s``, or
       in byte k//2, low nibble (bits    points ``zero [E, N/2, K/g]`` uint8,     ``(q - 8) * s`` without
       0-3) for even k                   packed the same way along N              zero points
mxfp4  ``[E, N, K/2]`` uint8 of e2m1     ``[E, N, K/32]`` uint8 e8m0:             ``fp4(q) * 2^(s - 127)``
       pairs, low nibble for even k      ``2 ** (s - 127)`` (255 is NaN)
====== ================================= ======================================== ==============================

e2m1 (bits ``s e e m``, sign in bit 3): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0-7. gpt-oss checkpoints
hold mxfp4 as ``*_blocks [E, N, K/32, 16]`` and ``*_scales [E, N, K/32]``: the same bytes (see :func:`from_mx_blocks`).

Groups never straddle K: ``g`` must divide K (partial groups are refused). ``quantize`` rounds to nearest even:
int8 ``s = max(amax, 1e-10) / 127``, ``q = clamp(round(w / s), -127, 127)``; int4 symmetric ``s = max(amax,
1e-10) / 7``, ``q = clamp(round(w / s), -8, 7) + 8``; int4 with zero points (asymmetric, per group)
``s = max(max - min, 1e-10) / 15``, ``z = clamp(round(-min / s), 0, 15)``, ``q = clamp(round(w / s) + z, 0, 15)``;
mxfp4 ``s = 2^ceil(log2(amax / 6))`` (so no element saturates) and each ``w / s`` to the nearest e2m1 value.
"""

from __future__ import annotations

import torch

INT_FORMATS = ("int8", "int4", "mxfp4")
PACKED = ("int4", "mxfp4")  # two elements per byte along K
INT4_GROUPS = (16, 32, 64, 128, 256)
MX_GROUP = 32
AMAX_FLOOR = 1e-10
# e2m1 codes 0-15 (bit 3 is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _desc(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{_name(t.dtype)} of shape {list(t.shape)}"


def dense_shape(fmt: str, data: torch.Tensor) -> tuple[int, int, int]:
    E, N, Kd = data.shape
    return (E, N, 2 * Kd if fmt in PACKED else Kd)


def validate(qw) -> None:
    """The checks of ``QuantizedWeight.__post_init__`` for the formats of this module (ValueError naming the field);
    sets ``shape`` and ``group_size``."""
    fn, fmt = "QuantizedWeight", qw.fmt
    data, scale, zero, g = qw.data, qw.scale, qw.zero, qw.group_size
    want = torch.int8 if fmt == "int8" else torch.uint8
    if not isinstance(data, torch.Tensor) or data.dtype != want or data.dim() != 3:
        kd = "K" if fmt == "int8" else "K/2"
        raise ValueError(f"{fn}: data of fmt={fmt!r} must be a 3-D [E, N, {kd}] {_name(want)} tensor, got {_desc(data)}")
    E, N, K = dense_shape(fmt, data)
    if qw.shape is not None and tuple(int(s) for s in qw.shape) != (E, N, K):
        raise ValueError(f"{fn}: shape {tuple(qw.shape)} does not match data {_desc(data)} of fmt={fmt!r} "
                         f"(dense {[E, N, K]})")
    if qw.block_shape is not None:
        raise ValueError(f"{fn}: fmt={fmt!r} takes group_size, not block_shape (got {qw.block_shape!r})")
    if fmt == "mxfp4":
        if g is not None and g != MX_GROUP:
            raise ValueError(f"{fn}: mxfp4 groups are {MX_GROUP} elements of K, got group_size={g!r}")
        g = MX_GROUP
    elif fmt == "int4" and g is None:
        raise ValueError(f"{fn}: int4 needs group_size (one of {INT4_GROUPS}), got None")
    if g is not None:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"{fn}: group_size must be a positive int, got {g!r}")
        if fmt == "int4" and g not in INT4_GROUPS:
            raise ValueError(f"{fn}: int4 group_size must be one of {INT4_GROUPS}, got {g}")
        if K % g:
            raise ValueError(f"{fn}: group_size={g} must divide K={K} (partial groups are not supported)")
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"{fn}: scale must be a torch.Tensor, got {type(scale).__name__}")
    s_dtype = torch.uint8 if fmt == "mxfp4" else torch.float32
    want_s = (E, N) if g is None else (E, N, K // g if g else 0)
    if scale.dtype != s_dtype or tuple(scale.shape) != want_s:
        what = "e8m0 exponents" if fmt == "mxfp4" else "fp32 inverse scales"
        raise ValueError(f"{fn}: scale of fmt={fmt!r} must be {_name(s_dtype)} {what} of shape {list(want_s)}"
                         f"{' ([E, N, K/group_size])' if g else ' ([E, N], per channel)'}, got {_desc(scale)}")
    if scale.device != data.device:
        raise ValueError(f"{fn}: scale is on {scale.device} but data on {data.device}")
    if zero is not None:
        if fmt != "int4":
            raise ValueError(f"{fn}: zero points are for int4 only, fmt={fmt!r} is symmetric")
        if N % 2:
            raise ValueError(f"{fn}: int4 zero points pack two rows per byte, so N must be even, got N={N}")
        want_z = (E, N // 2, K // g)
        if not isinstance(zero, torch.Tensor) or zero.dtype != torch.uint8 or tuple(zero.shape) != want_z:
            raise ValueError(f"{fn}: zero must be uint8 [E, N/2, K/group_size] = {list(want_z)} (two 4-bit zero "
                             f"points per byte along N), got {_desc(zero)}")
        if zero.device != data.device:
            raise ValueError(f"{fn}: zero is on {zero.device} but data on {data.device}")
    object.__setattr__(qw, "shape", (E, N, K))
    object.__setattr__(qw, "group_size", g)


# ----- packing ---------------------------------------------------------------------------------------


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` uint8 -> ``[..., 2n]`` uint8 codes 0-15: element 2i is the low nibble of byte i."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_nibbles` along the last dimension (even length)."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def e8m0_to_float(s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``2 ** (s - 127)`` exactly (fp32 subnormals for s < 1), NaN for 255."""
    v = torch.exp2(s.to(torch.float64) - 127.0)
    return torch.where(s == 255, float("nan"), v).to(dtype)


def fp4_to_float(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=dtype, device=codes.device)[codes.long()]


# ----- dequantize / quantize ---------------------------------------------------------------------------


def dequantize_raw(fmt: str, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[E, N, K]`` of raw tensors of ``fmt`` (``group_size`` 0: per channel), computed in ``dtype``
    (fp32 or fp64: every value and scale is exact there, so only the product rounds)."""
    E, N, K = dense_shape(fmt, data)
    g = group_size or max(K, 1)
    if fmt == "int8":
        q = data.to(dtype)
    elif fmt == "int4":
        q = unpack_nibbles(data).to(dtype)
        z = unpack_nibbles(zero.transpose(1, 2)).transpose(1, 2).to(dtype) if zero is not None else 8.0  # [E, N, K/g]
        q = (q.view(E, N, K // g, g) - (z.unsqueeze(-1) if zero is not None else z)).view(E, N, K)
    else:
        q = fp4_to_float(unpack_nibbles(data), dtype)
    s = e8m0_to_float(scale, dtype) if fmt == "mxfp4" else scale.to(dtype)
    s = s.view(E, N, -1)
    return (q.view(E, N, -1, g) * s.unsqueeze(-1)).view(E, N, K)


def _rne(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # torch.round rounds half to even


def quantize_int(w: torch.Tensor, fmt: str, group_size: int | None, zero_point: bool):
    """``(data, scale, zero, group_size)`` of a dense fp ``w [E, N, K]`` (see the module docstring)."""
    fn = "quantize"
    E, N, K = w.shape
    if fmt == "mxfp4":
        if group_size not in (None, MX_GROUP):
            raise ValueError(f"{fn}: mxfp4 groups are {MX_GROUP} elements of K, got group_size={group_size!r}")
        group_size = MX_GROUP
    if fmt == "int4" and group_size is None:
        group_size = 128 if K % 128 == 0 else 64 if K % 64 == 0 else 32
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{fn}: group_size must be a positive int, got {group_size!r}")
        if fmt == "int4" and group_size not in INT4_GROUPS:
            raise ValueError(f"{fn}: int4 group_size must be one of {INT4_GROUPS}, got {group_size}")
        if K % group_size:
            raise ValueError(f"{fn}: group_size={group_size} must divide K={K} (partial groups are not supported)")
    if zero_point and fmt != "int4":
        raise ValueError(f"{fn}: zero_point is for int4 only, fmt={fmt!r} is symmetric")
    if zero_point and N % 2:
        raise ValueError(f"{fn}: int4 zero points pack two rows per byte, so N must be even, got N={N}")
    g = group_size or max(K, 1)
    wf = w.detach().to(torch.float32).view(E, N, K // g if K else 0, g)  # [E, N, G, g]
    amax = wf.abs().amax(dim=-1) if K else wf.new_zeros(E, N, 0)
    if fmt == "int8":
        s = amax.clamp(min=AMAX_FLOOR) / 127.0
        q = _rne(wf / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        scale = s if group_size else s.view(E, N) if K else wf.new_full((E, N), AMAX_FLOOR / 127.0)
        return q.view(E, N, K).contiguous(), scale.contiguous(), None, group_size
    if fmt == "int4":
        if zero_point:
            lo = wf.amin(dim=-1).clamp(max=0.0)
            hi = wf.amax(dim=-1).clamp(min=0.0)
            s = (hi - lo).clamp(min=AMAX_FLOOR) / 15.0
            z = _rne(-lo / s).clamp(0, 15)
            q = (_rne(wf / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15)
            zero = pack_nibbles(z.to(torch.uint8).transpose(1, 2)).transpose(1, 2).contiguous()  # [E, N/2, G]
        else:
            s = amax.clamp(min=AMAX_FLOOR) / 7.0
            q = _rne(wf / s.unsqueeze(-1)).clamp(-8, 7) + 8
            zero = None
        data = pack_nibbles(q.to(torch.uint8).view(E, N, K))
        return data.contiguous(), s.contiguous(), zero, group_size
    # mxfp4: the smallest power-of-two scale with amax / s <= 6
    e = torch.ceil(torch.log2(amax.clamp(min=2.0 ** -127) / 6.0)).clamp(-127, 127)
    s = torch.exp2(e)
    e = torch.where(amax == 0, torch.full_like(e, -127.0), e)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    r = (wf / s.unsqueeze(-1)).clamp(-6.0, 6.0)
    # nearest e2m1 code, ties to the even code (the one with mantissa 0)
    mags = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    d = (r.abs().unsqueeze(-1) - mags).abs()  # [..., 8]
    best = d.min(dim=-1, keepdim=True).values
    cand = (d == best)
    even = cand & (torch.arange(8, device=w.device) % 2 == 0)
    code = torch.where(even.any(dim=-1), even.to(torch.int8).argmax(dim=-1), cand.to(torch.int8).argmax(dim=-1))
    code = code.to(torch.uint8) | ((r < 0).to(torch.uint8) << 3)
    data = pack_nibbles(code.view(E, N, K))
    scale = (e + 127).to(torch.uint8)
    return data.contiguous(), scale.contiguous(), None, MX_GROUP


def from_mx_blocks(blocks: torch.Tensor, scales: torch.Tensor, orig_dtype: torch.dtype | None = None):
    """A ``QuantizedWeight`` (mxfp4) from gpt-oss checkpoint tensors ``*_blocks [E, N, K/32, 16]`` uint8 and
    ``*_scales [E, N, K/32]`` uint8 (a view: no copy)."""
    from .quant import QuantizedWeight

    fn = "from_mx_blocks"
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[3] != 16:
        raise ValueError(f"{fn}: blocks must be uint8 [E, N, K/32, 16], got {_desc(blocks)}")
    E, N, G, _ = blocks.shape
    return QuantizedWeight(data=blocks.reshape(E, N, G * 16), scale=scales, fmt="mxfp4", group_size=MX_GROUP,
                           orig_dtype=orig_dtype)
