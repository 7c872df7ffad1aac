// The packed-weight ops: `pack_weight` (W [N, K] -> the strip layout of packed_gemv.h, done once per weight) and
// `linear_packed` (y [M, N] fp32 = x [M, K] @ W^T (+ bias) over it, x in W's dtype). fp32 on every build, bf16
// where the CPU has AVX512_BF16: `packed_available(dtype)` says which. bf16 runs on AMX tiles where the build and the
// OS allow (`amx_available`, amx_gemv.h) unless `set_amx(false)` (or JANUS_RT_AMX=0) turned that route off.
// dtype kInt8W (2): int8 weights with a fp32 scale per output row and bf16 x (int8_gemv.h; packed by `pack_int8`,
// `packed_size` then counts bytes); dtype kW8A8 (4): the same weights offset to unsigned bytes, and x quantized to
// int8 per row and group of 512 columns in the call (w8a8_gemv.h, AVX512-VNNI, or AMX-INT8 tiles from 4 rows on where
// `amx_w8a8_available`: amx_w8a8.h; packed by `pack_w8a8`).
#include <tuple>
#include <vector>

#include <omp.h>

#include "common.h"
#include "gemv.h"
#include "int8_gemv.h"
#include "packed_gemv.h"
#include "w8a8_gemv.h"

namespace jr {
namespace {

void check_sizes(int dtype, int64_t N, int64_t K) {
  if (dtype == kW8A8) {
    JR_CHECK(w8a8::available(), "this build has no W8A8 GEMV (needs AVX512_VNNI)");
    JR_CHECK(N >= 1 && K >= 1, "need N, K >= 1");
    return;
  }
  if (dtype == kInt8W) {
    JR_CHECK(int8w::available(), "this build has no int8 GEMV (needs AVX512_BF16)");
    JR_CHECK(N >= 1 && K >= 2 && K % 2 == 0, "int8 weights need N >= 1 and an even K >= 2");
    return;
  }
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32, bf16, int8 weights (2) or W8A8 (4)");
  JR_CHECK(dtype == kF32 || simd::kHaveBf16Dot, "this build has no packed bf16 GEMV (needs AVX512_BF16)");
  JR_CHECK(N >= 1 && K >= 1, "need N, K >= 1");
  JR_CHECK(dtype == kF32 || K % 2 == 0, "bf16 needs an even K");
}

// x [M, K] as the layer's buffer holds it (gemv::pack_x<WT>, rows gemv::x_stride(K) apart).
template <typename WT>
std::vector<WT> packed_rows(const WT* x, int64_t M, int64_t K) {
  const int64_t ldx = gemv::x_stride(K);
  std::vector<WT> xp(static_cast<size_t>(M * ldx));
  gemv::pack_x<WT>(x, xp.data(), M, K, ldx);
  return xp;
}

template <typename WT>
void linear_packed_impl(const WT* x, const WT* wp, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  if constexpr (packed::available<WT>()) {
    const int64_t ldx = gemv::x_stride(K);
    const std::vector<WT> xp = packed_rows(x, M, K);
#pragma omp parallel if (N * K >= (int64_t(1) << 16))
    packed::gemv_for(wp, xp.data(), ldx, bias, y, M, N, K);
  }
}

}  // namespace

bool packed_available(int dtype) {
  return dtype == kF32 || (dtype == kBF16 && simd::kHaveBf16Dot) || (dtype == kInt8W && int8w::available()) ||
         (dtype == kW8A8 && w8a8::available());
}

bool amx_available() { return amx::kBuilt && amx::permitted() && amx::switch_().load(); }

bool amx_w8a8_available() { return amx8::kBuilt && amx::permitted() && amx::switch_().load(); }

bool set_amx(bool on) { return amx::switch_().exchange(on); }

int64_t packed_size(int64_t N, int64_t K, int dtype) {
  check_sizes(dtype, N, K);
  if (dtype == kInt8W) return int8w::packed_bytes(N, K);  // bytes
  if (dtype == kW8A8) return w8a8::packed_bytes(N, K);
  return dtype == kF32 ? packed::packed_size<float>(N, K) : packed::packed_size<uint16_t>(N, K);
}

std::tuple<int64_t, int64_t, int64_t> packed_layout(int dtype) {
  JR_CHECK(dtype == kF32 || dtype == kBF16 || dtype == kInt8W || dtype == kW8A8,
           "dtype must be fp32, bf16, int8 weights (2) or W8A8 (4)");
  if (dtype == kW8A8) return {w8a8::kS, w8a8::kKT, 4};
  if (dtype == kInt8W) return {int8w::kS, int8w::kKT, 4};
  if (dtype == kF32) return {packed::strip<float>(), packed::ktile<float>(), packed::runs<float>()};
  return {packed::strip<uint16_t>(), packed::ktile<uint16_t>(), packed::runs<uint16_t>()};
}

void pack_weight(std::uintptr_t w, std::uintptr_t wp, int64_t N, int64_t K, int dtype) {
  check_sizes(dtype, N, K);
  JR_CHECK(dtype != kInt8W, "int8 weights are packed with their scales: pack_int8");
  JR_CHECK(dtype != kW8A8, "W8A8 weights are packed with their scales: pack_w8a8");
  JR_CHECK(w && wp, "null pointer");
  if (dtype == kF32) packed::pack(ptr<const float>(w), ptr<float>(wp), N, K);
  else packed::pack(ptr<const uint16_t>(w), ptr<uint16_t>(wp), N, K);
}

void linear_packed(std::uintptr_t x, std::uintptr_t wp, std::uintptr_t bias, std::uintptr_t y, int64_t M, int64_t N,
                   int64_t K, int dtype) {
  check_sizes(dtype, N, K);
  JR_CHECK(M >= 1, "need M >= 1");
  JR_CHECK(x && wp && y, "null pointer");
  if (dtype == kW8A8) {
    if constexpr (w8a8::available()) {
      const int64_t ldx = gemv::x_stride(K);
      const std::vector<uint16_t> xp = packed_rows(ptr<const uint16_t>(x), M, K);
      w8a8::QuantizedX xq;  // x quantized once by the team (a prefill's rows), freed with this call
      xq.shape(M, K);
#pragma omp parallel if (N * K >= (int64_t(1) << 16))
      {
        xq.rows_for(xp.data(), ldx, K, M);
        w8a8::gemv_for(ptr<const uint8_t>(wp), xq, ptr<const float>(bias), ptr<float>(y), M, N, K);
      }
    }
  } else if (dtype == kInt8W) {
    if constexpr (int8w::available()) {
      const int64_t ldx = gemv::x_stride(K);
      const std::vector<uint16_t> xp = packed_rows(ptr<const uint16_t>(x), M, K);
#pragma omp parallel if (N * K >= (int64_t(1) << 16))
      int8w::gemv_for(ptr<const int8_t>(wp), xp.data(), ldx, ptr<const float>(bias), ptr<float>(y), M, N, K);
    }
  } else if (dtype == kF32)
    linear_packed_impl(ptr<const float>(x), ptr<const float>(wp), ptr<const float>(bias), ptr<float>(y), M, N, K);
  else
    linear_packed_impl(ptr<const uint16_t>(x), ptr<const uint16_t>(wp), ptr<const float>(bias), ptr<float>(y), M,
                       N, K);
}

void pack_int8(std::uintptr_t q, std::uintptr_t scales, std::uintptr_t wp, int64_t N, int64_t K) {
  check_sizes(kInt8W, N, K);
  JR_CHECK(q && scales && wp, "null pointer");
  int8w::pack(ptr<const int8_t>(q), ptr<const float>(scales), ptr<int8_t>(wp), N, K);
}

void pack_w8a8(std::uintptr_t q, std::uintptr_t scales, std::uintptr_t wp, int64_t N, int64_t K) {
  check_sizes(kW8A8, N, K);
  JR_CHECK(q && scales && wp, "null pointer");
  w8a8::pack(ptr<const int8_t>(q), ptr<const float>(scales), ptr<uint8_t>(wp), N, K);
}

}  // namespace jr
