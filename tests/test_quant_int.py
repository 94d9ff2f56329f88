"""Weight-only int8 / int4 / mxfp4 experts: layouts, quantize/dequantize, the torch reference path."""

import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels import QuantizedWeight, quantize
from moe_kernels.quant_int import from_mx_blocks
from moe_kernels.testing import assert_close  # noqa: F401

FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _unpack_python(qw):
    """An independent element-by-element reading of each documented layout, in float64."""
    E, N, K = qw.shape
    data = qw.data.tolist()
    scale = qw.scale.tolist()
    zero = qw.zero.tolist() if qw.zero is not None else None
    g = qw.group_size
    out = torch.empty(E, N, K, dtype=torch.float64)
    for e in range(E):
        for n in range(N):
            for k in range(K):
                if qw.fmt == "int8":
                    v = float(data[e][n][k])
                    s = scale[e][n] if g is None else scale[e][n][k // g]
                    out[e, n, k] = v * s
                    continue
                byte = data[e][n][k // 2]
                code = (byte & 15) if k % 2 == 0 else (byte >> 4)
                if qw.fmt == "int4":
                    if zero is None:
                        z = 8
                    else:
                        zb = zero[e][n // 2][k // g]
                        z = (zb & 15) if n % 2 == 0 else (zb >> 4)
                    out[e, n, k] = (code - z) * scale[e][n][k // g]
                else:
                    mag = FP4[code & 7]
                    v = -mag if code & 8 else mag
                    out[e, n, k] = v * math.ldexp(1.0, scale[e][n][k // 32] - 127)
    return out


CASES = [("int8", {}), ("int8", {"group_size": 32}), ("int4", {"group_size": 32}), ("int4", {"group_size": 64}),
         ("int4", {"group_size": 32, "zero_point": True}), ("mxfp4", {})]


@pytest.mark.parametrize("fmt,kw", CASES)
def test_dequantize_matches_layout(fmt, kw):
    torch.manual_seed(0)
    w = torch.randn(2, 6, 64) * torch.logspace(-3, 1, 64)  # magnitudes over several binades
    qw = quantize(w, fmt, **kw)
    ref = _unpack_python(qw)
    got = qw.dequantize(torch.float64)
    assert torch.equal(got, ref)
    assert torch.equal(qw.dequantize(torch.float32), ref.float())  # scales and values are exact: one rounding


@pytest.mark.parametrize("fmt,kw", CASES)
def test_round_trip_bound(fmt, kw):
    torch.manual_seed(1)
    w = torch.randn(3, 8, 128)
    qw = quantize(w, fmt, **kw)
    d = qw.dequantize(torch.float64)
    err = (d - w.double()).abs()
    g = qw.group_size or 128
    amax = w.double().abs().view(3, 8, -1, g).amax(-1, keepdim=True)
    if fmt == "int8":
        bound = amax / 127 / 2
    elif fmt == "int4" and qw.zero is None:
        bound = amax / 7 / 2
    elif fmt == "int4":
        wv = w.double().view(3, 8, -1, g)
        rng = wv.amax(-1, keepdim=True).clamp(min=0) - wv.amin(-1, keepdim=True).clamp(max=0)
        bound = rng / 15  # half a step, plus half a step of zero-point rounding
    else:
        s = torch.exp2(torch.ceil(torch.log2(amax / 6)))
        bound = s  # half of the widest e2m1 gap (4 -> 6) times the scale
    assert (err.view(3, 8, -1, g) <= bound * (1 + 1e-6)).all()
    assert err.max() > 0  # the bound is not vacuous: quantization did round


def test_int8_odd_shapes_and_zero_weight():
    w = torch.randn(2, 7, 33)
    w[0, 3] = 0
    qw = quantize(w, "int8")
    assert qw.scale.shape == (2, 7) and qw.data.dtype == torch.int8
    assert torch.equal(qw.dequantize()[0, 3], torch.zeros(33))
    assert torch.equal(qw.dequantize(torch.float64), _unpack_python(qw))


def test_mxfp4_zero_group_and_gpt_oss_blocks():
    w = torch.randn(2, 4, 64)
    w[1, 2, :32] = 0
    qw = quantize(w, "mxfp4")
    assert qw.scale.dtype == torch.uint8 and qw.data.shape == (2, 4, 32)
    assert torch.equal(qw.dequantize()[1, 2, :32], torch.zeros(32))
    blocks = qw.data.view(2, 4, 2, 16)
    qb = from_mx_blocks(blocks, qw.scale)
    assert qb.shape == (2, 4, 64) and torch.equal(qb.dequantize(), qw.dequantize())
    # exactly representable values round-trip bit-exactly
    v = torch.tensor(FP4 + [-x for x in FP4] + FP4 + [-x for x in FP4]).view(1, 1, 32) * 0.25
    assert torch.equal(quantize(v, "mxfp4").dequantize(), v)


def test_int4_zero_points_present_and_absent():
    torch.manual_seed(2)
    w = torch.randn(2, 4, 64) + 3.0  # one-sided groups: asymmetric quantization is much better here
    sym, asym = quantize(w, "int4", group_size=32), quantize(w, "int4", group_size=32, zero_point=True)
    assert sym.zero is None and asym.zero.shape == (2, 2, 2) and asym.zero.dtype == torch.uint8
    e_sym = (sym.dequantize() - w).abs().max()
    e_asym = (asym.dequantize() - w).abs().max()
    assert e_asym < e_sym


def _raw(fmt):
    E, N, K = 2, 4, 64
    if fmt == "int8":
        return dict(data=torch.zeros(E, N, K, dtype=torch.int8), scale=torch.ones(E, N))
    if fmt == "int4":
        return dict(data=torch.zeros(E, N, K // 2, dtype=torch.uint8), scale=torch.ones(E, N, 2), group_size=32)
    return dict(data=torch.zeros(E, N, K // 2, dtype=torch.uint8), scale=torch.full((E, N, 2), 127, dtype=torch.uint8))


@pytest.mark.parametrize("fmt,change,match", [
    ("int8", dict(data=torch.zeros(2, 4, 64, dtype=torch.uint8)), "data"),
    ("int8", dict(scale=torch.ones(2, 4, 1)), "scale"),
    ("int8", dict(group_size=48), "group_size"),
    ("int8", dict(zero=torch.zeros(2, 2, 1, dtype=torch.uint8)), "zero"),
    ("int4", dict(data=torch.zeros(2, 4, 64, dtype=torch.int8)), "data"),
    ("int4", dict(scale=torch.ones(2, 4, 3)), "scale"),
    ("int4", dict(scale=torch.ones(2, 4, 2, dtype=torch.float16)), "scale"),
    ("int4", dict(group_size=None), "group_size"),
    ("int4", dict(group_size=24), "group_size"),
    ("int4", dict(zero=torch.zeros(2, 4, 2, dtype=torch.uint8)), "zero"),
    ("int4", dict(block_shape=(128, 128)), "block_shape"),
    ("mxfp4", dict(scale=torch.ones(2, 4, 2)), "scale"),
    ("mxfp4", dict(group_size=16), "group_size"),
    ("mxfp4", dict(shape=(2, 4, 63)), "shape"),
])
def test_bad_construction(fmt, change, match):
    kw = _raw(fmt)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        QuantizedWeight(fmt=fmt, **kw)


def test_construction_from_raw_and_partial_groups_refused():
    qw = QuantizedWeight(fmt="int4", **_raw("int4"))
    assert qw.shape == (2, 4, 64) and qw.dequantize().dtype == torch.float32
    assert torch.equal(qw.dequantize(), torch.full((2, 4, 64), -8.0))
    with pytest.raises(ValueError, match="group_size=64 must divide K=96"):
        quantize(torch.randn(1, 4, 96), "int4", group_size=64)
    with pytest.raises(ValueError, match="divide K"):
        quantize(torch.randn(1, 4, 48), "mxfp4")
    with pytest.raises(ValueError, match="N must be even"):
        quantize(torch.randn(1, 3, 64), "int4", group_size=32, zero_point=True)
    with pytest.raises(ValueError, match="zero_point"):
        quantize(torch.randn(1, 4, 64), "mxfp4", zero_point=True)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(1, 4, 64), "fp8", group_size=32)
