// The int8 KV cache's rows: each cached (token, head) as D int8 values q and one fp32 scale s, x ~ q * s, symmetric
// with s = max|x| * fp32(1/127) and q = round-half-even(x / s) (s = 0 and q = 0 for an all-zero head). The same
// operations as the PyTorch reference (engine/kv_quant.py: quantize_kv), so both write the same bytes: one fp32
// multiply for s (torch turns a division by a Python number into a multiply by its reciprocal: so does this), an
// fp32 division per value, ties to even. Used by decode_layer (the decode step's new K and V) and the kv_quantize op
// (kv_quantize.cpp: the prefill's store, kv_cache.KVCache.store).
// Caches [num_blocks, block_size, H, D] int8 and scales [num_blocks, block_size, H] fp32; the attention
// (paged_attention.h) folds the scales into the scores (K) and the softmax weights (V).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "simd.h"

namespace jr::kv8 {

// q[0:D], *scale = x[0:D] quantized (x fp32). A head holding a NaN or an infinity: scale NaN, q = 0 (it reads back
// as NaN, as the float rows would; quantize_kv's rule).
inline void quantize_head(const float* x, int8_t* q, float* scale, int64_t D) {
  using namespace simd;
  int64_t d = 0;
  vf m = zero(), z = zero();  // z: the sum of x * 0, NaN exactly where some x is not finite
  for (; d + kWidth <= D; d += kWidth) {
    const vf v = load(x + d);
    m = max(m, abs(v));
    z = add(z, mul(v, zero()));
  }
  float amax = 0.0f, zs = 0.0f;
  {
    alignas(64) float lanes[kWidth], zl[kWidth];
    store(lanes, m);
    store(zl, z);
    for (int i = 0; i < kWidth; ++i) amax = std::max(amax, lanes[i]), zs += zl[i];
  }
  for (; d < D; ++d) amax = std::max(amax, std::fabs(x[d])), zs += x[d] * 0.0f;
  const float s = zs == 0.0f ? amax * (1.0f / 127.0f) : std::numeric_limits<float>::quiet_NaN();
  *scale = s;
  if (!(s > 0.0f)) {  // all zero, or not finite
    std::fill(q, q + D, int8_t(0));
    return;
  }
  const vf sv = set1(s), lo = set1(-127.0f), hi = set1(127.0f);
  for (d = 0; d + kWidth <= D; d += kWidth) store_i8(q + d, min(max(round_int(div(load(x + d), sv)), lo), hi));
  for (; d < D; ++d) q[d] = int8_t(std::min(std::max(std::nearbyint(x[d] / s), -127.0f), 127.0f));
}

}  // namespace jr::kv8
