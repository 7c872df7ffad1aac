// The `rope` op: out [R, H, D] = rotate-half RoPE of x [R, H, D] in T (fp32 or bf16) with ops.rope_torch's rounding
// points (rope.h's head, the one decode_layer runs), for prefill-sized inputs (the torch ops' five passes had cost
// ~2.7 ms per Janus-Pro-1B layer at 639 tokens, bench/RESULTS.md).
//   x: row r's head h at x + r * ldx + h * D (q or k as views of the qkv projection's output); cos, sin fp32 [R, D]
//   (the rotary tables of each row's position, values of T); out contiguous.
#include <vector>

#include <omp.h>

#include "common.h"
#include "rope.h"
#include "simd.h"

namespace jr {
namespace {

template <typename T>
void rope_impl(const T* x, int64_t ldx, const float* cos, const float* sin, T* out, int64_t R, int64_t H, int64_t D) {
#pragma omp parallel if (R * H * D >= 65536)
  {
    std::vector<float> xf(static_cast<size_t>(D)), tmp(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t rh = 0; rh < R * H; ++rh) {
      const int64_t r = rh / H, h = rh % H;
      const T* src = x + r * ldx + h * D;
      simd::widen(src, xf.data(), D);
      rotary::rope_head(xf.data(), cos + r * D, sin + r * D, out + rh * D, D, tmp.data());
    }
  }
}

}  // namespace

void rope(std::uintptr_t x, int64_t ldx, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t out, int64_t R,
          int64_t H, int64_t D, int dtype) {
  JR_CHECK(R >= 0 && H >= 1 && D >= 2 && D % 2 == 0 && ldx >= H * D, "need H >= 1, an even D >= 2, ldx >= H * D");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(R == 0 || (x && cos && sin && out), "null pointer");
  if (dtype == kF32)
    rope_impl(ptr<const float>(x), ldx, ptr<const float>(cos), ptr<const float>(sin), ptr<float>(out), R, H, D);
  else
    rope_impl(ptr<const uint16_t>(x), ldx, ptr<const float>(cos), ptr<const float>(sin), ptr<uint16_t>(out), R, H, D);
}

}  // namespace jr
