// The `swiglu` op: out [n] = silu(gate) * up in T (fp32 or bf16) with the rounding points of F.silu(gate) * up in T:
// swiglu.h's vector code (the one decode_layer runs), over chunks of the tensors in parallel.
#include <vector>

#include <omp.h>

#include "common.h"
#include "swiglu.h"

namespace jr {
namespace {

template <typename T>
void swiglu_impl(const T* gate, const T* up, T* out, int64_t n) {
  constexpr int64_t kChunk = 4096;
#pragma omp parallel if (n >= 4 * kChunk)
  {
    std::vector<float> g(kChunk), u(kChunk), a(kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
      const int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
      for (int64_t i = 0; i < m; ++i) g[i] = to_float(gate[i0 + i]), u[i] = to_float(up[i0 + i]);
      act::silu_mul<T>(g.data(), u.data(), a.data(), m);
      for (int64_t i = 0; i < m; ++i) from_float(a[i], out + i0 + i);
    }
  }
}

}  // namespace

void swiglu(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t out, int64_t n, int dtype) {
  JR_CHECK(n >= 0, "n must be >= 0");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(n == 0 || (gate && up && out), "null pointer");
  if (dtype == kF32) swiglu_impl(ptr<const float>(gate), ptr<const float>(up), ptr<float>(out), n);
  else swiglu_impl(ptr<const uint16_t>(gate), ptr<const uint16_t>(up), ptr<uint16_t>(out), n);
}

}  // namespace jr
