// The GEMV for a weight held in any of the packed ops' layouts, by its weight code `kind` (common.h): 0 [N, K] in T
// (gemv.h), 1 packed (packed_gemv.h), kInt8W int8 with row scales (int8_gemv.h), kW8A8 (w8a8_gemv.h); the int8
// kinds with T bf16. decode_layer's projections and mlp_gelu's two layers go through it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "gemv.h"
#include "int8_gemv.h"
#include "packed_gemv.h"
#include "w8a8_gemv.h"

namespace jr {

// y [M, N] = xp @ W^T + bias (bias fp32 [N] or null), xp packed by gemv::pack_x<T> (rows ldx apart); W8A8: xq
// already holds xp quantized (QuantizedX). Inside an OpenMP region (an orphaned `omp for`) or outside one, as the
// GEMVs it calls. Callers check that the build has the kind's GEMV.
template <typename T>
inline void gemv_for_kind(int kind, const T* w, const gemv::xpack_t<T>* xp, int64_t ldx, const w8a8::QuantizedX& xq,
                          const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  if constexpr (std::is_same_v<T, uint16_t> && std::is_same_v<gemv::xpack_t<T>, uint16_t>) {
    if constexpr (int8w::available()) {
      if (kind == kInt8W) return int8w::gemv_for(reinterpret_cast<const int8_t*>(w), xp, ldx, bias, y, M, N, K);
    }
    if constexpr (w8a8::available()) {
      if (kind == kW8A8) return w8a8::gemv_for(reinterpret_cast<const uint8_t*>(w), xq, bias, y, M, N, K);
    }
  }
  (void)xq;
  packed::gemv_for_layout(kind != 0, w, xp, ldx, bias, y, M, N, K);
}

}  // namespace jr
