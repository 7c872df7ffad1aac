// The `prefill_attention` op: o = softmax(q k^T * scale) v for bf16 q, k, v on AVX512_BF16, the attention of a
// prefill (SigLIP's 576 patches, the LLM's prompt), where torch's CPU SDPA ran at 108-179 GFLOP/s against a ~1 TFLOP/s
// bf16 matmul peak (bench/RESULTS.md, 2026-12-06).
//   q [B, Tq, H, D], k, v [B, Tk, Hkv, D], o [B, Tq, H, D] contiguous, all bf16; q, k, v with any batch and token
//   strides (q_sb, q_st, ...: elements; a token's heads x D contiguous), so views of a fused qkv projection's output
//   need no copy; H % Hkv == 0 (query head h reads kv head h / (H / Hkv)); D a multiple of 16, at most kPrefillMaxD.
//   causal: aligned bottom-right (Tq <= Tk): query i sees keys j <= i + Tk - Tq.
// First each (b, kv head)'s K and V are repacked into the pairs VDPBF16PS multiplies (one instruction: 16 lanes x 2
// bf16 products added to 16 fp32 sums):
//   kp [Tk / 32 blocks][D / 2][32 keys] of (k[key][2e], k[key][2e + 1]): a vector scores 16 keys over 2 elements of D;
//   vp [Tk / 2][D] of (v[2j][d], v[2j + 1][d]): a vector adds two keys' p v to 16 elements of an output row.
// Then each task (b, h, 16 queries) runs an online softmax over 32-key blocks, 8 query rows scored at a time (two
// vectors of scores a row), and p v 4 rows at a time (each V vector loaded once for the 4): scores in fp32 (exact
// products, summed in pairs), exp in fp32 (exp_nonpositive), the weights rounded to bf16 for p v (as torch's CPU flash
// attention does for bf16) while l sums them unrounded, o accumulated in fp32 and rounded to bf16 once. (16-key
// blocks and p v a row at a time ran at ~37 % of the matmul peak: bench/RESULTS.md, twenty-ninth session.)
// Keys past Tk (the last block's padding) and masked keys get weight 0. A row with a NaN or +inf score comes out NaN.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include "common.h"
#include "simd.h"

namespace jr {

constexpr int64_t kPrefillMaxD = 256;  // head dims up to this (a multiple of 16)

#if defined(__AVX512BF16__) && defined(__AVX512F__)
namespace {

constexpr int64_t kKeys = 32;    // keys a block (two vectors of scores a row)
constexpr int64_t kQueries = 16;  // queries a task
constexpr int64_t kRowsAtOnce = 8;  // query rows scored together (independent accumulators)
constexpr int64_t kPvRows = 4;      // rows whose p v share each loaded V vector (4 rows x 4 vectors of acc)

inline uint32_t pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// kp, vp of one (b, kv head): k, v point at its token 0, ldk / ldv elements from one token to the next.
void repack(const uint16_t* k, const uint16_t* v, int64_t ldk, int64_t ldv, int64_t Tk, int64_t D, uint32_t* kp,
            uint16_t* vp) {
  const int64_t blocks = (Tk + kKeys - 1) / kKeys, E = D / 2;
  for (int64_t kb = 0; kb < blocks; ++kb)
    for (int64_t j = 0; j < kKeys; ++j) {
      const int64_t key = kb * kKeys + j;
      for (int64_t e = 0; e < E; ++e) kp[(kb * E + e) * kKeys + j] = key < Tk ? pair(k + key * ldk + 2 * e) : 0u;
    }
  for (int64_t j2 = 0; j2 < blocks * kKeys / 2; ++j2)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t a = 2 * j2, b = a + 1;
      vp[(j2 * D + d) * 2] = a < Tk ? v[a * ldv + d] : uint16_t(0);
      vp[(j2 * D + d) * 2 + 1] = b < Tk ? v[b * ldv + d] : uint16_t(0);
    }
}

// e^x for x <= 0 (a score minus its row's max), to simd::exp's accuracy and bits for x >= -87.3 (its reduction and
// polynomial: simd::exp_round, exp_reduced; vf is __m512 in this AVX-512 code), with 2^n by VSCALEFPS (no overflow
// to guard against, and smaller x gives denormals or 0); x = -inf gives e^-88 (the caller masks such lanes, and -inf
// scores). A NaN x stays NaN: that is how a NaN or +inf score (+inf: the max is +inf, and inf - inf is NaN) reaches
// its row's sum and output, as torch's softmax makes such a row NaN.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.0f), x);  // (max returns its second operand where one is NaN)
  const __m512 n = simd::exp_round(x);
  return _mm512_scalef_ps(simd::exp_reduced(x, n), n);
}

// Scores of the kRowsAtOnce rows against one block of keys: s0[r] keys 0-15, s1[r] keys 16-31 (unscaled fp32
// sums). qt [E][kRowsAtOnce]: the rows' pairs of q, transposed so that one e's broadcasts sit at fixed offsets (with
// a row stride instead, GCC kept the 8 row offsets on the stack and reloaded them every e).
inline void score_rows(const uint32_t* qt, const uint32_t* kv, int64_t E, __m512* s0, __m512* s1) {
  for (int64_t r = 0; r < kRowsAtOnce; ++r) s0[r] = _mm512_setzero_ps(), s1[r] = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; ++e) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kv + e * kKeys);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kv + e * kKeys + 16);
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRowsAtOnce; ++r) {
      const __m512bh qb = (__m512bh)_mm512_set1_epi32(int(qt[e * kRowsAtOnce + r]));
      s0[r] = _mm512_dpbf16_ps(s0[r], qb, k0);
      s1[r] = _mm512_dpbf16_ps(s1[r], qb, k1);
    }
  }
}

// acc rows [r0, r0 + N) (each scaled by its alpha first) += p v over one block: p in pb (bf16, a row of kKeys
// weights each), vb the block's V pairs. Columns [0, D) in vectors of 16, 4 at a time where they fit; the N rows'
// accumulators stay in registers while each V vector is loaded once for all N.
template <int64_t N>
inline void pv_rows(const uint16_t (*pb)[kKeys], const float* alpha, int64_t r0, const uint16_t* vb, int64_t D,
                    float* acc) {
  const uint16_t* p = pb[r0];  // row r's pair j2 at p + r * kKeys + 2 * j2 (fixed offsets: no pointer a row)
  const auto w = [&](int64_t r, int64_t j2) { return (__m512bh)_mm512_set1_epi32(int(pair(p + r * kKeys + 2 * j2))); };
  const auto vv = [&](int64_t j2, int64_t d) { return (__m512bh)_mm512_loadu_si512(vb + (j2 * D + d) * 2); };
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    __m512 o[N][4];
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < 4; ++c)
        o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + r) * D + d0 + 16 * c), _mm512_set1_ps(alpha[r0 + r]));
    for (int64_t j2 = 0; j2 < kKeys / 2; ++j2) {
      const __m512bh v0 = vv(j2, d0), v1 = vv(j2, d0 + 16), v2 = vv(j2, d0 + 32), v3 = vv(j2, d0 + 48);
#pragma GCC unroll 4
      for (int64_t r = 0; r < N; ++r) {
        const __m512bh wr = w(r, j2);
        o[r][0] = _mm512_dpbf16_ps(o[r][0], wr, v0), o[r][1] = _mm512_dpbf16_ps(o[r][1], wr, v1);
        o[r][2] = _mm512_dpbf16_ps(o[r][2], wr, v2), o[r][3] = _mm512_dpbf16_ps(o[r][3], wr, v3);
      }
    }
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < 4; ++c) _mm512_storeu_ps(acc + (r0 + r) * D + d0 + 16 * c, o[r][c]);
  }
  for (; d0 < D; d0 += 16) {
    __m512 o[N];
    for (int64_t r = 0; r < N; ++r)
      o[r] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + r) * D + d0), _mm512_set1_ps(alpha[r0 + r]));
    for (int64_t j2 = 0; j2 < kKeys / 2; ++j2) {
      const __m512bh v0 = vv(j2, d0);
      for (int64_t r = 0; r < N; ++r) o[r] = _mm512_dpbf16_ps(o[r], w(r, j2), v0);
    }
    for (int64_t r = 0; r < N; ++r) _mm512_storeu_ps(acc + (r0 + r) * D + d0, o[r]);
  }
}

// Queries [i0, i0 + n) (n <= kRowsAtOnce) of one (b, h): their state m [n], l [n][16] (each row's sum of weights in
// 16 lanes, added up by the caller: a horizontal sum a block was ~10 % of the time), acc [n][D] (fp32), and o
// written at the end by the caller. q rows at q + r * ldq.
void rows_task(const uint16_t* q, int64_t ldq, int64_t n, int64_t i0, const uint32_t* kp, const uint16_t* vp,
               int64_t Tk, int64_t D, int64_t shift, bool causal, float scale, float* m, float* l, float* acc) {
  const int64_t E = D / 2, blocks = (Tk + kKeys - 1) / kKeys;
  // the last key any of these rows sees: causal, row i sees keys <= i + shift
  const int64_t last_key = causal ? std::min(Tk - 1, i0 + n - 1 + shift) : Tk - 1;
  const int64_t kb_end = std::min(blocks, last_key / kKeys + 1);
  alignas(64) uint32_t qt[kPrefillMaxD / 2 * kRowsAtOnce];  // the rows' q pairs, [E][kRowsAtOnce] (rows >= n: 0)
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < kRowsAtOnce; ++r) qt[e * kRowsAtOnce + r] = r < n ? pair(q + r * ldq + 2 * e) : 0u;
  alignas(64) uint16_t pb[kRowsAtOnce][kKeys];  // this block's weights in bf16, row by row
  float alpha[kRowsAtOnce];                      // each row's rescale of acc for this block
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t kb = 0; kb < kb_end; ++kb) {
    __m512 s0[kRowsAtOnce], s1[kRowsAtOnce];
    const uint32_t* kv = kp + kb * E * kKeys;
    score_rows(qt, kv, E, s0, s1);  // (all kRowsAtOnce rows, a fixed count that keeps the sums in registers)
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = i0 + r;
      const int64_t visible = std::min(Tk, causal ? i + shift + 1 : Tk) - kb * kKeys;  // keys of this block it sees
      alpha[r] = 1.0f;
      if (visible <= 0) {
        std::fill(pb[r], pb[r] + kKeys, uint16_t(0));
        continue;
      }
      const uint32_t bits = visible >= kKeys ? ~0u : (1u << visible) - 1u;
      const __mmask16 v0 = __mmask16(bits), v1 = __mmask16(bits >> 16);
      const __m512 sc0 = _mm512_mask_mul_ps(minus_inf, v0, s0[r], _mm512_set1_ps(scale));
      const __m512 sc1 = _mm512_mask_mul_ps(minus_inf, v1, s1[r], _mm512_set1_ps(scale));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(_mm512_max_ps(sc0, sc1)));
      alpha[r] = m_new == m[r] ? 1.0f : std::exp(m[r] - m_new);  // 0 on the row's first block (m = -inf)
      const __m512 mv = _mm512_set1_ps(m_new);
      // weight 0 for masked keys and -inf scores (where m_new is -inf too, sc - m_new would be NaN); NEQ_UQ holds
      // for NaN, so a NaN score still reaches the row
      const __mmask16 f0 = _mm512_mask_cmp_ps_mask(v0, sc0, minus_inf, _CMP_NEQ_UQ);
      const __mmask16 f1 = _mm512_mask_cmp_ps_mask(v1, sc1, minus_inf, _CMP_NEQ_UQ);
      const __m512 p0 = _mm512_maskz_mov_ps(f0, exp_nonpositive(_mm512_sub_ps(sc0, mv)));
      const __m512 p1 = _mm512_maskz_mov_ps(f1, exp_nonpositive(_mm512_sub_ps(sc1, mv)));
      _mm512_storeu_ps(l + 16 * r, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * r), _mm512_set1_ps(alpha[r]),
                                                   _mm512_add_ps(p0, p1)));
      m[r] = m_new;
      _mm512_store_si512(pb[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));  // keys 0-15 low, 16-31 high
    }
    // acc[r] = alpha[r] acc[r] + sum over the block's keys of p[r][key] v[key]: two keys a VDPBF16PS
    const uint16_t* vb = vp + kb * kKeys * D;
    int64_t r0 = 0;
    for (; r0 + kPvRows <= n; r0 += kPvRows) pv_rows<kPvRows>(pb, alpha, r0, vb, D, acc);
    for (; r0 < n; ++r0) pv_rows<1>(pb, alpha, r0, vb, D, acc);
  }
}

// The repacked K and V of a call, kept by the calling thread from call to call and grown only when a call needs
// more: allocated afresh (and zeroed, as a std::vector is), each call of the 1B prompt's 5 MB faulted its pages in
// anew — in an understanding prefill the 48 calls averaged 3.8 ms where the kernel alone takes ~2.4. Every element
// a call reads is written by its repack first, so the buffers need no initialising.
struct Repacked {
  size_t k_size = 0, v_size = 0;
  std::unique_ptr<uint32_t[]> kp;
  std::unique_ptr<uint16_t[]> vp;
};

Repacked& repacked(size_t k_size, size_t v_size) {
  thread_local Repacked b;
  if (k_size > b.k_size) b.kp.reset(new uint32_t[k_size]), b.k_size = k_size;
  if (v_size > b.v_size) b.vp.reset(new uint16_t[v_size]), b.v_size = v_size;
  return b;
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
                       double scale, int64_t q_sb, int64_t q_st, int64_t k_sb, int64_t k_st, int64_t v_sb,
                       int64_t v_st) {
  JR_CHECK(prefill_attention_available(), "this build has no bf16 prefill attention (needs AVX512_BF16)");
  JR_CHECK(q_ptr && k_ptr && v_ptr && o_ptr, "null pointer");
  JR_CHECK(B >= 1 && Tq >= 1 && Tk >= 1 && H >= 1 && Hkv >= 1 && H % Hkv == 0,
           "need B, Tq, Tk, H, Hkv >= 1, H % Hkv == 0");
  JR_CHECK(D >= 16 && D % 16 == 0 && D <= kPrefillMaxD, "D must be a multiple of 16 up to 256");
  JR_CHECK(!causal || Tq <= Tk, "causal attention needs Tq <= Tk (aligned bottom-right)");
  JR_CHECK(q_st >= H * D && k_st >= Hkv * D && v_st >= Hkv * D && q_sb >= 0 && k_sb >= 0 && v_sb >= 0,
           "token strides must cover a token's heads (each token's heads x D contiguous)");
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const uint16_t *q = ptr<const uint16_t>(q_ptr), *k = ptr<const uint16_t>(k_ptr), *v = ptr<const uint16_t>(v_ptr);
  uint16_t* o = ptr<uint16_t>(o_ptr);
  const int64_t G = H / Hkv, blocks = (Tk + kKeys - 1) / kKeys, Tkp = blocks * kKeys;
  Repacked& buf = repacked(size_t(B * Hkv * Tkp * D / 2), size_t(B * Hkv * Tkp * D));
  uint32_t* const kp = buf.kp.get();
  uint16_t* const vp = buf.vp.get();
  const int64_t qblocks = (Tq + kQueries - 1) / kQueries;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      repack(k + b * k_sb + hk * D, v + b * v_sb + hk * D, k_st, v_st, Tk, D, kp + bh * Tkp * D / 2,
             vp + bh * Tkp * D);
    }
    std::vector<float> acc(size_t(kRowsAtOnce * D));
    float m[kRowsAtOnce], l[kRowsAtOnce * 16];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * H * qblocks; ++task) {
      const int64_t b = task / (H * qblocks), h = task / qblocks % H, qb = task % qblocks;
      const int64_t bh = b * Hkv + h / G;
      for (int64_t i0 = qb * kQueries; i0 < std::min(Tq, (qb + 1) * kQueries); i0 += kRowsAtOnce) {
        const int64_t n = std::min(kRowsAtOnce, Tq - i0);
        std::fill(m, m + n, -std::numeric_limits<float>::infinity());
        std::fill(l, l + 16 * n, 0.0f);
        std::fill(acc.begin(), acc.end(), 0.0f);
        rows_task(q + b * q_sb + i0 * q_st + h * D, q_st, n, i0, kp + bh * Tkp * D / 2, vp + bh * Tkp * D,
                  Tk, D, Tk - Tq, causal, float(scale), m, l, acc.data());
        for (int64_t r = 0; r < n; ++r) {
          const float lr = _mm512_reduce_add_ps(_mm512_loadu_ps(l + 16 * r));
          // NaN: a NaN row (see exp_nonpositive); 0: every score -inf, a 0 row as torch's
          const float inv = std::isnan(lr) ? lr : lr > 0.0f ? 1.0f / lr : 0.0f;
          uint16_t* out = o + ((b * Tq + i0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) out[d] = float_to_bf16(acc[r * D + d] * inv);
        }
      }
    }
  }
#endif
}

}  // namespace jr
