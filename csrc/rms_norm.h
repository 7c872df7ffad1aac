// RMSNorm of one row in vectors with the torch path's rounding points (ops.rms_norm_torch): used by decode_layer (the
// decode step's norms) and the `rms_norm` op (prefill-sized rows; tested against kernels/rms_norm.py's reference).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"
#include "simd.h"
#include "swiglu.h"

namespace jr::norm {

// out [C] fp32 (values of T) = weight * T(x * rsqrt(mean(x^2) + eps)), as ops.rms_norm_torch. The sum of squares
// runs in 4 vectors of lanes (a fixed order for a given C and build, so a row's result does not depend on its batch);
// one scalar chain of C dependent adds had made the two norm phases ~1.3 ms longer per Janus-Pro-1B step
// (bench/RESULTS.md, 2026-12-03, eighth session).
template <typename T>
inline void rms_norm_row(const T* x, const T* w, float* out, int64_t C, float eps) {
  using namespace simd;
  vf s0 = zero(), s1 = zero(), s2 = zero(), s3 = zero();
  int64_t c = 0;
  for (; c + 4 * kWidth <= C; c += 4 * kWidth) {
    const vf a = load_as_float(x + c), b = load_as_float(x + c + kWidth);
    const vf d = load_as_float(x + c + 2 * kWidth), e = load_as_float(x + c + 3 * kWidth);
    s0 = fma(a, a, s0);
    s1 = fma(b, b, s1);
    s2 = fma(d, d, s2);
    s3 = fma(e, e, s3);
  }
  for (; c + kWidth <= C; c += kWidth) {
    const vf a = load_as_float(x + c);
    s0 = fma(a, a, s0);
  }
  float ss = hsum(add(add(s0, s1), add(s2, s3)));
  for (; c < C; ++c) ss += to_float(x[c]) * to_float(x[c]);
  const float inv = 1.0f / std::sqrt(ss / float(C) + eps);
  const vf vinv = set1(inv);
  c = 0;
  for (; c + kWidth <= C; c += kWidth)
    store(out + c, act::rnd_v<T>(mul(load_as_float(w + c), act::rnd_v<T>(mul(load_as_float(x + c), vinv)))));
  for (; c < C; ++c) out[c] = rnd<T>(to_float(w[c]) * rnd<T>(to_float(x[c]) * inv));
}

}  // namespace jr::norm
