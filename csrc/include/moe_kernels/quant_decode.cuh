// Unpacking, dequantization and activation quantization of the quantized decode kernel, as plain
// host/device functions on bits (no CUDA headers): the same code runs in the kernel and in the host
// test harness (tests/cuda_host/quant_decode_harness.cpp), which checks it bit for bit against
// QuantizedWeight.dequantize() and moe_kernels.quant.quantize_activation.
//
// Weight formats (layouts in moe_kernels/quant.py and moe_kernels/quant_int.py), one 16-byte load
// ("chunk") of a row at a time:
//   fp8 e4m3fn / e5m2  16 elements, fp32 block scales s[e, n / bn, k / bk]
//   int8               16 elements, fp32 scales s[e, n, k / g] (per channel: g = K)
//   int4               32 elements (element k in byte k / 2, low nibble for even k), value (q - z) * s with
//                      z the 4-bit zero point of row n (byte [e, n / 2, k / g], low nibble for even n) or 8
//   mxfp4              32 e2m1 elements (sign in bit 3), e8m0 scales 2^(s - 127) per 32
// Scales are looked up once per 16 elements: the launcher guarantees that groups are multiples of 16.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#define MK_UNROLL _Pragma("unroll")
#else
#define MK_HD inline
#define MK_UNROLL
#endif

namespace moe_kernels {
namespace quant {

enum WeightFormat : int { kFp8E4M3 = 0, kFp8E5M2 = 1, kInt8 = 2, kInt4 = 3, kMxfp4 = 4 };

template <int WF>
struct Format {
  static constexpr bool kPacked = WF == kInt4 || WF == kMxfp4;
  static constexpr int kChunk = kPacked ? 32 : 16;  // elements per 16-byte load
  static constexpr bool kFp8 = WF == kFp8E4M3 || WF == kFp8E5M2;
};

MK_HD float bits_to_float(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}

MK_HD uint32_t float_to_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
}

MK_HD float quiet_nan() { return bits_to_float(0x7FC00000u); }

// max that propagates NaN (fmaxf returns the other operand), for amax reductions.
MK_HD float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// ----- fp8 ---------------------------------------------------------------------------------------

// e4m3fn (no inf; S.1111.111 is NaN): exact fp32 value.
MK_HD float e4m3_to_float(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 7u;
  const float sub = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  const float mag = e == 0 ? sub : bits_to_float(((e + 120u) << 23) | (m << 20));
  const float v = bits_to_float(float_to_bits(mag) | sign);
  return (b & 0x7Fu) == 0x7Fu ? quiet_nan() : v;
}

// e5m2 (IEEE-like: S.11111.00 is inf, S.11111.xx NaN): exact fp32 value.
MK_HD float e5m2_to_float(uint32_t b) {
  const uint32_t sign = (b & 0x80u) << 24, e = (b >> 2) & 0x1Fu, m = b & 3u;
  const float sub = static_cast<float>(m) * 1.52587890625e-05f;  // m * 2^-16
  uint32_t bits = e == 0 ? float_to_bits(sub) : ((e + 112u) << 23) | (m << 21);
  if (e == 31) bits = m ? 0x7FC00000u : 0x7F800000u;
  return bits_to_float(bits | (e == 31 && m ? 0u : sign));
}

// fp32 -> fp8 code, round to nearest even, saturating at +-fmax (the reference clamps, then converts);
// NaN gives the format's NaN. E5M2 selects e5m2 (fmax 57344), else e4m3fn (fmax 448).
template <bool E5M2>
MK_HD uint32_t float_to_fp8(float v) {
  constexpr int kMant = E5M2 ? 2 : 3;
  constexpr uint32_t kBias = E5M2 ? 15 : 7;
  constexpr float kMax = E5M2 ? 57344.f : 448.f;
  constexpr float kMinNormal = E5M2 ? 6.103515625e-05f : 0.015625f;  // 2^(1 - bias)
  constexpr float kSubScale = E5M2 ? 65536.f : 512.f;                  // 1 / (smallest subnormal)
  const uint32_t sign = (float_to_bits(v) >> 24) & 0x80u;
  if (v != v) return sign | 0x7Fu;
  float a = bits_to_float(float_to_bits(v) & 0x7FFFFFFFu);
  a = a > kMax ? kMax : a;
  uint32_t code;
  if (a < kMinNormal) {  // subnormal (or zero): round a / 2^-(bias - 1 + mant) to an integer, half to even
    const float t = a * kSubScale;  // exact: a power of two
    uint32_t q = static_cast<uint32_t>(t);
    const float rem = t - static_cast<float>(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    code = q;  // q == 2^mant is the smallest normal's code, as it should be
  } else {
    const uint32_t bits = float_to_bits(a);
    constexpr int kShift = 23 - kMant;
    const uint32_t rounded = bits + ((1u << (kShift - 1)) - 1u) + ((bits >> kShift) & 1u);
    code = (rounded >> kShift) - ((127u - kBias) << kMant);
  }
  return sign | code;
}

template <bool E5M2>
MK_HD float fp8_to_float(uint32_t b) {
  return E5M2 ? e5m2_to_float(b) : e4m3_to_float(b);
}

// ----- activation quantization ---------------------------------------------------------------------

// The scale of a dynamic group: max(amax, 1e-10) / fmax in fp32 (NaN stays NaN).
template <bool E5M2>
MK_HD float amax_to_scale(float amax) {
  const float m = (amax != amax || amax > 1e-10f) ? amax : 1e-10f;
  return m / (E5M2 ? 57344.f : 448.f);
}

// The value an activation v takes after quantization with scale s (the code's value; multiply by s to
// dequantize): fp8(v / s) with the division in fp32, as the reference.
template <bool E5M2>
MK_HD float quantize_value(float v, float s) {
  return fp8_to_float<E5M2>(float_to_fp8<E5M2>(v / s));
}

// ----- weight-only formats -------------------------------------------------------------------------

// e2m1 code (0-15, sign in bit 3) -> 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
MK_HD float e2m1_to_float(uint32_t c) {
  const uint32_t e = (c >> 1) & 3u, m = c & 1u;
  const uint32_t mag = e == 0 ? (m ? 0x3F000000u : 0u) : (((e + 126u) << 23) | (m << 22));
  return bits_to_float(mag | ((c & 8u) << 28));
}

// e8m0 exponent -> 2^(s - 127) (2^-127 is an fp32 subnormal), NaN for 255.
MK_HD float e8m0_to_float(uint32_t s) {
  return s == 255u ? quiet_nan() : bits_to_float(s == 0u ? 0x00400000u : (s << 23));
}

// Element i (0 <= i < Format<WF>::kChunk) of a 16-byte chunk held as four little-endian words, as the
// integer or fp code's value before scaling (int4: q - zero).
template <int WF>
MK_HD float chunk_value(const uint32_t (&w)[4], int i, int zero) {
  if (Format<WF>::kPacked) {
    const uint32_t byte = (w[i >> 3] >> (((i >> 1) & 3) * 8)) & 0xFFu;
    const uint32_t nib = (i & 1) ? byte >> 4 : byte & 0xFu;
    if (WF == kInt4) return static_cast<float>(static_cast<int>(nib) - zero);
    return e2m1_to_float(nib);
  }
  const uint32_t byte = (w[i >> 2] >> ((i & 3) * 8)) & 0xFFu;
  if (WF == kInt8) return static_cast<float>(static_cast<int8_t>(byte));
  return fp8_to_float<WF == kFp8E5M2>(byte);
}

// The multiplier of a weight scale entry (fp32, or e8m0 for mxfp4).
template <int WF>
MK_HD float scale_value(const void* scale, int64_t index) {
  if (WF == kMxfp4) return e8m0_to_float(static_cast<const uint8_t*>(scale)[index]);
  return static_cast<const float*>(scale)[index];
}

// The int4 zero point of row n in group g (packed two rows a byte along N), or 8 without zero points.
MK_HD int int4_zero(const uint8_t* zero, int64_t row_pair_offset, int n) {
  if (zero == nullptr) return 8;
  const uint32_t byte = zero[row_pair_offset];
  return static_cast<int>((n & 1) ? byte >> 4 : byte & 0xFu);
}

// Where the scales (and int4 zero points) of weight element (e, n, k) live.
struct WeightView {
  const void* scale;      // fp32 [E, NB, KB] (fp8: block scales; int8/int4: [E, N, K/g]) or uint8 e8m0 (mxfp4)
  const uint8_t* zero;    // int4 zero points [E, N/2, K/g] or null
  int64_t s_se, s_sn, s_sk;  // scale strides (elements)
  int64_t z_se, z_sn;        // zero strides (bytes); K/g is contiguous
  int bn, bk;             // rows and columns per scale (per channel: bn = 1, bk = K)

  MK_HD int64_t scale_index(int64_t e, int64_t n, int64_t k) const { return e * s_se + (n / bn) * s_sn + (k / bk) * s_sk; }
  MK_HD int64_t zero_index(int64_t e, int64_t n, int64_t k) const { return e * z_se + (n / 2) * z_sn + k / bk; }
};

// The dequantized weights w[e, n, k0 .. k0 + kChunk) of one chunk (k0 a multiple of 16): values times
// the scale of each 16-element half.
template <int WF>
MK_HD void dequantize_chunk(const uint32_t (&words)[4], const WeightView& v, int64_t e, int64_t n, int64_t k0,
                            float (&out)[Format<WF>::kChunk]) {
  constexpr int C = Format<WF>::kChunk;
MK_UNROLL
  for (int h = 0; h < C / 16; ++h) {
    const int64_t k = k0 + 16 * h;
    const float s = scale_value<WF>(v.scale, v.scale_index(e, n, k));
    const int z = WF == kInt4 ? int4_zero(v.zero, v.zero ? v.zero_index(e, n, k) : 0, static_cast<int>(n)) : 0;
MK_UNROLL
    for (int i = 0; i < 16; ++i) out[16 * h + i] = chunk_value<WF>(words, 16 * h + i, z) * s;
  }
}

}  // namespace quant
}  // namespace moe_kernels
