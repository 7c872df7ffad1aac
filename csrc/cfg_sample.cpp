// Classifier-free guidance + sampling, one token per row, with the semantics (and random numbers) written down in
// kernels/sampling.py's docstring, shared bit for bit with the Triton kernel:
//   cond, uncond [B, V] fp32 rows (row strides ldc, ldu; uncond optional); cfg_weight, temperature, top_p fp32 [B];
//   top_k, seeds int64 [B]; greedy bool [B]; out int64 [B].
// logits = u + w (c - u) (no FMA: setup.py builds with -ffp-contract=off). Greedy rows: argmax, ties -> smallest
// index. Other rows: l = logits / temperature; top-k keeps l >= the k-th largest l (ties kept; 0 = off); top-p
// (>= 1 = off) then keeps l >= t, t the largest kept value with softmax mass{l >= t} >= p; the token is the argmax
// over kept j of l_j + g_j, Gumbel noise g_j from a counter-based hash of (seed, j).
// Thresholds come from nth_element / a weighted quickselect here (the GPU bisects); they select the same tokens.
#include <algorithm>
#include <immintrin.h>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <omp.h>

#include "common.h"

namespace jr {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// u in (0, 1): the top 24 of the random bits centred in their bucket, in fp32 like the Triton kernel. The + 0.5
// rounds the top bucket (2^24 - 1) up to u = 1, hence the clamp (else g = +inf).
inline float gumbel_of_bits(uint32_t bits) {
  const float u = std::min((float(bits >> 8) + 0.5f) * 0x1p-24f, 1.0f - 0x1p-24f);
  return -std::log(-std::log(u));
}

// g is increasing in the bits, so the top kBoundBits of them bound it: bound[i] >= g for every bits with
// bits >> (32 - kBoundBits) == i (g at the bucket's largest value, plus a margin for the rounding of the logs).
// The sampling loop computes the two logs only for tokens whose bound could still beat the best score so far.
constexpr int kBoundBits = 12;
const std::vector<float>& gumbel_bounds() {
  static const std::vector<float> bound = [] {
    std::vector<float> b(size_t(1) << kBoundBits);
    for (uint32_t i = 0; i < b.size(); ++i) {
      const uint32_t top = (i << (32 - kBoundBits)) | ((uint32_t(1) << (32 - kBoundBits)) - 1);
      b[i] = gumbel_of_bits(top) + 1e-3f;
    }
    return b;
  }();
  return bound;
}

int64_t argmax_first(const float* x, int64_t V) {
  int64_t arg = 0;
  float best = x[0];
  for (int64_t j = 1; j < V; ++j)
    if (x[j] > best) best = x[j], arg = j;
  return arg;
}

struct Cand {
  float l, e;  // a kept value and its unnormalised softmax weight exp(l - max)
};

// The largest kept value t (kept: l >= thr) with mass{l >= t} >= p under softmax over the kept values, found by a
// weighted quickselect (expected O(V), no full sort): partition around a pivot, keep the side that holds t.
// e_j in fp32, sums in double, in a different order than the GPU's fp32 sums: only masses within rounding of p
// can resolve differently.
float top_p_threshold(const float* l, int64_t V, float thr, float p, std::vector<Cand>& c) {
  c.clear();
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < V; ++j)
    if (l[j] >= thr) c.push_back({l[j], 0.0f}), mx = std::max(mx, l[j]);
  double total = 0.0;
  for (Cand& x : c) total += (x.e = std::exp(x.l - mx));
  const double target = double(p) * total;
  auto mass = [](auto first, auto last) {
    double m = 0.0;
    for (; first != last; ++first) m += first->e;
    return m;
  };
  double above = 0.0;  // mass of the values above [lo, hi); stays < target
  auto lo = c.begin(), hi = c.end();
  while (lo != hi) {
    const float a = lo->l, b = lo[(hi - lo) / 2].l, d = hi[-1].l;
    const float v = std::max(std::min(a, b), std::min(std::max(a, b), d));  // median of three
    auto gt = std::partition(lo, hi, [v](const Cand& x) { return x.l > v; });
    auto eq = std::partition(gt, hi, [v](const Cand& x) { return x.l == v; });
    const double m_gt = mass(lo, gt), m_eq = mass(gt, eq);
    if (gt != lo && above + m_gt >= target && above + m_gt > 0.0) {
      hi = gt;  // t > v
    } else if (above + m_gt + m_eq >= target && above + m_gt + m_eq > 0.0) {
      return v;
    } else {
      above += m_gt + m_eq;  // t < v
      lo = eq;
    }
  }
  return thr;  // mass never reached (rounding with p ~ 1, or no finite logits): keep everything top-k kept
}

int64_t sample_row(const float* c, const float* u, float w, float temperature, int64_t top_k, float top_p,
                   int64_t seed, bool greedy, int64_t V, std::vector<float>& l, std::vector<float>& tmp,
                   std::vector<Cand>& cand) {
  // c, u: one row of V logits (u may be null); l, tmp, cand: per-thread scratch
  for (int64_t j = 0; j < V; ++j) l[j] = u ? u[j] + w * (c[j] - u[j]) : c[j];
  if (greedy) return argmax_first(l.data(), V);
  for (int64_t j = 0; j < V; ++j) l[j] = l[j] / temperature;
  float thr = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < V) {
    tmp.assign(l.begin(), l.begin() + V);
    std::nth_element(tmp.begin(), tmp.begin() + (top_k - 1), tmp.end(), std::greater<float>());
    thr = tmp[size_t(top_k - 1)];
  }
  if (top_p < 1.0f) thr = top_p_threshold(l.data(), V, thr, top_p, cand);
  const uint32_t sh = mix32(uint32_t(uint64_t(seed)));
  const float* bound = gumbel_bounds().data();
  int64_t arg = 0;  // as torch.argmax over an all -inf row
  float best = -std::numeric_limits<float>::infinity();
  auto visit = [&](int64_t j) {  // token j in increasing j: the running Gumbel-max
    if (!(l[j] >= thr)) return;
    const uint32_t bits = mix32(sh ^ uint32_t(j));
    if (l[j] + bound[bits >> (32 - kBoundBits)] < best) return;  // score <= that bound: cannot win
    const float score = l[j] + gumbel_of_bits(bits);
    if (score > best) best = score, arg = j;
  };
  int64_t j = 0;
#ifdef __AVX512F__
  // 16 tokens at a time: the kept test, the hash and the bound in vectors against the best so far; the few lanes that
  // could still win go through visit() in order (best only grows, so a lane the vector test drops visit() would
  // drop too). The same tokens as the scalar loop, ~10x faster (a V = 16384 row: ~40 -> ~4 us).
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 thr_v = _mm512_set1_ps(thr);
  for (; j + 16 <= V; j += 16) {
    const __m512 lv = _mm512_loadu_ps(&l[j]);
    const __mmask16 kept = _mm512_cmp_ps_mask(lv, thr_v, _CMP_GE_OQ);
    if (!kept) continue;
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(j))), lanes);  // uint32_t(j + lane)
    __m512i x = _mm512_xor_si512(_mm512_set1_epi32(int(sh)), idx);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));  // mix32, lane by lane
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x21f0aaadu)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x735a2d97u)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    const __m512 b = _mm512_i32gather_ps(_mm512_srli_epi32(x, 32 - kBoundBits), bound, 4);
    __mmask16 maybe = kept & _mm512_cmp_ps_mask(_mm512_add_ps(lv, b), _mm512_set1_ps(best), _CMP_NLT_UQ);
    for (; maybe; maybe &= maybe - 1) visit(j + __builtin_ctz(maybe));
  }
#endif
  for (; j < V; ++j) visit(j);
  return arg;
}

}  // namespace

void cfg_sample(std::uintptr_t cond, std::uintptr_t uncond, std::uintptr_t cfg_weight, std::uintptr_t temperature,
                std::uintptr_t top_k, std::uintptr_t top_p, std::uintptr_t seeds, std::uintptr_t greedy,
                std::uintptr_t out, int64_t B, int64_t V, int64_t ldc, int64_t ldu, std::uintptr_t cond_rows,
                std::uintptr_t uncond_rows, int64_t rows) {
  JR_CHECK(B >= 0 && V >= 1, "need B >= 0 and V >= 1");
  JR_CHECK(ldc >= 0 && ldu >= 0, "row strides must be >= 0");
  JR_CHECK(V <= (int64_t(1) << 32), "V must fit the 32-bit counter of the random stream");
  const float* c = ptr<const float>(cond);
  const float* u = ptr<const float>(uncond);  // may be null
  const float* w = ptr<const float>(cfg_weight);
  const float* temp = ptr<const float>(temperature);
  const int64_t* k = ptr<const int64_t>(top_k);
  const float* p = ptr<const float>(top_p);
  const int64_t* s = ptr<const int64_t>(seeds);
  const bool* g = ptr<const bool>(greedy);
  int64_t* o = ptr<int64_t>(out);
  // row b of cond / uncond: row cond_rows[b] / uncond_rows[b] of a [rows, ldc] / [rows, ldu] buffer when given
  const int64_t* cr = ptr<const int64_t>(cond_rows);
  const int64_t* ur = ptr<const int64_t>(uncond_rows);
  for (int64_t b = 0; b < B; ++b) {
    const std::string row = "row " + std::to_string(b) + ": ";
    JR_CHECK(k[b] >= 0, row + "top_k must be >= 0");
    JR_CHECK(g[b] || (temp[b] > 0.0f && std::isfinite(temp[b])), row + "temperature must be > 0 unless greedy");
    JR_CHECK(!cr || (cr[b] >= 0 && cr[b] < rows), row + "cond_rows outside [0, rows)");
    JR_CHECK(!ur || !u || (ur[b] >= 0 && ur[b] < rows), row + "uncond_rows outside [0, rows)");
  }
#pragma omp parallel if (B > 1)
  {
    std::vector<float> l(static_cast<size_t>(V)), tmp;
    std::vector<Cand> cand;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b)
      o[b] = sample_row(c + (cr ? cr[b] : b) * ldc, u ? u + (ur ? ur[b] : b) * ldu : nullptr, w[b], temp[b], k[b],
                        p[b], s[b], g[b], V, l, tmp, cand);
  }
}

}  // namespace jr
