// The `swiglu` op: out [R, n] = silu(gate) * up in T (fp32 or bf16) with the rounding points of F.silu(gate) * up in
// T: swiglu.h's vector code (the one decode_layer runs), over pieces of the rows in parallel. gate and up may be
// views with row strides (the two halves of the gate_up projection's output); out is contiguous.
#include <algorithm>
#include <vector>

#include <omp.h>

#include "common.h"
#include "simd.h"
#include "swiglu.h"

namespace jr {
namespace {

template <typename T>
void swiglu_impl(const T* gate, int64_t ldg, const T* up, int64_t ldu, T* out, int64_t R, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t per_row = (n + kChunk - 1) / kChunk;
#pragma omp parallel if (R * n >= 4 * kChunk)
  {
    std::vector<float> g(kChunk), u(kChunk), a(kChunk);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < R * per_row; ++task) {
      const int64_t r = task / per_row, i0 = task % per_row * kChunk, m = std::min(kChunk, n - i0);
      simd::widen(gate + r * ldg + i0, g.data(), m);
      simd::widen(up + r * ldu + i0, u.data(), m);
      act::silu_mul<T>(g.data(), u.data(), a.data(), m);
      act::store_values(a.data(), out + r * n + i0, m);
    }
  }
}

}  // namespace

void swiglu(std::uintptr_t gate, int64_t ldg, std::uintptr_t up, int64_t ldu, std::uintptr_t out, int64_t R,
            int64_t n, int dtype) {
  JR_CHECK(R >= 0 && n >= 0 && ldg >= n && ldu >= n, "need R, n >= 0 and row strides >= n");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(R * n == 0 || (gate && up && out), "null pointer");
  if (dtype == kF32)
    swiglu_impl(ptr<const float>(gate), ldg, ptr<const float>(up), ldu, ptr<float>(out), R, n);
  else
    swiglu_impl(ptr<const uint16_t>(gate), ldg, ptr<const uint16_t>(up), ldu, ptr<uint16_t>(out), R, n);
}

}  // namespace jr
