// The `mlp_gelu` op for decode-sized inputs: y [M, N] fp32 = (GELU(x W1^T + b1)) W2^T + b2, the gen_aligner and
// gen_head shape (Linear -> GELU(erf) -> Linear), in one parallel region: the two GEMVs are gemv.h's, the GELU
// between them runs per row while it is in cache. Run after a decode step's weight stream, the three torch ops it
// replaces each started from cold caches.
//   x [M, K], W1 [H, K], b1 [H] (or none), W2 [N, H], b2 [N] (or none), all one dtype T (fp32 or bf16); with
//   `packed`, W1 and W2 in packed_gemv.h's strip layout (cpu_ops.PackedWeight) and run through its GEMV.
// Rounding points of the torch path (ops.mlp_gelu with the cpu backend's linear): the hidden layer is rounded to T
// before and after the GELU; y is returned in fp32 (the caller rounds it to T, as ops.linear does), or with
// `round_out` already holding values of T (what .to(T).float() of it gives: cpu_ops.ImageStep's logits).
#include <cmath>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "common.h"
#include "gemv.h"
#include "packed_gemv.h"

namespace jr {
namespace {

template <typename T>
void mlp_gelu_impl(const T* x, const T* w1, const T* b1, const T* w2, const T* b2, float* y, int64_t M, int64_t K,
                   int64_t H, int64_t N, bool is_packed, bool round_out) {
  const int64_t ldk = gemv::x_stride(K), ldh = gemv::x_stride(H);
  std::vector<gemv::xpack_t<T>> xp(size_t(M * ldk)), hp(size_t(M * ldh));  // GEMV inputs (values of T)
  std::vector<float> hid(size_t(M * H));
  std::vector<float> bias1(b1 ? size_t(H) : 0), bias2(b2 ? size_t(N) : 0);  // the GEMV adds an fp32 bias
  for (size_t i = 0; i < bias1.size(); ++i) bias1[i] = to_float(b1[i]);
  for (size_t i = 0; i < bias2.size(); ++i) bias2[i] = to_float(b2[i]);
  gemv::pack_x<T>(x, xp.data(), M, K, ldk);
#pragma omp parallel
  {
    packed::gemv_for_layout(is_packed, w1, xp.data(), ldk, b1 ? bias1.data() : nullptr, hid.data(), M, H, K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      float* r = &hid[m * H];
      for (int64_t i = 0; i < H; ++i) {
        const float v = rnd<T>(r[i]);
        r[i] = rnd<T>(v * 0.5f * (1.0f + std::erf(v * 0.70710678118654752f)));  // as torch's GELU(erf)
      }
      gemv::pack_x<T>(r, &hp[m * ldh], 1, H, ldh);
    }
    packed::gemv_for_layout(is_packed, w2, hp.data(), ldh, b2 ? bias2.data() : nullptr, y, M, N, H);
    if (std::is_same_v<T, uint16_t> && round_out) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < M * N; ++i) y[i] = rnd<T>(y[i]);
    }
  }
}

}  // namespace

void mlp_gelu(std::uintptr_t x, std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w2, std::uintptr_t b2,
              std::uintptr_t y, int dtype, int64_t M, int64_t K, int64_t H, int64_t N, bool packed, bool round_out) {
  JR_CHECK(M >= 1 && K >= 1 && H >= 1 && N >= 1, "M, K, H, N must be >= 1");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(!packed || dtype == kF32 || (simd::kHaveBf16Dot && K % 2 == 0 && H % 2 == 0),
           "packed bf16 weights need an AVX512_BF16 build and even K and H");
  JR_CHECK(x && w1 && w2 && y, "null pointer");
  if (dtype == kF32)
    mlp_gelu_impl(ptr<const float>(x), ptr<const float>(w1), ptr<const float>(b1), ptr<const float>(w2),
                  ptr<const float>(b2), ptr<float>(y), M, K, H, N, packed, round_out);
  else
    mlp_gelu_impl(ptr<const uint16_t>(x), ptr<const uint16_t>(w1), ptr<const uint16_t>(b1), ptr<const uint16_t>(w2),
                  ptr<const uint16_t>(b2), ptr<float>(y), M, K, H, N, packed, round_out);
}

}  // namespace jr
