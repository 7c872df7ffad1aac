// One vector type `vf` of kWidth fp32 lanes: AVX-512, else AVX2+FMA, else a scalar "vector" of one lane.
// Kernels are written once against these few functions; the scalar build (JANUS_RT_PORTABLE=1) is the reference
// for the vector ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace jr::simd {

// Whether the build has the bf16 dot product (VDPBF16PS): gemv.h's bf16 route and packed_gemv.h's bf16 weights.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool kHaveBf16Dot = true;
#else
constexpr bool kHaveBf16Dot = false;
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The sum of 8 fp32 lanes (AVX2 and AVX-512 builds: kernels with an 8-lane stage whatever kWidth is).
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__)

using vf = __m512;
constexpr int kWidth = 16;
constexpr const char* kIsa = "avx512";
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float a) { return _mm512_set1_ps(a); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf a) { _mm512_storeu_ps(p, a); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf round_int(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// |a|, and |mag| with sgn's sign bit (bit operations).
inline vf abs(vf a) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
}
inline vf copysign(vf mag, vf sgn) {
  const __m512i m = _mm512_and_si512(_mm512_castps_si512(mag), _mm512_set1_epi32(0x7fffffff));
  const __m512i s = _mm512_and_si512(_mm512_castps_si512(sgn), _mm512_set1_epi32(int(0x80000000u)));
  return _mm512_castsi512_ps(_mm512_or_si512(m, s));
}
// 2^n for whole n in [-126, 127] (as fp32 lanes).
inline vf pow2i(vf n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// Each lane rounded to the nearest bf16 (ties to even), NaN kept quiet: float_to_bf16 then back, in a vector.
inline vf round_bf16(vf a) {
  const __m512i b = _mm512_castps_si512(a);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __m512i q = _mm512_or_si512(b, _mm512_set1_epi32(0x400000));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_mask_blend_epi32(nan, r, q), _mm512_set1_epi32(int(0xffff0000u))));
}
inline float hsum(vf a) { return _mm512_reduce_add_ps(a); }
// 16 lanes -> 8: lane i + lane i + 8.
inline __m256 fold8(vf a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
inline float hmin(vf a) { return _mm512_reduce_min_ps(a); }
// kWidth bf16 -> fp32.
inline vf load_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// kWidth int8 -> fp32 (exact); and back: lanes holding whole numbers in [-128, 127] stored as int8.
inline vf load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void store_i8(int8_t* p, vf a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
}
// 2*kWidth bf16 read as kWidth 32-bit words: the low half of each word is the even element, the high half the odd.
inline void load_bf16_pairs(const uint16_t* p, vf& even, vf& odd) {
  __m512i w = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
}

#elif defined(__AVX2__) && defined(__FMA__)

using vf = __m256;
constexpr int kWidth = 8;
constexpr const char* kIsa = "avx2";
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float a) { return _mm256_set1_ps(a); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf a) { _mm256_storeu_ps(p, a); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf round_int(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf abs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
inline vf copysign(vf mag, vf sgn) {
  return _mm256_or_ps(_mm256_and_ps(mag, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
                      _mm256_and_ps(sgn, _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)))));
}
inline vf pow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vf round_bf16(vf a) {
  const __m256i b = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256i q = _mm256_or_si256(b, _mm256_set1_epi32(0x400000));
  // |b| > 0x7f800000 as signed 32-bit compares (both sides are non-negative)
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_blendv_epi8(r, q, nan), _mm256_set1_epi32(int(0xffff0000u))));
}
inline float hsum(vf a) { return hsum8(a); }
inline __m256 fold8(vf a) { return a; }
inline float hmin(vf a) {
  __m128 s = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_min_ps(s, _mm_movehl_ps(s, s));
  s = _mm_min_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf load_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void store_i8(int8_t* p, vf a) {
  alignas(32) int32_t w[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_cvtps_epi32(a));
  for (int i = 0; i < 8; ++i) p[i] = int8_t(w[i]);
}
inline void load_bf16_pairs(const uint16_t* p, vf& even, vf& odd) {
  __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u))));
}

#else

using vf = float;
constexpr int kWidth = 1;
constexpr const char* kIsa = "scalar";
inline vf zero() { return 0.0f; }
inline vf set1(float a) { return a; }
inline vf load(const float* p) { return *p; }
inline void store(float* p, vf a) { *p = a; }
inline vf add(vf a, vf b) { return a + b; }
inline vf sub(vf a, vf b) { return a - b; }
inline vf mul(vf a, vf b) { return a * b; }
inline vf min(vf a, vf b) { return b < a ? b : a; }
inline vf fma(vf a, vf b, vf c) { return a * b + c; }
inline vf div(vf a, vf b) { return a / b; }
inline vf max(vf a, vf b) { return a < b ? b : a; }
inline vf round_int(vf a) { return __builtin_nearbyintf(a); }
inline vf abs(vf a) { return __builtin_fabsf(a); }
inline vf copysign(vf mag, vf sgn) { return __builtin_copysignf(mag, sgn); }
inline vf pow2i(vf n) {
  // n is NaN where exp's argument was (int32_t(NaN) is undefined; the vector builds' conversion gives INT_MIN): any
  // bits do then, the polynomial the result is multiplied by is NaN already
  const uint32_t bits = uint32_t((n == n ? int32_t(n) : 0) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline vf round_bf16(vf a) { return rnd<uint16_t>(a); }
inline float hsum(vf a) { return a; }
inline float hmin(vf a) { return a; }
inline vf load_bf16(const uint16_t* p) {
  uint32_t bits = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline vf load_i8(const int8_t* p) { return float(*p); }
inline void store_i8(int8_t* p, vf a) { *p = int8_t(a); }
inline void load_bf16_pairs(const uint16_t* p, vf& even, vf& odd) {
  uint32_t w, e, o;
  std::memcpy(&w, p, sizeof(w));
  e = w << 16;
  o = w & 0xffff0000u;
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

#endif

// e^x per lane, ~1-2 ulp over the finite range (Cephes' expf: x = n ln2 + r with ln2 in two parts, a degree-5
// polynomial in r, 2^n through the exponent bits, as 2^min(n, 127) * 2^(n - min(n, 127)) so that n = 128 works).
// Below -87.3 it returns e^-87.3 ~ 1e-38 instead of a smaller number or 0; above ln(FLT_MAX) ~ 88.72, inf.
// exp's parts: n = round(x / ln 2), and e^r for r = x - n ln 2 (ln 2 in two parts), so that e^x = 2^n e^r.
inline vf exp_round(vf x) { return round_int(mul(x, set1(1.44269504088896341f))); }
inline vf exp_reduced(vf x, vf n) {
  vf r = fma(n, set1(-0.693359375f), x);
  r = fma(n, set1(2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  return fma(p, mul(r, r), add(r, set1(1.0f)));
}

inline vf exp(vf x) {
  x = min(max(x, set1(-87.33654475f)), set1(89.0f));
  const vf n = exp_round(x);
  const vf p = exp_reduced(x, n);
  const vf n1 = min(n, set1(127.0f));
  return mul(mul(p, pow2i(n1)), pow2i(sub(n, n1)));
}

// erf(x) per lane to ~1.5e-7 absolute: Abramowitz & Stegun 7.1.26, erf(|x|) = 1 - t (a1 + a2 t + ... + a5 t^4)
// e^(-x^2) with t = 1 / (1 + p |x|), odd in x (the form torch's own vectorized erf takes, so GELU(erf) here and in
// torch agree to about an ulp). erf(+-inf) = +-1, NaN stays NaN.
inline vf erf(vf x) {
  const vf ax = abs(x);
  const vf t = div(set1(1.0f), fma(set1(0.3275911f), ax, set1(1.0f)));
  vf p = fma(set1(1.061405429f), t, set1(-1.453152027f));
  p = fma(p, t, set1(1.421413741f));
  p = fma(p, t, set1(-0.284496736f));
  p = fma(p, t, set1(0.254829592f));
  const vf e = exp(mul(sub(zero(), ax), ax));
  return copysign(sub(set1(1.0f), mul(mul(p, t), e)), x);
}

// The first r < kWidth lanes of p, the rest 0 / the first r lanes of v to p: a vector loop's tail through the same
// vector code as its body (so the tail's lanes get the body's bits).
inline vf load_partial(const float* p, int64_t r) {
  float b[kWidth] = {};
  std::copy(p, p + r, b);
  return load(b);
}
inline void store_partial(float* p, vf v, int64_t r) {
  float b[kWidth];
  store(b, v);
  std::copy(b, b + r, p);
}

// Load kWidth elements of either element type as fp32.
inline vf load_as_float(const float* p) { return load(p); }
inline vf load_as_float(const uint16_t* p) { return load_bf16(p); }
inline vf load_as_float(const int8_t* p) { return load_i8(p); }

// dst[0:n] = src[0:n] as fp32, a vector at a time (bf16 widened exactly; fp32 copied).
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) store(dst + i, load_as_float(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace jr::simd
