// The int8 KV cache's rows: each cached (token, head) as D int8 values q and one fp32 scale s, x ~ q * s, symmetric
// with s = max|x| * fp32(1/127) and q = round-half-even(x / s) (s = 0 and q = 0 for an all-zero head). The same
// operations as the PyTorch reference (engine/kv_quant.py: quantize_kv), so both write the same bytes: one fp32
// multiply for s (torch turns a division by a Python number into a multiply by its reciprocal: so does this), an
// fp32 division per value, ties to even. Used by decode_layer (the decode step's new K and V) and, through that reference, the prefill's store.
// Caches [num_blocks, block_size, H, D] int8 and scales [num_blocks, block_size, H] fp32; the attention
// (paged_attention.h) folds the scales into the scores (K) and the softmax weights (V).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace jr::kv8 {

// q[0:D], *scale = x[0:D] quantized (x fp32, finite).
inline void quantize_head(const float* x, int8_t* q, float* scale, int64_t D) {
  using namespace simd;
  int64_t d = 0;
  vf m = zero();
  for (; d + kWidth <= D; d += kWidth) m = max(m, abs(load(x + d)));
  float amax = 0.0f;
  {
    alignas(64) float lanes[kWidth];
    store(lanes, m);
    for (int i = 0; i < kWidth; ++i) amax = std::max(amax, lanes[i]);
  }
  for (; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float s = amax * (1.0f / 127.0f);
  *scale = s;
  if (!(s > 0.0f)) {
    std::fill(q, q + D, int8_t(0));
    return;
  }
  const vf sv = set1(s), lo = set1(-127.0f), hi = set1(127.0f);
  for (d = 0; d + kWidth <= D; d += kWidth) store_i8(q + d, min(max(round_int(div(load(x + d), sv)), lo), hi));
  for (; d < D; ++d) q[d] = int8_t(std::min(std::max(std::nearbyint(x[d] / s), -127.0f), 127.0f));
}

}  // namespace jr::kv8
