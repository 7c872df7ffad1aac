// The `linear` op: y [M, N] fp32 = x [M, K] @ W [N, K]^T (+ bias [N]) for small M, fp32 or bf16 x and W.
// The kernel itself (register blocking, bf16 widening, the measurements behind the block sizes) is gemv.h.
#include <vector>

#include <omp.h>

#include "common.h"
#include "gemv.h"
#include "simd.h"

namespace jr {
namespace {

// bf16 x against bf16 weights packs x as bf16 where the CPU has the bf16 dot product (gemv.h); fp32 x stays fp32.
template <typename WT, typename XT>
void linear_impl(const XT* x, const WT* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  using XP = std::conditional_t<std::is_same_v<XT, WT>, gemv::xpack_t<WT>, float>;
  const int64_t ldx = gemv::x_stride(K);
  std::vector<XP> xp(static_cast<size_t>(M * ldx));
  gemv::pack_x<WT>(x, xp.data(), M, K, ldx);
#pragma omp parallel if (N * K >= (int64_t(1) << 16))
  gemv::gemv_for(w, xp.data(), ldx, bias, y, M, N, K);
}

}  // namespace

void linear(std::uintptr_t x, int x_dtype, std::uintptr_t w, int w_dtype, std::uintptr_t bias, std::uintptr_t y,
            int64_t M, int64_t N, int64_t K) {
  JR_CHECK(M >= 1 && N >= 1 && K >= 1, "M, N, K must be >= 1");
  JR_CHECK(x_dtype == kF32 || x_dtype == kBF16, "x dtype must be fp32 or bf16");
  JR_CHECK(w_dtype == kF32 || w_dtype == kBF16, "weight dtype must be fp32 or bf16");
  JR_CHECK(x && w && y, "null pointer");
  const float* b = ptr<const float>(bias);
  if (w_dtype == kF32) {
    if (x_dtype == kF32) linear_impl(ptr<const float>(x), ptr<const float>(w), b, ptr<float>(y), M, N, K);
    else linear_impl(ptr<const uint16_t>(x), ptr<const float>(w), b, ptr<float>(y), M, N, K);
  } else {
    if (x_dtype == kF32) linear_impl(ptr<const float>(x), ptr<const uint16_t>(w), b, ptr<float>(y), M, N, K);
    else linear_impl(ptr<const uint16_t>(x), ptr<const uint16_t>(w), b, ptr<float>(y), M, N, K);
  }
}

const char* simd_isa() { return simd::kIsa; }

}  // namespace jr
