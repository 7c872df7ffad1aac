// The packed-weight ops: `pack_weight` (W [N, K] -> the strip layout of packed_gemv.h, done once per weight) and
// `linear_packed` (y [M, N] fp32 = x [M, K] @ W^T (+ bias) over it, x in W's dtype). fp32 on every build, bf16
// where the CPU has AVX512_BF16: `packed_available(dtype)` says which. bf16 runs on AMX tiles where the build and the
// OS allow (`amx_available`, amx_gemv.h) unless `set_amx(false)` (or JANUS_RT_AMX=0) turned that route off.
#include <tuple>
#include <vector>

#include <omp.h>

#include "common.h"
#include "gemv.h"
#include "packed_gemv.h"

namespace jr {
namespace {

void check_sizes(int dtype, int64_t N, int64_t K) {
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(dtype == kF32 || simd::kHaveBf16Dot, "this build has no packed bf16 GEMV (needs AVX512_BF16)");
  JR_CHECK(N >= 1 && K >= 1, "need N, K >= 1");
  JR_CHECK(dtype == kF32 || K % 2 == 0, "bf16 needs an even K");
}

template <typename WT>
void linear_packed_impl(const WT* x, const WT* wp, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  if constexpr (packed::available<WT>()) {
    const int64_t ldx = gemv::x_stride(K);
    std::vector<WT> xp(static_cast<size_t>(M * ldx));  // x as the layer's buffer holds it
    gemv::pack_x<WT>(x, xp.data(), M, K, ldx);
#pragma omp parallel if (N * K >= (int64_t(1) << 16))
    packed::gemv_for(wp, xp.data(), ldx, bias, y, M, N, K);
  }
}

}  // namespace

bool packed_available(int dtype) { return dtype == kF32 || (dtype == kBF16 && simd::kHaveBf16Dot); }

bool amx_available() { return amx::kBuilt && amx::permitted() && amx::switch_().load(); }

bool set_amx(bool on) { return amx::switch_().exchange(on); }

int64_t packed_size(int64_t N, int64_t K, int dtype) {
  check_sizes(dtype, N, K);
  return dtype == kF32 ? packed::packed_size<float>(N, K) : packed::packed_size<uint16_t>(N, K);
}

std::tuple<int64_t, int64_t, int64_t> packed_layout(int dtype) {
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  if (dtype == kF32) return {packed::strip<float>(), packed::ktile<float>(), packed::runs<float>()};
  return {packed::strip<uint16_t>(), packed::ktile<uint16_t>(), packed::runs<uint16_t>()};
}

void pack_weight(std::uintptr_t w, std::uintptr_t wp, int64_t N, int64_t K, int dtype) {
  check_sizes(dtype, N, K);
  JR_CHECK(w && wp, "null pointer");
  if (dtype == kF32) packed::pack(ptr<const float>(w), ptr<float>(wp), N, K);
  else packed::pack(ptr<const uint16_t>(w), ptr<uint16_t>(wp), N, K);
}

void linear_packed(std::uintptr_t x, std::uintptr_t wp, std::uintptr_t bias, std::uintptr_t y, int64_t M, int64_t N,
                   int64_t K, int dtype) {
  check_sizes(dtype, N, K);
  JR_CHECK(M >= 1, "need M >= 1");
  JR_CHECK(x && wp && y, "null pointer");
  if (dtype == kF32)
    linear_packed_impl(ptr<const float>(x), ptr<const float>(wp), ptr<const float>(bias), ptr<float>(y), M, N, K);
  else
    linear_packed_impl(ptr<const uint16_t>(x), ptr<const uint16_t>(wp), ptr<const float>(bias), ptr<float>(y), M,
                       N, K);
}

}  // namespace jr
