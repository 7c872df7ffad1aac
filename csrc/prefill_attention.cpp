// The `prefill_attention` op: o = softmax(q k^T * scale) v for bf16 q, k, v on AVX512_BF16, the attention of a
// prefill (SigLIP's 576 patches, the LLM's prompt), where torch's CPU SDPA ran at 108-179 GFLOP/s against a ~1 TFLOP/s
// bf16 matmul peak (bench/RESULTS.md, 2026-12-06).
//   q [B, Tq, H, D], k, v [B, Tk, Hkv, D], o [B, Tq, H, D], all bf16 and contiguous; H % Hkv == 0 (query head h
//   reads kv head h / (H / Hkv)); D a multiple of 16, at most kPrefillMaxD. causal: aligned bottom-right (Tq <= Tk):
//   query i sees keys j <= i + Tk - Tq.
// First each (b, kv head)'s K and V are repacked into the pairs VDPBF16PS multiplies (one instruction: 16 lanes x 2
// bf16 products added to 16 fp32 sums):
//   kp [Tk / 16 blocks][D / 2][16 keys] of (k[key][2e], k[key][2e + 1]): a vector scores 16 keys over 2 elements of D;
//   vp [Tk / 2][D] of (v[2j][d], v[2j + 1][d]): a vector adds two keys' p v to 16 elements of an output row.
// Then each task (b, h, 16 queries) runs an online softmax over 16-key blocks, 8 query rows at a time: scores in fp32
// (exact products, summed in pairs), exp in fp32 (simd::exp), the weights rounded to bf16 for p v (as torch's CPU
// flash attention does for bf16) while l sums them unrounded, o accumulated in fp32 and rounded to bf16 once.
// Keys past Tk (the last block's padding) and masked keys get weight 0. A row with a NaN or +inf score comes out NaN.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "common.h"
#include "simd.h"

namespace jr {

constexpr int64_t kPrefillMaxD = 256;  // head dims up to this (a multiple of 16)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
namespace {

constexpr int64_t kKeys = 16;    // keys a block (one vector of scores)
constexpr int64_t kQueries = 16;  // queries a task
constexpr int64_t kRowsAtOnce = 8;  // query rows scored together (independent accumulators)

inline uint32_t pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// kp, vp of one (b, kv head): k, v point at its token 0, `ld` elements from one token to the next.
void repack(const uint16_t* k, const uint16_t* v, int64_t ld, int64_t Tk, int64_t D, uint32_t* kp, uint16_t* vp) {
  const int64_t blocks = (Tk + kKeys - 1) / kKeys, E = D / 2;
  for (int64_t kb = 0; kb < blocks; ++kb)
    for (int64_t j = 0; j < kKeys; ++j) {
      const int64_t key = kb * kKeys + j;
      for (int64_t e = 0; e < E; ++e) kp[(kb * E + e) * kKeys + j] = key < Tk ? pair(k + key * ld + 2 * e) : 0u;
    }
  for (int64_t j2 = 0; j2 < blocks * kKeys / 2; ++j2)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t a = 2 * j2, b = a + 1;
      vp[(j2 * D + d) * 2] = a < Tk ? v[a * ld + d] : uint16_t(0);
      vp[(j2 * D + d) * 2 + 1] = b < Tk ? v[b * ld + d] : uint16_t(0);
    }
}

// Queries [i0, i0 + n) (n <= kRowsAtOnce) of one (b, h): their state m, l [n], acc [n][D] (fp32), and o written at
// the end by the caller. q rows at q + r * ldq.
void rows_task(const uint16_t* q, int64_t ldq, int64_t n, int64_t i0, const uint32_t* kp, const uint16_t* vp,
               int64_t Tk, int64_t D, int64_t shift, bool causal, float scale, float* m, float* l, float* acc,
               bool* poisoned) {
  const int64_t E = D / 2, blocks = (Tk + kKeys - 1) / kKeys;
  // the last key any of these rows sees: causal, row i sees keys <= i + shift
  const int64_t last_key = causal ? std::min(Tk - 1, i0 + n - 1 + shift) : Tk - 1;
  const int64_t kb_end = std::min(blocks, last_key / kKeys + 1);
  alignas(64) uint16_t pb[kRowsAtOnce][kKeys];  // this block's weights in bf16, row by row
  for (int64_t kb = 0; kb < kb_end; ++kb) {
    __m512 s[kRowsAtOnce];
    for (int64_t r = 0; r < kRowsAtOnce; ++r) s[r] = _mm512_setzero_ps();
    const uint32_t* kv = kp + kb * E * kKeys;
    const auto qpair = [&](int64_t r, int64_t e) {
      return (__m512bh)_mm512_set1_epi32(int(pair(q + r * ldq + 2 * e)));
    };
    if (n == kRowsAtOnce) {  // (a fixed count keeps the accumulators in registers)
      for (int64_t e = 0; e < E; ++e) {
        const __m512bh kvec = (__m512bh)_mm512_loadu_si512(kv + e * kKeys);
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRowsAtOnce; ++r) s[r] = _mm512_dpbf16_ps(s[r], qpair(r, e), kvec);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const __m512bh kvec = (__m512bh)_mm512_loadu_si512(kv + e * kKeys);
        for (int64_t r = 0; r < n; ++r) s[r] = _mm512_dpbf16_ps(s[r], qpair(r, e), kvec);
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = i0 + r;
      const int64_t visible = std::min(Tk, causal ? i + shift + 1 : Tk) - kb * kKeys;  // keys of this block it sees
      if (visible <= 0) {
        std::fill(pb[r], pb[r] + kKeys, uint16_t(0));
        continue;
      }
      const __mmask16 valid = visible >= kKeys ? __mmask16(0xffff) : __mmask16((1u << visible) - 1u);
      const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid,
                                           _mm512_mul_ps(s[r], _mm512_set1_ps(scale)));
      // a NaN or +inf score makes the row NaN, as torch's softmax does (the max and exp below would hide it)
      const __mmask16 bad = _mm512_mask_cmp_ps_mask(valid, sc, sc, _CMP_UNORD_Q) |
                            _mm512_mask_cmp_ps_mask(valid, sc, _mm512_set1_ps(std::numeric_limits<float>::infinity()),
                                                    _CMP_EQ_OQ);
      if (bad) poisoned[r] = true;
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(sc));
      const float alpha = m_new == m[r] ? 1.0f : std::exp(m[r] - m_new);  // 0 on the row's first block (m = -inf)
      const __m512 p = _mm512_maskz_mov_ps(valid, simd::exp(_mm512_sub_ps(sc, _mm512_set1_ps(m_new))));
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(p);
      m[r] = m_new;
      float* a = acc + r * D;
      if (alpha != 1.0f)
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_set1_ps(alpha)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb[r]), (__m256i)_mm512_cvtneps_pbh(p));
    }
    // acc[r] += sum over the block's keys of p[r][key] v[key]: two keys a VDPBF16PS, 16 elements of D a vector
    const uint16_t* vb = vp + kb * kKeys * D;
    for (int64_t r = 0; r < n; ++r) {
      float* a = acc + r * D;
      const auto w = [&](int64_t j2) { return (__m512bh)_mm512_set1_epi32(int(pair(&pb[r][2 * j2]))); };
      const auto vv = [&](int64_t j2, int64_t d) { return (__m512bh)_mm512_loadu_si512(vb + (j2 * D + d) * 2); };
      int64_t d0 = 0;
      for (; d0 + 64 <= D; d0 += 64) {  // 4 vectors of the row at a time (named: an array went to the stack)
        __m512 o0 = _mm512_loadu_ps(a + d0), o1 = _mm512_loadu_ps(a + d0 + 16);
        __m512 o2 = _mm512_loadu_ps(a + d0 + 32), o3 = _mm512_loadu_ps(a + d0 + 48);
        for (int64_t j2 = 0; j2 < kKeys / 2; ++j2) {
          const __m512bh wj = w(j2);
          o0 = _mm512_dpbf16_ps(o0, wj, vv(j2, d0)), o1 = _mm512_dpbf16_ps(o1, wj, vv(j2, d0 + 16));
          o2 = _mm512_dpbf16_ps(o2, wj, vv(j2, d0 + 32)), o3 = _mm512_dpbf16_ps(o3, wj, vv(j2, d0 + 48));
        }
        _mm512_storeu_ps(a + d0, o0), _mm512_storeu_ps(a + d0 + 16, o1);
        _mm512_storeu_ps(a + d0 + 32, o2), _mm512_storeu_ps(a + d0 + 48, o3);
      }
      for (; d0 < D; d0 += 16) {
        __m512 o0 = _mm512_loadu_ps(a + d0);
        for (int64_t j2 = 0; j2 < kKeys / 2; ++j2) o0 = _mm512_dpbf16_ps(o0, w(j2), vv(j2, d0));
        _mm512_storeu_ps(a + d0, o0);
      }
    }
  }
}

}  // namespace
#endif

bool prefill_attention_available() {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

void prefill_attention(std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t v_ptr, std::uintptr_t o_ptr,
                       int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Hkv, int64_t D, bool causal,
                       double scale) {
  JR_CHECK(prefill_attention_available(), "this build has no bf16 prefill attention (needs AVX512_BF16)");
  JR_CHECK(q_ptr && k_ptr && v_ptr && o_ptr, "null pointer");
  JR_CHECK(B >= 1 && Tq >= 1 && Tk >= 1 && H >= 1 && Hkv >= 1 && H % Hkv == 0,
           "need B, Tq, Tk, H, Hkv >= 1, H % Hkv == 0");
  JR_CHECK(D >= 16 && D % 16 == 0 && D <= kPrefillMaxD, "D must be a multiple of 16 up to 256");
  JR_CHECK(!causal || Tq <= Tk, "causal attention needs Tq <= Tk (aligned bottom-right)");
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const uint16_t *q = ptr<const uint16_t>(q_ptr), *k = ptr<const uint16_t>(k_ptr), *v = ptr<const uint16_t>(v_ptr);
  uint16_t* o = ptr<uint16_t>(o_ptr);
  const int64_t G = H / Hkv, blocks = (Tk + kKeys - 1) / kKeys, Tkp = blocks * kKeys;
  std::vector<uint32_t> kp(size_t(B * Hkv * Tkp * D / 2));
  std::vector<uint16_t> vp(size_t(B * Hkv * Tkp * D));
  const int64_t qblocks = (Tq + kQueries - 1) / kQueries;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      repack(k + (b * Tk * Hkv + hk) * D, v + (b * Tk * Hkv + hk) * D, Hkv * D, Tk, D,
             kp.data() + bh * Tkp * D / 2, vp.data() + bh * Tkp * D);
    }
    std::vector<float> acc(size_t(kRowsAtOnce * D));
    float m[kRowsAtOnce], l[kRowsAtOnce];
    bool poisoned[kRowsAtOnce];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * H * qblocks; ++task) {
      const int64_t b = task / (H * qblocks), h = task / qblocks % H, qb = task % qblocks;
      const int64_t bh = b * Hkv + h / G;
      for (int64_t i0 = qb * kQueries; i0 < std::min(Tq, (qb + 1) * kQueries); i0 += kRowsAtOnce) {
        const int64_t n = std::min(kRowsAtOnce, Tq - i0);
        std::fill(m, m + n, -std::numeric_limits<float>::infinity());
        std::fill(l, l + n, 0.0f);
        std::fill(poisoned, poisoned + n, false);
        std::fill(acc.begin(), acc.end(), 0.0f);
        rows_task(q + ((b * Tq + i0) * H + h) * D, H * D, n, i0, kp.data() + bh * Tkp * D / 2, vp.data() + bh * Tkp * D,
                  Tk, D, Tk - Tq, causal, float(scale), m, l, acc.data(), poisoned);
        for (int64_t r = 0; r < n; ++r) {
          const float inv = poisoned[r] ? std::numeric_limits<float>::quiet_NaN() : l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
          uint16_t* out = o + ((b * Tq + i0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) out[d] = float_to_bf16(acc[r * D + d] * inv);
        }
      }
    }
  }
#endif
}

}  // namespace jr
