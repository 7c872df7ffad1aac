// SwiGLU's elementwise half, silu(gate) * up, in vectors with the torch path's rounding points for a model dtype T:
//   a = T(T(silu(T(g))) * T(u)),   silu(x) = x / (1 + e^-x)
// used by decode_layer (on its fp32 gate/up GEMV outputs) and the `swiglu` op (on T tensors; tested against
// kernels/swiglu.py's reference). e^-x is simd::exp (~1-2 ulp; torch's own vector exp is another approximation), so
// fp32 results agree with torch's to a few ulp and bf16 ones after rounding; e^-x overflows to inf as torch's does
// (silu(x) = -0 below x ~ -88.7, NaN at -inf).
// Also the rounding to T's values in vectors that the other csrc kernels share (rnd_v, round_to, store_values).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "simd.h"

namespace jr::act {

// Lanes of T's values (rounded to bf16 when T is bf16).
template <typename T>
inline simd::vf rnd_v(simd::vf v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return simd::round_bf16(v);
}

// x[0:n] = rnd<T>(x) in place: the values a T tensor holds (rnd_v per vector: the scalar rnd's bits).
template <typename T>
inline void round_to(float* x, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + simd::kWidth <= n; i += simd::kWidth) simd::store(x + i, rnd_v<T>(simd::load(x + i)));
    for (; i < n; ++i) x[i] = rnd<T>(x[i]);
  }
}

// dst[0:n] = x, whose values are already values of T: bf16 keeps the top half of each fp32 (exact, and what
// from_float gives for them), a loop the compiler vectorizes.
template <typename T>
inline void store_values(const float* x, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, x, size_t(n) * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, sizeof(bits));
      dst[i] = uint16_t(bits >> 16);
    }
  }
}

// a [n] = T(T(silu(T(g))) * T(u)) from fp32 g, u; the last n % kWidth lanes through the same code (load_partial).
template <typename T>
inline void silu_mul(const float* g, const float* u, float* a, int64_t n) {
  using namespace simd;
  auto one = [](vf gv, vf uv) {
    gv = rnd_v<T>(gv);
    const vf s = rnd_v<T>(div(gv, add(set1(1.0f), simd::exp(sub(zero(), gv)))));
    return rnd_v<T>(mul(s, rnd_v<T>(uv)));
  };
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) store(a + i, one(load(g + i), load(u + i)));
  if (i < n) store_partial(a + i, one(load_partial(g + i, n - i), load_partial(u + i, n - i)), n - i);
}

}  // namespace jr::act
