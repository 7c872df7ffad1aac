// The `mlp_gelu` op for decode-sized inputs: y [M, N] fp32 = (GELU(x W1^T + b1)) W2^T + b2, the gen_aligner and
// gen_head shape (Linear -> GELU(erf) -> Linear), in one parallel region: the two GEMVs are gemv.h's, the GELU
// between them runs per row while it is in cache. Run after a decode step's weight stream, the three torch ops it
// replaces each started from cold caches.
//   x [M, K], W1 [H, K], b1 [H] (or none), W2 [N, H], b2 [N] (or none), all one dtype T (fp32 or bf16); `packed`
//   says how W1 and W2 are held: 0 [N, K] in T (gemv.h), 1 packed_gemv.h's strip layout (cpu_ops.PackedWeight), 2
//   int8 with row scales (int8_gemv.h, cpu_ops.Int8Weight) or 4 W8A8 (w8a8_gemv.h, cpu_ops.W8A8Weight: x and the
//   hidden layer quantized per row and group of 512 columns in the call); 2 and 4 with T bf16 (a model held int8:
//   its gen head and gen aligner follow its projections, Janus.pack_for_cpu_(int8=...)).
// Rounding points of the torch path (ops.mlp_gelu with the cpu backend's linear): the hidden layer is rounded to T
// before and after the GELU; y is returned in fp32 (the caller rounds it to T, as ops.linear does), or with
// `round_out` already holding values of T (what .to(T).float() of it gives: cpu_step.ImageStep's logits).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "common.h"
#include "gemv.h"
#include "kind_gemv.h"
#include "simd.h"
#include "swiglu.h"

namespace jr {
namespace {

// r[0:n] = T(GELU(T(r))) in place, GELU(v) = v 0.5 (1 + erf(v / sqrt 2)) with simd::erf, in vectors (the last
// n % kWidth lanes through load_partial), instead of std::erf per element: with the held buffers below, the 1B gen
// head's call (32 rows, 2048 -> 2048 -> 16384, bf16, packed) 7.37 -> 6.86 ms and the aligner's (16 rows, 8 -> 2048
// -> 2048) 0.78 -> 0.52 ms on the 2-core host at a busy moment (bench/RESULTS.md, 2026-12-03, eighth session).
template <typename T>
inline void gelu_row(float* r, int64_t n) {
  using namespace simd;
  auto one = [](vf v) {
    v = act::rnd_v<T>(v);
    const vf g = mul(mul(v, set1(0.5f)), add(set1(1.0f), simd::erf(mul(v, set1(0.70710678118654752f)))));
    return act::rnd_v<T>(g);
  };
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) store(r + i, one(load(r + i)));
  if (i < n) store_partial(r + i, one(load_partial(r + i, n - i)), n - i);
}

// A call's buffers, kept by the calling thread and only grown (allocated afresh, the 1B gen head's ~0.4 MB came
// from new pages, page faults and zeroing, on every call).
// xp, hp: the GEMV inputs (values of T; pack_x writes a row's first K or H entries, the padding is zeroed here);
// hid: the hidden layer; bias1, bias2: the biases in fp32 (the GEMV adds an fp32 bias); xq, hq: W8A8's quantized xp
// and hp (shaped per call; they only grow).
template <typename T>
struct Buffers {
  std::vector<gemv::xpack_t<T>> xp, hp;
  std::vector<float> hid, bias1, bias2;
  w8a8::QuantizedX xq, hq;
};

template <typename V>
inline typename V::value_type* at_least(V& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

template <typename T>
void mlp_gelu_impl(const T* x, const T* w1, const T* b1, const T* w2, const T* b2, float* y, int64_t M, int64_t K,
                   int64_t H, int64_t N, int kind, bool round_out) {
  thread_local Buffers<T> buf;
  const int64_t ldk = gemv::x_stride(K), ldh = gemv::x_stride(H);
  gemv::xpack_t<T>* xp = at_least(buf.xp, M * ldk);
  gemv::xpack_t<T>* hp = at_least(buf.hp, M * ldh);
  float* hid = at_least(buf.hid, M * H);
  float* bias1 = b1 ? at_least(buf.bias1, H) : nullptr;
  float* bias2 = b2 ? at_least(buf.bias2, N) : nullptr;
  if (b1) simd::widen(b1, bias1, H);
  if (b2) simd::widen(b2, bias2, N);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(xp + m * ldk + K, xp + (m + 1) * ldk, gemv::xpack_t<T>{});
    std::fill(hp + m * ldh + H, hp + (m + 1) * ldh, gemv::xpack_t<T>{});
  }
  gemv::pack_x<T>(x, xp, M, K, ldk);
  const bool w8 = kind == kW8A8;
  w8a8::QuantizedX &xq = buf.xq, &hq = buf.hq;  // (the caller's: inside the region `buf` is each thread's own)
  if (w8) xq.shape(M, K), hq.shape(M, H);
  // a small MLP (the embedded model's aligners) on the calling thread: its three barriers cost more than its work,
  // far more where another process shares the cores (as decode_layer's kTeamWork)
#pragma omp parallel if (M * (K * H + H * N) >= (int64_t(1) << 20))
  {
    if constexpr (std::is_same_v<gemv::xpack_t<T>, uint16_t>) {
      if (w8) xq.rows_for(xp, ldk, K, M);
    }
    gemv_for_kind(kind, w1, xp, ldk, xq, bias1, hid, M, H, K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      float* r = hid + m * H;
      gelu_row<T>(r, H);  // as torch's GELU(erf)
      gemv::pack_x<T>(r, hp + m * ldh, 1, H, ldh);
      if constexpr (std::is_same_v<gemv::xpack_t<T>, uint16_t>) {
        if (w8) hq.rows(hp, ldh, H, m, m + 1);  // (this row's, on the thread that wrote it)
      }
    }
    gemv_for_kind(kind, w2, hp, ldh, hq, bias2, y, M, N, H);
    if (std::is_same_v<T, uint16_t> && round_out) {  // y's values rounded to T
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) act::round_to<T>(y + m * N, N);
    }
  }
}

}  // namespace

void mlp_gelu(std::uintptr_t x, std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w2, std::uintptr_t b2,
              std::uintptr_t y, int dtype, int64_t M, int64_t K, int64_t H, int64_t N, int packed, bool round_out) {
  JR_CHECK(M >= 1 && K >= 1 && H >= 1 && N >= 1, "M, K, H, N must be >= 1");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(packed == 0 || packed == 1 || packed == kInt8W || packed == kW8A8,
           "packed must be 0, 1, 2 (int8) or 4 (W8A8)");
  JR_CHECK(packed != 1 || dtype == kF32 || (simd::kHaveBf16Dot && K % 2 == 0 && H % 2 == 0),
           "packed bf16 weights need an AVX512_BF16 build and even K and H");
  JR_CHECK(packed != kInt8W || (dtype == kBF16 && int8w::available() && K % 2 == 0 && H % 2 == 0),
           "int8 weights need bf16 x, an AVX512_BF16 build and even K and H");
  JR_CHECK(packed != kW8A8 || (dtype == kBF16 && w8a8::available() && simd::kHaveBf16Dot),
           "W8A8 weights need bf16 x and an AVX512_VNNI and AVX512_BF16 build");
  JR_CHECK(x && w1 && w2 && y, "null pointer");
  if (dtype == kF32)
    mlp_gelu_impl(ptr<const float>(x), ptr<const float>(w1), ptr<const float>(b1), ptr<const float>(w2),
                  ptr<const float>(b2), ptr<float>(y), M, K, H, N, packed, round_out);
  else
    mlp_gelu_impl(ptr<const uint16_t>(x), ptr<const uint16_t>(w1), ptr<const uint16_t>(b1), ptr<const uint16_t>(w2),
                  ptr<const uint16_t>(b2), ptr<float>(y), M, K, H, N, packed, round_out);
}

}  // namespace jr
