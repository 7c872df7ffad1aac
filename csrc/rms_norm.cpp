// The `rms_norm` op: out [R, C] = RMSNorm(h) in T (fp32 or bf16) with ops.rms_norm_torch's rounding points
// (rms_norm.h's row, the one decode_layer runs), rows in parallel; with a residual, h = T(x + residual) first and
// written to h_out (ops.rms_norm's (norm(x + residual), x + residual)). For prefill-sized inputs, where the torch
// ops' fp32 copies and separate passes had cost ~2.2 ms per Janus-Pro-1B layer at 639 tokens (bench/RESULTS.md).
//   x [R, C] at a row stride of ldx elements; residual [R, C] at ldr (0: none); weight [C]; out, h_out [R, C].
#include <vector>

#include <omp.h>

#include "common.h"
#include "rms_norm.h"
#include "simd.h"
#include "swiglu.h"

namespace jr {
namespace {

template <typename T>
void rms_norm_impl(const T* x, int64_t ldx, const T* res, int64_t ldr, const T* w, T* out, T* h_out, int64_t R,
                   int64_t C, float eps) {
  using namespace simd;
#pragma omp parallel if (R * C >= 65536)
  {
    std::vector<float> row(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T* src = x + r * ldx;
      if (res) {  // h = T(x + residual), kept in h_out, normed from there
        const T* rr = res + r * ldr;
        int64_t c = 0;
        for (; c + kWidth <= C; c += kWidth)
          store(&row[c], act::rnd_v<T>(add(load_as_float(src + c), load_as_float(rr + c))));
        for (; c < C; ++c) row[c] = rnd<T>(to_float(src[c]) + to_float(rr[c]));
        act::store_values(row.data(), h_out + r * C, C);
        src = h_out + r * C;
      }
      norm::rms_norm_row(src, w, row.data(), C, eps);
      act::store_values(row.data(), out + r * C, C);
    }
  }
}

}  // namespace

void rms_norm(std::uintptr_t x, int64_t ldx, std::uintptr_t residual, int64_t ldr, std::uintptr_t weight,
              std::uintptr_t out, std::uintptr_t h_out, int64_t R, int64_t C, double eps, int dtype) {
  JR_CHECK(R >= 0 && C >= 1 && ldx >= C && (!residual || ldr >= C), "need R >= 0, C >= 1 and row strides >= C");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(R == 0 || (x && weight && out && (!residual || h_out)), "null pointer");
  if (dtype == kF32)
    rms_norm_impl(ptr<const float>(x), ldx, ptr<const float>(residual), ldr, ptr<const float>(weight), ptr<float>(out),
                  ptr<float>(h_out), R, C, float(eps));
  else
    rms_norm_impl(ptr<const uint16_t>(x), ldx, ptr<const uint16_t>(residual), ldr, ptr<const uint16_t>(weight),
                  ptr<uint16_t>(out), ptr<uint16_t>(h_out), R, C, float(eps));
}

}  // namespace jr
