"""gpt-oss's MXFP4 experts in Hugging Face transformers on moe_kernels, without dequantizing them.

When transformers loads a gpt-oss checkpoint in MXFP4 (``Mxfp4Config``, the default for ``openai/gpt-oss-*``), its
quantizer swaps each experts module for ``Mxfp4GptOssExperts`` (``transformers.integrations.mxfp4``) holding the
checkpoint's packed tensors, and runs them on the OpenAI ``triton_kernels`` matmul fetched from the kernels hub.
transformers 5.24 wraps router and experts in ``Mxfp4GptOssMLP``; 5.17 keeps ``GptOssMLP`` with the experts
replaced and its ``forward`` rebound. Both return ``(out, router_logits)``. :func:`patch
<moe_kernels.integrations.transformers.patch>` (and ``from_hf``) serve either block on :func:`fused_moe` with
``QuantizedWeight(fmt="mxfp4")`` experts built from those tensors:

=========================== ============================ =========================================================
tensor of the experts       layout                       read as
=========================== ============================ =========================================================
``gate_up_proj``            the checkpoint's             w13 data ``[E, 2I, H/2]``: e2m1 pairs of ``gate_up_proj_blocks
                            ``[E, 2I, H/32, 16]`` uint8  [E, 2I, H/32, 16]``; rows alternate gate, up (gate j = row
                            bytes, held as a hub tensor  2j); held by the hub as ``[E, H/2, 2I]`` in a swizzled
                            (``.storage``) once loaded   layout, read back with that layout's ``unswizzle_data``
``gate_up_proj_precision_   e8m0 scales, same holder     w13 scale ``[E, 2I, H/32]`` (``gate_up_proj_scales``)
config.weight_scale``
``down_proj`` (+ config)    ``[E, H, I/32, 16]``          w2 data ``[E, H, I/2]``, scale ``[E, H, I/32]``
``gate_up_proj_bias``       ``[E, 2I]`` fp32, alternating w13 bias (de-interleaved as the rows)
``down_proj_bias``          ``[E, H]`` fp32              w2 bias
=========================== ============================ =========================================================

Plain uint8 tensors are taken as well: ``{proj}`` (``[E, N, K/2]`` or ``[E, N, K/32, 16]``) or ``{proj}_blocks``,
with ``{proj}_scales`` ``[E, N, K/32]`` (the checkpoint's names), so a module filled from a checkpoint without the
hub's kernels is served too.

One conversion at the first call, cached on the experts module (recomputed only when its tensors change): the
packed bytes are read back from the hub's layout, and the gate and up rows of ``gate_up_proj``, its scales and
bias are de-interleaved (gate rows, then up rows: :func:`fused_moe`'s layout), a copy of the packed bytes (a
quarter of the bf16 weight), never a dequantized one. Every call after that passes the cached tensors as they
are. The hub's tensors stay (``save_pretrained`` reads them), so the experts' packed bytes are held twice.

The activation is gpt-oss's clamped SwiGLU (``swiglu_oai``: ``alpha`` and ``limit`` from the module, which must be
1.702 and 7.0). What cannot be served raises ValueError naming it: weights still on the meta device, tensors of
another shape or dtype, a hub tensor whose layout cannot be read back, another ``alpha``/``limit``.

Without the kernels hub (offline, or on CPU) transformers loads the MXFP4 checkpoint dequantized into dense
``GptOssExperts``. :func:`pack_experts_` packs those back in place, losslessly: each 32-element block of a
dequantized weight is ``code * 2^e`` with e2m1 codes, and :func:`moe_kernels.quantize`'s smallest
non-saturating power-of-two scale reproduces every such block exactly (a block whose largest code is below 4 gets
a smaller scale and codes scaled by a power of two, still on the e2m1 grid). It checks that, and refuses
(ValueError) weights that are not MXFP4 values, e.g. a fine-tuned model; then ``patch`` serves the blocks packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..moe import fused_moe
from ..quant import QuantizedWeight
from ..quant_int import MX_GROUP
from ..reference import OAI_ALPHA, OAI_LIMIT

__all__ = ["Mxfp4Experts", "Mxfp4MoEBlock", "from_hf", "is_mxfp4_block", "is_mxfp4_experts", "mxfp4_experts",
           "mxfp4_experts_forward", "pack_experts_"]

EXPERTS_CLASS = "Mxfp4GptOssExperts"
BLOCK_CLASSES = ("Mxfp4GptOssMLP", "GptOssMLP")  # 5.24 wraps the experts; 5.17 keeps GptOssMLP
_CACHE_ATTR = "_moe_kernels_mxfp4"
_PACKED_ATTR = "_moe_kernels_packed"  # set by pack_experts_


def is_mxfp4_experts(module) -> bool:
    """transformers' ``Mxfp4GptOssExperts``, or gpt-oss experts packed by :func:`pack_experts_`."""
    return type(module).__name__ == EXPERTS_CLASS or bool(getattr(module, _PACKED_ATTR, False))


def is_mxfp4_block(module) -> bool:
    """A gpt-oss MLP block whose experts transformers holds in MXFP4."""
    return type(module).__name__ in BLOCK_CLASSES and is_mxfp4_experts(getattr(module, "experts", None))


@dataclass(frozen=True, eq=False)
class Mxfp4Experts:
    """The experts of one ``Mxfp4GptOssExperts`` (or packed ``GptOssExperts``) in :func:`fused_moe`'s layout (see
    the module docstring)."""

    w13: QuantizedWeight  # dense [E, 2I, H]: gate rows, then up rows
    w2: QuantizedWeight  # dense [E, H, I]
    b13: torch.Tensor  # [E, 2I], gate then up (the module's bias dtype: fp32 in Mxfp4GptOssExperts)
    b2: torch.Tensor  # [E, H]
    key: tuple  # identity and version of the module's tensors it was built from


def _fail(cls: str, what: str):
    raise ValueError(f"moe_kernels mxfp4: {cls}: {what}")


def _read_back(cls: str, name: str, t) -> torch.Tensor:
    """A torch tensor of a hub tensor (``.storage.data`` in ``.storage.layout``; read back ``[..., K, N]`` and
    transposed to ``[..., N, K]``, as transformers' own ``Mxfp4ReverseDeserialize``), or ``t`` itself."""
    if isinstance(t, torch.Tensor):
        return t
    storage = getattr(t, "storage", None)
    layout = getattr(storage, "layout", None)
    if storage is None or not callable(getattr(layout, "unswizzle_data", None)):
        _fail(cls, f"{name} is a {type(t).__name__}, neither a torch.Tensor nor a kernels-hub tensor with "
                   "storage.layout.unswizzle_data")
    data = layout.unswizzle_data(storage.data)
    if not isinstance(data, torch.Tensor):
        _fail(cls, f"{name}: the hub layout {type(layout).__name__} read back a {type(data).__name__}")
    return data.transpose(-1, -2)


def _holders(cls: str, m: nn.Module, proj: str):
    """``(blocks, scales)`` of one projection as the module holds them: torch tensors, or kernels-hub tensors."""
    cfg = getattr(m, f"{proj}_precision_config", None)
    held = m.__dict__.get(proj, m._parameters.get(proj))
    if held is not None and not isinstance(held, torch.Tensor) and cfg is not None:  # loaded through the hub
        return held, getattr(cfg, "weight_scale", None)
    blocks = getattr(m, f"{proj}_blocks", None)
    if not isinstance(blocks, torch.Tensor):
        blocks = held
    scales = getattr(m, f"{proj}_scales", None)
    if not isinstance(blocks, torch.Tensor) or not isinstance(scales, torch.Tensor):
        _fail(cls, f"no MXFP4 tensors for {proj}: expected a hub tensor with {proj}_precision_config, or uint8 "
                   f"{proj} (or {proj}_blocks) with {proj}_scales")
    return blocks, scales


def _packed(cls: str, proj: str, blocks, scales, E: int, N: int, K: int):
    """``(data [E, N, K/2], scale [E, N, K/32])`` uint8 of one projection (views where the source allows)."""
    blocks = _read_back(cls, proj, blocks)
    scales = _read_back(cls, f"{proj}_precision_config.weight_scale", scales)
    for name, t in ((proj, blocks), (f"{proj}_scales", scales)):
        if t.device.type == "meta":
            _fail(cls, f"{name} is on the meta device (weights not loaded yet)")
        if t.dtype != torch.uint8:
            _fail(cls, f"{name} must be uint8 (packed e2m1 pairs / e8m0 exponents), got {t.dtype}")
    G = K // MX_GROUP
    if blocks.dim() == 4 and tuple(blocks.shape[2:]) == (G, 16):
        blocks = blocks.reshape(blocks.shape[0], blocks.shape[1], G * 16)
    want_d, want_s = (E, N, K // 2), (E, N, G)
    # a swizzled layout may read back with padding at the end of a dimension: crop it
    if blocks.dim() == 3 and all(a >= b for a, b in zip(blocks.shape, want_d)):
        blocks = blocks[:E, :N, : K // 2]
    if scales.dim() == 3 and all(a >= b for a, b in zip(scales.shape, want_s)):
        scales = scales[:E, :N, :G]
    if tuple(blocks.shape) != want_d:
        _fail(cls, f"{proj} packed data must be [E, N, K/2] = {list(want_d)} (or [E, N, K/32, 16]), got "
                   f"{list(blocks.shape)}")
    if tuple(scales.shape) != want_s:
        _fail(cls, f"{proj} scales must be [E, N, K/32] = {list(want_s)}, got {list(scales.shape)}")
    return blocks, scales


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Rows (g0, u0, g1, u1, ...) along dim 1 -> (g0, g1, ..., u0, u1, ...): one copy."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1).contiguous()


def _key(*held) -> tuple:
    """Identity and version of the tensors (or of the hub tensors' storage) a conversion was made from."""
    out = []
    for h in held:
        t = h if isinstance(h, torch.Tensor) else getattr(getattr(h, "storage", None), "data", None)
        if isinstance(t, torch.Tensor):
            out.append((id(h), t.data_ptr() if t.device.type != "meta" else 0, t._version, t.device, tuple(t.shape)))
        else:
            out.append((id(h), None))
    return tuple(out)


def _check_activation(cls: str, m: nn.Module) -> None:
    alpha, limit = float(getattr(m, "alpha", OAI_ALPHA)), float(getattr(m, "limit", OAI_LIMIT))
    if (alpha, limit) != (OAI_ALPHA, OAI_LIMIT):
        _fail(cls, f"alpha={alpha}, limit={limit}; fused_moe's swiglu_oai has alpha={OAI_ALPHA}, limit={OAI_LIMIT}")


def mxfp4_experts(module: nn.Module) -> Mxfp4Experts:
    """The :class:`Mxfp4Experts` of a transformers ``Mxfp4GptOssExperts`` (its packed tensors read once, cached on
    the module; see the module docstring). Raises ValueError naming what cannot be served."""
    cached = module.__dict__.get(_CACHE_ATTR)
    if cached is not None and torch.compiler.is_compiling():
        return cached  # traced code takes the conversion the first eager call (``from_hf``) cached, unchecked
    cls = type(module).__name__
    _check_activation(cls, module)
    b13, b2 = getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None)
    if not isinstance(b13, torch.Tensor) or not isinstance(b2, torch.Tensor) or b13.dim() != 2 or b2.dim() != 2:
        _fail(cls, "needs 2-D gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]")
    E, I2 = b13.shape
    H = b2.shape[1]
    if I2 % 2 or b2.shape[0] != E or H % MX_GROUP or (I2 // 2) % MX_GROUP:
        _fail(cls, f"gate_up_proj_bias {list(b13.shape)} and down_proj_bias {list(b2.shape)} do not describe gpt-oss "
                   f"experts [E, 2I] / [E, H] with H and I multiples of {MX_GROUP}")
    inter = I2 // 2
    h13, h2 = _holders(cls, module, "gate_up_proj"), _holders(cls, module, "down_proj")
    key = _key(*h13, *h2, b13, b2)
    if cached is not None and cached.key == key:
        return cached
    d13, s13 = _packed(cls, "gate_up_proj", *h13, E, I2, H)
    d2, s2 = _packed(cls, "down_proj", *h2, E, H, inter)
    with torch.no_grad():
        w13 = QuantizedWeight(data=_deinterleave(d13), scale=_deinterleave(s13), fmt="mxfp4", group_size=MX_GROUP,
                              orig_dtype=torch.bfloat16)
        w2 = QuantizedWeight(data=d2.contiguous(), scale=s2.contiguous(), fmt="mxfp4", group_size=MX_GROUP,
                             orig_dtype=torch.bfloat16)
        out = Mxfp4Experts(w13, w2, _deinterleave(b13.detach()), b2.detach(), key)
    module.__dict__[_CACHE_ATTR] = out
    return out


def mxfp4_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The experts of a ``Mxfp4GptOssExperts`` on :func:`fused_moe`, with transformers' experts signature.

    ============== ========= ====================================================================
    argument       shape     meaning
    ============== ========= ====================================================================
    hidden_states  [T, H]    tokens (bf16 / fp16 / fp32)
    top_k_index    [T, k]    experts in [0, E); others (expert-parallel sentinels) are dropped
    top_k_weights  [T, k]    routing weights
    out            [T, H]    ``sum_j w[t, j] * expert_{ids[t, j]}(x_t)`` in ``hidden_states``' dtype
    ============== ========= ====================================================================

    ``backend``: None takes the one chosen by ``integrations.transformers.register(backend=...)`` (``auto``).
    """
    if backend is None:
        from . import hf_experts

        backend = getattr(hf_experts, "BACKEND", "auto")
    mx = mxfp4_experts(self)
    E = mx.w13.shape[0]
    ids = torch.where((top_k_index >= 0) & (top_k_index < E), top_k_index, -1)
    out = fused_moe(hidden_states, mx.w13, mx.w2, top_k_weights, ids, activation="swiglu_oai", w13_bias=mx.b13,
                    w2_bias=mx.b2, backend=backend)
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


class Mxfp4MoEBlock(nn.Module):
    """A gpt-oss MLP block with MXFP4 experts running on moe_kernels; made by :func:`from_hf`.

    ``forward(hidden_states [..., H])`` returns ``(out [..., H], router_logits [T, E])``, as transformers' MXFP4
    block (experts packed by :func:`pack_experts_`: ``(out, router_scores [T, k])``, as ``GptOssMLP``). The
    submodules are the original block's (the router re-classed as a ``KernelRouter``), so ``state_dict()`` is
    unchanged.
    """

    def __init__(self, block: nn.Module, router: nn.Module, backend: str, returns_scores: bool = False):
        super().__init__()
        self.add_module("router", router)
        self.add_module("experts", block.experts)
        self.backend, self.returns_scores = backend, returns_scores
        self.hf_class = type(block).__name__
        self.train(block.training)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        logits, weights, ids = self.router(x)  # [T, E], [T, k], [T, k]
        out = mxfp4_experts_forward(self.experts, x, ids, weights, backend=self.backend)
        return out.reshape(shape), (weights if self.returns_scores else logits)

    def extra_repr(self) -> str:
        return f"hf_class={self.hf_class}, experts=mxfp4, activation=swiglu_oai, backend={self.backend}"


def from_hf(block: nn.Module, *, backend: str = "auto") -> Mxfp4MoEBlock:
    """An :class:`Mxfp4MoEBlock` computing what ``block`` (``Mxfp4GptOssMLP``, or ``GptOssMLP`` holding
    ``Mxfp4GptOssExperts``) computes, on its packed tensors (read once here, so an unservable block fails now)."""
    from .transformers import FAMILIES, _kernel_router, _routing

    if not is_mxfp4_block(block):
        raise ValueError(f"from_hf: {type(block).__name__} is not a gpt-oss MLP block with {EXPERTS_CLASS} experts")
    router = getattr(block, "router", None)
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(getattr(router, "bias", None),
                                                                                   torch.Tensor):
        raise ValueError(f"from_hf: {type(block).__name__}.router has no 2-D weight [E, H] and bias [E]")
    mx = mxfp4_experts(block.experts)
    if (mx.w13.shape[0], mx.w13.shape[2]) != tuple(weight.shape):
        raise ValueError(f"from_hf: {type(block).__name__}: experts of dense shape {list(mx.w13.shape)} do not match "
                         f"router weight {list(weight.shape)}")
    family = FAMILIES["GptOssMLP"]
    scores = type(block.experts).__name__ != EXPERTS_CLASS  # packed GptOssExperts: GptOssMLP's own return
    return Mxfp4MoEBlock(block, _kernel_router(router, _routing(block, family, router), backend), backend, scores)


def _pack(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks [E, N, K/32, 16], scales [E, N, K/32])`` of a dense ``[E, N, K]`` MXFP4-valued weight, one expert
    at a time (bounded temporaries); ValueError where a value is not reproduced exactly."""
    from ..quant import quantize

    E, N, K = w.shape
    blocks = torch.empty(E, N, K // MX_GROUP, 16, dtype=torch.uint8, device=w.device)
    scales = torch.empty(E, N, K // MX_GROUP, dtype=torch.uint8, device=w.device)
    for e in range(E):
        q = quantize(w[e:e + 1], "mxfp4")
        back = q.dequantize(w.dtype)
        if not torch.equal(back, w[e:e + 1]):
            bad = int((back != w[e:e + 1]).sum())
            raise ValueError(f"pack_experts_: {name} of expert {e} is not MXFP4-valued ({bad} of {N * K} elements are "
                             "not e2m1 codes times a power-of-two per 32); only dequantized MXFP4 checkpoints pack "
                             "losslessly")
        blocks[e] = q.data.view(N, K // MX_GROUP, 16)
        scales[e] = q.scale[0]
    return blocks, scales


def pack_experts_(model: nn.Module) -> int:
    """Pack the dense gpt-oss experts of ``model`` (``GptOssExperts``, e.g. an MXFP4 checkpoint that transformers
    dequantized for want of the kernels hub) back to MXFP4 in place, losslessly (see the module docstring);
    returns how many were packed. ``gate_up_proj`` / ``down_proj`` give way to uint8 buffers with the checkpoint's
    names and layouts (``*_blocks [E, N, K/32, 16]``, ``*_scales [E, N, K/32]``), a quarter of the bf16 bytes;
    then :func:`patch <moe_kernels.integrations.transformers.patch>` serves them packed. Every module is checked
    before any is changed: a weight that is not MXFP4-valued raises ValueError and leaves ``model`` as it was.

    Example::

        >>> model = AutoModelForCausalLM.from_pretrained("openai/gpt-oss-20b", dtype=torch.bfloat16)  # no hub
        >>> pack_experts_(model), patch(model)
        (24, 24)
    """
    todo = [m for m in model.modules() if type(m).__name__ == "GptOssExperts" and not is_mxfp4_experts(m)]
    packed = []
    for m in todo:
        gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
            raise ValueError(f"pack_experts_: {type(m).__name__} has no 3-D gate_up_proj [E, H, 2I] / down_proj [E, I, H]")
        _check_activation(type(m).__name__, m)
        with torch.no_grad():  # [E, H, 2I] -> rows [E, 2I, H] (gate/up interleaved, as the checkpoint's blocks)
            packed.append((m, _pack("gate_up_proj", gu.detach().transpose(1, 2)),
                           _pack("down_proj", dn.detach().transpose(1, 2))))
    for m, (b13, s13), (b2, s2) in packed:
        del m.gate_up_proj, m.down_proj
        for name, t in (("gate_up_proj_blocks", b13), ("gate_up_proj_scales", s13), ("down_proj_blocks", b2),
                        ("down_proj_scales", s2)):
            m.register_buffer(name, t)
        setattr(m, _PACKED_ATTR, True)
    return len(packed)
