// Rotary position embedding of one head in vectors with the torch path's rounding points (ops.rope_torch): used by
// decode_layer (q and k of the decode step) and the `rope` op (prefill-sized rows; tested against
// kernels/rope.py's reference).
#pragma once

#include <cstdint>

#include "common.h"
#include "simd.h"
#include "swiglu.h"

namespace jr::rotary {

// Rotate-half RoPE of one head: out = T(T(x cos) + T(rot(x) sin)), rot(x) = [-x2, x1]; x holds values of T;
// tmp: D floats. In vectors of the two halves (the scalar expression's operations per lane, so the same bits; the
// scalar bf16 rounding of every value had made this phase ~4 % of the Janus-Pro-1B step).
template <typename T>
inline void rope_head(const float* x, const float* cos, const float* sin, T* out, int64_t D, float* tmp) {
  using simd::vf;
  constexpr int kW = simd::kWidth;
  const int64_t half = D / 2;
  auto r = act::rnd_v<T>;
  const vf neg = simd::set1(-1.0f);
  int64_t d = 0;
  for (; d + kW <= half; d += kW) {
    const vf x1 = simd::load(x + d), x2 = simd::load(x + d + half);
    simd::store(tmp + d, r(simd::add(r(simd::mul(x1, simd::load(cos + d))),
                                     r(simd::mul(simd::mul(neg, x2), simd::load(sin + d))))));
    simd::store(tmp + d + half, r(simd::add(r(simd::mul(x2, simd::load(cos + d + half))),
                                            r(simd::mul(x1, simd::load(sin + d + half))))));
  }
  for (; d < half; ++d) {
    tmp[d] = rnd<T>(rnd<T>(x[d] * cos[d]) + rnd<T>(-x[d + half] * sin[d]));
    tmp[d + half] = rnd<T>(rnd<T>(x[d + half] * cos[d + half]) + rnd<T>(x[d] * sin[d + half]));
  }
  act::store_values(tmp, out, D);
}

}  // namespace jr::rotary
