"""Quantized expert weights: one value type for every format, and ``quantize``.

A :class:`QuantizedWeight` holds the packed data of a dense per-expert weight ``[E, N, K]`` (nn.Linear
layout: N output rows, K input columns) with its scales, zero points and layout, as one value that
every op taking a weight accepts (``grouped_gemm``, ``fused_moe``, ``MoE``, ``integrations.*``).

Formats (``fmt``) and their layouts, bit for bit:

========== ================================ =================================================================
fmt        data                             scale (fp32 inverse scales: multiply to dequantize)
========== ================================ =================================================================
fp8        ``[E, N, K]`` float8_e4m3fn      per tensor ``[E]``: ``w[e] ~= data[e] * scale[e]``;
                                            per channel ``[E, N, 1]``: ``w[e, n] ~= data[e, n] * scale[e, n, 0]``;
                                            block ``(bn, bk)``: ``[E, ceil(N/bn), ceil(K/bk)]``,
                                            ``w[e, n, k] ~= data[e, n, k] * scale[e, n // bn, k // bk]``
                                            (the last blocks of a row or column may be partial)
fp8_e5m2   as fp8, float8_e5m2              as fp8
========== ================================ =================================================================

These are vLLM's layouts (``w13_weight_scale`` / ``w13_weight_scale_inv``), so checkpoints pass through
without copies. ``quantize`` computes each scale as ``max(amax, 1e-10) / fmax`` over its group (``fmax`` =
448 for e4m3fn, 57344 for e5m2), so a zero block never divides by zero, and rounds ``w / scale`` to nearest
even, saturating at ``+-fmax``. The type is ready for integer and microscaling formats (``zero`` points,
``group_size``): the weight-only ``int8``, ``int4`` and ``mxfp4`` formats of :mod:`moe_kernels.quant_int`.

Activations of an FP8 GEMM are quantized dynamically by default, with the same rounding:

=========== ======================== ==============================================================
weights     activation scale         group
=========== ======================== ==============================================================
block       ``[rows, ceil(K/bk)]``   each token's ``bk`` columns of one weight block
per channel ``[rows, 1]``            each token
per tensor  ``[1]``                  the whole input (all tokens of ``hidden``, all rows of the
                                     activation output for the second GEMM of ``fused_moe``)
static      ``[1]`` given            the whole input, with the caller's scale
=========== ======================== ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import quant_int
from .quant_int import INT_FORMATS

FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FORMATS = tuple(FP8_FORMATS) + INT_FORMATS  # formats of QuantizedWeight
AMAX_FLOOR = 1e-10


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized per-expert weight of dense shape ``[E, N, K]`` (see the module docstring for layouts).

    ============ ========================================================================================
    field        meaning
    ============ ========================================================================================
    data         packed values (fp8: ``[E, N, K]`` float8_e4m3fn / float8_e5m2)
    scale        fp32 inverse scales: ``[E]`` (per tensor), ``[E, N, 1]`` (per channel) or
                 ``[E, ceil(N/bn), ceil(K/bk)]`` (block)
    fmt          ``"fp8"``, ``"fp8_e5m2"``, or weight-only ``"int8"``, ``"int4"``, ``"mxfp4"`` (layouts in
                 :mod:`moe_kernels.quant_int`: packed data, fp32 or e8m0 scales ``[E, N]`` / ``[E, N, K/g]``)
    block_shape  ``(bn, bk)`` for block scales, else None
    zero         int4 zero points ``[E, N/2, K/g]`` uint8 (None: symmetric)
    group_size   ``g``, elements of K per scale (int4, mxfp4 = 32, group-wise int8; None: per channel)
    shape        the dense ``(E, N, K)`` (default: from ``data``)
    orig_dtype   dtype the weight was quantized from (``dequantize()``'s default; None: float32)
    ============ ========================================================================================

    Build one from a checkpoint's tensors with keywords (``QuantizedWeight(data=w, scale=s, block_shape=(128,
    128))``) or from a dense weight with :func:`quantize`. Invalid combinations raise ``ValueError`` naming the
    field. Frozen: ``to(device)`` returns a new value.
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str = "fp8"
    block_shape: tuple[int, int] | None = None
    zero: torch.Tensor | None = None
    group_size: int | None = None
    shape: tuple[int, int, int] | None = None
    orig_dtype: torch.dtype | None = field(default=None)

    def __post_init__(self):
        fn = "QuantizedWeight"
        if self.fmt not in FORMATS:
            raise ValueError(f"{fn}: fmt must be one of {FORMATS}, got {self.fmt!r}")
        for name in ("data", "scale"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.fmt in INT_FORMATS:  # int8 / int4 / mxfp4: see moe_kernels.quant_int
            return quant_int.validate(self)
        want = FP8_FORMATS[self.fmt]
        if self.data.dtype != want or self.data.dim() != 3:
            raise ValueError(f"{fn}: data of fmt={self.fmt!r} must be a 3-D [E, N, K] {str(want).replace('torch.', '')} "
                             f"tensor, got {str(self.data.dtype).replace('torch.', '')} of shape {tuple(self.data.shape)}")
        shape = tuple(self.data.shape) if self.shape is None else tuple(int(s) for s in self.shape)
        if shape != tuple(self.data.shape):
            raise ValueError(f"{fn}: shape {shape} does not match data of shape {tuple(self.data.shape)}")
        object.__setattr__(self, "shape", shape)
        if self.zero is not None or self.group_size is not None:
            raise ValueError(f"{fn}: fmt={self.fmt!r} takes no zero points or group_size (they are for integer formats)")
        if self.scale.dtype != torch.float32:
            raise ValueError(f"{fn}: scale must be float32 inverse scales, got {str(self.scale.dtype).replace('torch.', '')}")
        if self.scale.device != self.data.device:
            raise ValueError(f"{fn}: scale is on {self.scale.device} but data on {self.data.device}")
        E, N, K = shape
        if self.block_shape is not None:
            bs = tuple(self.block_shape)
            if len(bs) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bs):
                raise ValueError(f"{fn}: block_shape must be two positive ints (bn, bk), got {self.block_shape!r}")
            object.__setattr__(self, "block_shape", bs)
            want_s = (E, _cdiv(N, bs[0]), _cdiv(K, bs[1]))
            if tuple(self.scale.shape) != want_s:
                raise ValueError(f"{fn}: scale of block_shape={bs} must have shape [E, ceil(N/bn), ceil(K/bk)] = "
                                 f"{list(want_s)}, got {list(self.scale.shape)}")
        elif tuple(self.scale.shape) not in ((E,), (E, N, 1)):
            raise ValueError(f"{fn}: scale must have shape [E]={[E]} (per tensor) or [E, N, 1]={[E, N, 1]} (per channel), "
                             f"or give block_shape for block scales; got {list(self.scale.shape)}")

    # ----- layout -----------------------------------------------------------------------------------

    @property
    def layout(self) -> str:
        """``"tensor"``, ``"channel"`` or ``"block"``."""
        if self.fmt in INT_FORMATS:
            return "group" if self.group_size else "channel"
        if self.block_shape is not None:
            return "block"
        return "tensor" if self.scale.dim() == 1 else "channel"

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def requires_grad(self) -> bool:
        return False

    def scale_blocks(self) -> tuple[torch.Tensor, int, int]:
        """Every layout as block scales: ``(scale [E, NB, KB] fp32 view, bn, bk)``; a per-tensor scale is one
        ``N x K`` block per expert, a per-channel one ``1 x K`` blocks."""
        E, N, K = self.shape
        if self.layout == "block":
            return self.scale, self.block_shape[0], self.block_shape[1]
        if self.layout == "tensor":
            return self.scale.view(E, 1, 1), max(N, 1), max(K, 1)
        return self.scale, 1, max(K, 1)

    def activation_group(self) -> str:
        """How activations meeting this weight are quantized dynamically: ``group``, ``token`` or ``tensor``."""
        return {"block": "group", "channel": "token", "tensor": "tensor"}[self.layout]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[E, N, K]`` weight in ``dtype`` (default: ``orig_dtype``, else float32); computed in fp32
        (fp64 when asked for fp64)."""
        dtype = dtype or self.orig_dtype or torch.float32
        acc = torch.promote_types(dtype, torch.float32)
        if self.fmt in INT_FORMATS:
            return quant_int.dequantize_raw(self.fmt, self.data, self.scale, self.zero, self.group_size or 0,
                                            acc).to(dtype)
        scale, bn, bk = self.scale_blocks()
        E, N, K = self.shape
        s = scale.to(acc).repeat_interleave(bn, 1)[:, :N].repeat_interleave(bk, 2)[:, :, :K]
        return (self.data.to(acc) * s).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        """The same weight on ``device``."""
        zero = self.zero.to(device) if self.zero is not None else None
        return QuantizedWeight(self.data.to(device), self.scale.to(device), self.fmt, self.block_shape, zero,
                               self.group_size, self.shape, self.orig_dtype)

    def __repr__(self) -> str:
        bs = f", block_shape={self.block_shape}" if self.block_shape else ""
        bs += f", group_size={self.group_size}" if self.group_size else ""
        bs += ", zero points" if self.zero is not None else ""
        return f"QuantizedWeight(fmt={self.fmt!r}, shape={self.shape}, layout={self.layout!r}{bs}, device={self.device})"


def quantize(w: torch.Tensor, fmt: str = "fp8", *, block_shape=None, per_channel: bool = False,
             group_size: int | None = None, zero_point: bool = False) -> QuantizedWeight:
    """Quantize a dense per-expert weight ``w [E, N, K]`` (nn.Linear layout) into a :class:`QuantizedWeight`.

    ``fmt="fp8"`` (e4m3fn) or ``"fp8_e5m2"``: per-tensor scales ``[E]`` by default, per-channel ``[E, N, 1]``
    with ``per_channel=True``, block scales ``[E, ceil(N/bn), ceil(K/bk)]`` with ``block_shape=(bn, bk)`` (e.g.
    ``(128, 128)``, DeepSeek-V3's). Scales are ``max(amax, 1e-10) / fmax`` over each group. Example::

        >>> qw = quantize(torch.randn(8, 256, 128), "fp8", block_shape=(128, 128))
        >>> qw.scale.shape
        torch.Size([8, 2, 1])

    Weight-only formats (:mod:`moe_kernels.quant_int` gives the layouts): ``"int8"`` per channel (scales ``[E, N]``)
    or with ``group_size``; ``"int4"`` with ``group_size`` (default 128, else the largest of 64, 32 dividing K) and
    ``zero_point=True`` for asymmetric groups; ``"mxfp4"`` (groups of 32, e8m0 scales).
    """
    fn = "quantize"
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.dtype.is_floating_point:
        raise ValueError(f"{fn}: w must be a dense float [E, N, K] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if fmt in INT_FORMATS:
        if block_shape is not None or per_channel:
            raise ValueError(f"{fn}: fmt={fmt!r} takes group_size (None: per channel for int8), not block_shape or "
                             f"per_channel")
        data, scale, zero, g = quant_int.quantize_int(w, fmt, group_size, zero_point)
        return QuantizedWeight(data=data, scale=scale, fmt=fmt, zero=zero, group_size=g, orig_dtype=w.dtype)
    if fmt not in FP8_FORMATS:
        raise ValueError(f"{fn}: fmt must be one of {FORMATS}, got {fmt!r}")
    if group_size is not None or zero_point:
        raise ValueError(f"{fn}: group_size and zero_point are for the int8 / int4 / mxfp4 formats, not {fmt!r}")
    if per_channel and block_shape is not None:
        raise ValueError(f"{fn}: per_channel and block_shape are exclusive, got block_shape={block_shape!r}")
    qdt = FP8_FORMATS[fmt]
    fmax = fp8_max(qdt)
    E, N, K = w.shape
    with torch.no_grad():
        wf = w.detach().float()
        if block_shape is not None:
            if (len(tuple(block_shape)) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                    for b in block_shape)):
                raise ValueError(f"{fn}: block_shape must be two positive ints (bn, bk), got {block_shape!r}")
            bn, bk = block_shape
            nb, kb = _cdiv(N, bn), _cdiv(K, bk)
            padded = wf.new_zeros(E, nb * bn, kb * bk)
            padded[:, :N, :K] = wf.abs()
            amax = padded.view(E, nb, bn, kb, bk).amax(dim=(2, 4))  # [E, nb, kb]
            scale = amax.clamp(min=AMAX_FLOOR) / fmax
            s_full = scale.repeat_interleave(bn, 1)[:, :N].repeat_interleave(bk, 2)[:, :, :K]
        elif per_channel:
            scale = wf.abs().amax(dim=2, keepdim=True).clamp(min=AMAX_FLOOR) / fmax if K else wf.new_full((E, N, 1), AMAX_FLOOR / fmax)
            s_full = scale
        else:
            amax = wf.abs().reshape(E, -1).amax(dim=1) if N * K else wf.new_zeros(E)
            scale = amax.clamp(min=AMAX_FLOOR) / fmax
            s_full = scale.view(E, 1, 1)
        data = (wf / s_full).clamp(-fmax, fmax).to(qdt)
    return QuantizedWeight(data=data.contiguous(), scale=scale.contiguous(), fmt=fmt,
                           block_shape=tuple(block_shape) if block_shape is not None else None, orig_dtype=w.dtype)


def check_not_raw_fp8(fn: str, **weights) -> None:
    """Refuse fp8 tensors passed as dense weights: without their scales they cannot be read."""
    for name, w in weights.items():
        if isinstance(w, torch.Tensor) and w.dtype in FP8_FORMATS.values():
            raise ValueError(f"{fn}: {name} is {str(w.dtype).replace('torch.', '')} data without scales; pass "
                             f"QuantizedWeight(data={name}, scale=..., block_shape=...) instead")


# ----- activation quantization and the FP8 references (the torch backend) ----------------------------


def quantize_activation(a: torch.Tensor, mode: str, group: int, qdtype: torch.dtype,
                        static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [R, K] fp8, scale)`` of activations ``a [R, K]``: ``q = clamp(a / s, +-fmax).to(fp8)`` with
    ``s = max(amax, 1e-10) / fmax`` (fp32) over each group. ``mode``: ``group`` (``scale [R, ceil(K/group)]``),
    ``token`` (``[R, 1]``), ``tensor`` (``[1, 1]``), ``static`` (``static_scale``, one element)."""
    fmax = fp8_max(qdtype)
    R, K = a.shape
    acc = torch.promote_types(a.dtype, torch.float32)
    af = a.to(acc)
    if mode == "static":
        s = static_scale.reshape(1, 1).float()
    elif mode == "tensor":
        s = (af.abs().amax() if af.numel() else af.new_zeros(())).reshape(1, 1).float()
        s = s.clamp(min=AMAX_FLOOR) / fmax
    elif mode == "token":
        s = (af.abs().amax(dim=1, keepdim=True) if K else af.new_zeros(R, 1)).float().clamp(min=AMAX_FLOOR) / fmax
    else:
        g = _cdiv(K, group)
        padded = af.new_zeros(R, g * group)
        padded[:, :K] = af.abs()
        s = padded.view(R, g, group).amax(dim=2).float().clamp(min=AMAX_FLOOR) / fmax  # [R, g]
    s_full = s.repeat_interleave(group, 1)[:, :K] if mode == "group" else s
    q = (af / s_full.to(acc)).clamp(-fmax, fmax).to(qdtype)
    return q, s


def fake_quantize_activation(a: torch.Tensor, mode: str, group: int, qdtype: torch.dtype,
                             static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(a))`` in ``a``'s accumulation dtype; ``mode="none"`` returns ``a`` (weight-only)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    if mode == "none":
        return a.to(acc)
    q, s = quantize_activation(a, mode, group, qdtype, static_scale)
    s_full = s.repeat_interleave(group, 1)[:, : a.shape[1]] if mode == "group" else s
    return q.to(acc) * s_full.to(acc)


def dequantize_blocks(data: torch.Tensor, scale: torch.Tensor, bn: int, bk: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[E, N, K]`` from fp8 data and block scales ``[E, NB, KB]`` (see ``QuantizedWeight.scale_blocks``)."""
    E, N, K = data.shape
    s = scale.to(dtype).repeat_interleave(bn, 1)[:, :N].repeat_interleave(bk, 2)[:, :, :K]
    return data.to(dtype) * s
