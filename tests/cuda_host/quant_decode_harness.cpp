// Host build of the decode kernel's unpacking, dequantization and activation quantization
// (csrc/include/moe_kernels/quant_decode.cuh), for tests/test_cuda_quant_decode.py: the same functions
// the kernel runs, fed and read back as raw little-endian binary files.
//
//   harness codes OUT              every byte through e4m3 / e5m2 decode (2 x 256 fp32), then e2m1 (16) and
//                                  e8m0 (256) decode
//   harness encode E5M2 IN OUT     fp32 values -> fp8 codes (uint8), round to nearest even, saturating
//   harness quant IN OUT           activation quantization, header int64 {R, K, group, mode (0 group,
//                                  1 token, 2 tensor), e5m2} then fp32 [R, K] -> fp32 scales, fp32 code values
//   harness dequant IN OUT         header int64 {fmt, E, N, K, bn, bk, s_se, s_sn, s_sk, z_se, z_sn,
//                                  data bytes, scale bytes, zero bytes} then the three buffers ->
//                                  fp32 [E, N, K] through dequantize_chunk, 16 bytes at a time
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "moe_kernels/quant_decode.cuh"

namespace q = moe_kernels::quant;

namespace {

std::vector<char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) {
    std::perror(path);
    std::exit(2);
  }
  std::vector<char> buf;
  char tmp[65536];
  size_t n;
  while ((n = std::fread(tmp, 1, sizeof(tmp), f)) > 0) buf.insert(buf.end(), tmp, tmp + n);
  std::fclose(f);
  return buf;
}

void write_file(const char* path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
    std::perror(path);
    std::exit(2);
  }
  std::fclose(f);
}

template <int WF>
void dequant(const int64_t* h, const uint8_t* data, const void* scale, const uint8_t* zero, std::vector<float>& out) {
  constexpr int C = q::Format<WF>::kChunk;
  const int64_t E = h[1], N = h[2], K = h[3];
  q::WeightView v{scale, zero, h[6], h[7], h[8], h[9], h[10], static_cast<int>(h[4]), static_cast<int>(h[5])};
  const int64_t row_bytes = q::Format<WF>::kPacked ? K / 2 : K;
  out.assign(E * N * K, 0.f);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* row = data + (e * N + n) * row_bytes;
      for (int64_t k0 = 0; k0 < K; k0 += C) {
        uint8_t bytes[16] = {0};
        const int64_t b0 = q::Format<WF>::kPacked ? k0 / 2 : k0;
        for (int b = 0; b < 16 && b0 + b < row_bytes; ++b) bytes[b] = row[b0 + b];
        uint32_t words[4];
        std::memcpy(words, bytes, 16);  // little-endian, as the kernel's 16-byte load
        float vals[C];
        q::dequantize_chunk<WF>(words, v, e, n, k0, vals);
        for (int i = 0; i < C && k0 + i < K; ++i) out[(e * N + n) * K + k0 + i] = vals[i];
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s codes OUT | encode E5M2 IN OUT | quant IN OUT | dequant IN OUT\n", argv[0]);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "codes") {
    std::vector<float> out;
    for (uint32_t b = 0; b < 256; ++b) out.push_back(q::e4m3_to_float(b));
    for (uint32_t b = 0; b < 256; ++b) out.push_back(q::e5m2_to_float(b));
    for (uint32_t b = 0; b < 16; ++b) out.push_back(q::e2m1_to_float(b));
    for (uint32_t b = 0; b < 256; ++b) out.push_back(q::e8m0_to_float(b));
    write_file(argv[2], out.data(), out.size() * 4);
  } else if (cmd == "encode" && argc == 5) {
    const bool e5m2 = std::atoi(argv[2]) != 0;
    std::vector<char> in = read_file(argv[3]);
    const size_t n = in.size() / 4;
    std::vector<uint8_t> out(n);
    for (size_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, in.data() + 4 * i, 4);
      out[i] = static_cast<uint8_t>(e5m2 ? q::float_to_fp8<true>(v) : q::float_to_fp8<false>(v));
    }
    write_file(argv[4], out.data(), n);
  } else if (cmd == "quant" && argc == 4) {
    std::vector<char> in = read_file(argv[2]);
    int64_t h[5];
    std::memcpy(h, in.data(), sizeof(h));
    const int64_t R = h[0], K = h[1], group = h[2], mode = h[3];
    const bool e5m2 = h[4] != 0;
    const float* a = reinterpret_cast<const float*>(in.data() + sizeof(h));
    const int64_t G = mode == 0 ? (K + group - 1) / group : 1, rows = mode == 2 ? 1 : R;
    std::vector<float> amax(rows * G, 0.f);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        float& m = amax[(mode == 2 ? 0 : r) * G + (mode == 0 ? k / group : 0)];
        m = q::max_nan(m, std::fabs(a[r * K + k]));
      }
    std::vector<float> out(rows * G + R * K);
    for (int64_t i = 0; i < rows * G; ++i)
      out[i] = e5m2 ? q::amax_to_scale<true>(amax[i]) : q::amax_to_scale<false>(amax[i]);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const float s = out[(mode == 2 ? 0 : r) * G + (mode == 0 ? k / group : 0)];
        out[rows * G + r * K + k] = e5m2 ? q::quantize_value<true>(a[r * K + k], s)
                                         : q::quantize_value<false>(a[r * K + k], s);
      }
    write_file(argv[3], out.data(), out.size() * 4);
  } else if (cmd == "dequant" && argc == 4) {
    std::vector<char> in = read_file(argv[2]);
    int64_t h[14];
    std::memcpy(h, in.data(), sizeof(h));
    const uint8_t* data = reinterpret_cast<const uint8_t*>(in.data() + sizeof(h));
    const void* scale = data + h[11];
    const uint8_t* zero = h[13] ? data + h[11] + h[12] : nullptr;
    std::vector<float> out;
    switch (h[0]) {
      case q::kFp8E4M3: dequant<q::kFp8E4M3>(h, data, scale, zero, out); break;
      case q::kFp8E5M2: dequant<q::kFp8E5M2>(h, data, scale, zero, out); break;
      case q::kInt8: dequant<q::kInt8>(h, data, scale, zero, out); break;
      case q::kInt4: dequant<q::kInt4>(h, data, scale, zero, out); break;
      case q::kMxfp4: dequant<q::kMxfp4>(h, data, scale, zero, out); break;
      default: std::fprintf(stderr, "unknown format %lld\n", static_cast<long long>(h[0])); return 2;
    }
    write_file(argv[3], out.data(), out.size() * 4);
  } else {
    std::fprintf(stderr, "bad command %s\n", argv[1]);
    return 2;
  }
  return 0;
}
