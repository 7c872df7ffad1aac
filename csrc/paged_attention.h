// The paged decode-attention core: one query token per sequence.
// Used by paged_decode_attention.cpp (the op) and decode_layer.cpp (inside its one parallel region).
//   q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks];
//   context_lens int32 [B]; o [B, H, D] = softmax(q k^T * sm_scale) v over the first context_lens[b] tokens.
// q/o fp32 or bf16, caches fp32 or bf16, all math in fp32. Query head h reads kv head h / (H / Hkv).
// An online softmax per query head rescales its accumulator once per cache block. On the 2-core Zen 3 box one
// thread reads K/V at ~8-10 GB/s (about half its streaming rate; the profile is load stalls); software prefetch of
// the next block was slower.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "simd.h"

namespace jr::attn {

using simd::vf;
constexpr int kW = simd::kWidth;

// q . k over D elements; four accumulators so the FMAs do not wait on each other.
template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  vf a0 = simd::zero(), a1 = simd::zero(), a2 = simd::zero(), a3 = simd::zero();
  int64_t d = 0;
  for (; d + 4 * kW <= D; d += 4 * kW) {
    a0 = simd::fma(simd::load(q + d), simd::load_as_float(k + d), a0);
    a1 = simd::fma(simd::load(q + d + kW), simd::load_as_float(k + d + kW), a1);
    a2 = simd::fma(simd::load(q + d + 2 * kW), simd::load_as_float(k + d + 2 * kW), a2);
    a3 = simd::fma(simd::load(q + d + 3 * kW), simd::load_as_float(k + d + 3 * kW), a3);
  }
  for (; d + kW <= D; d += kW) a0 = simd::fma(simd::load(q + d), simd::load_as_float(k + d), a0);
  float s = simd::hsum(simd::add(simd::add(a0, a1), simd::add(a2, a3)));
  for (; d < D; ++d) s += q[d] * to_float(k[d]);
  return s;
}

// acc[0:D] += sum_t p[t] * v[t * ldv : t * ldv + D] over n tokens; the accumulator stays in registers across
// the tokens, 4*kW elements at a time, instead of a load and store of acc per token.
template <typename T>
inline void accumulate_v(float* acc, const float* p, const T* v, int64_t ldv, int64_t n, int64_t D) {
  int64_t d = 0;
  for (; d + 4 * kW <= D; d += 4 * kW) {
    vf a0 = simd::load(acc + d), a1 = simd::load(acc + d + kW);
    vf a2 = simd::load(acc + d + 2 * kW), a3 = simd::load(acc + d + 3 * kW);
    for (int64_t t = 0; t < n; ++t) {
      const vf pt = simd::set1(p[t]);
      const T* vt = v + t * ldv + d;
      a0 = simd::fma(pt, simd::load_as_float(vt), a0);
      a1 = simd::fma(pt, simd::load_as_float(vt + kW), a1);
      a2 = simd::fma(pt, simd::load_as_float(vt + 2 * kW), a2);
      a3 = simd::fma(pt, simd::load_as_float(vt + 3 * kW), a3);
    }
    simd::store(acc + d, a0);
    simd::store(acc + d + kW, a1);
    simd::store(acc + d + 2 * kW, a2);
    simd::store(acc + d + 3 * kW, a3);
  }
  for (; d + kW <= D; d += kW) {
    vf a = simd::load(acc + d);
    for (int64_t t = 0; t < n; ++t) a = simd::fma(simd::set1(p[t]), simd::load_as_float(v + t * ldv + d), a);
    simd::store(acc + d, a);
  }
  for (; d < D; ++d)
    for (int64_t t = 0; t < n; ++t) acc[d] += p[t] * to_float(v[t * ldv + d]);
}

inline void scale(float* acc, float alpha, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
}

// Data-dependent guards on a block table, before any thread reads the cache: every context length fits the table
// and every block it covers is a real block.
inline void check_tables(const int32_t* bt, const int32_t* cl, int64_t B, int64_t num_blocks, int64_t block_size,
                         int64_t max_blocks) {
  for (int64_t b = 0; b < B; ++b) {
    JR_CHECK(cl[b] >= 0 && cl[b] <= max_blocks * block_size,
             "context_lens[" + std::to_string(b) + "] = " + std::to_string(cl[b]) + " outside [0, max_blocks * block_size]");
    for (int64_t i = 0; i * block_size < cl[b]; ++i) {
      const int32_t blk = bt[b * max_blocks + i];
      JR_CHECK(blk >= 0 && blk < num_blocks, "block_tables[" + std::to_string(b) + ", " + std::to_string(i) +
                                                 "] = " + std::to_string(blk) + " outside [0, num_blocks)");
    }
  }
}

// One task = one sequence b and a chunk of kv heads [hk0, hk1) with their query heads [hk0 * G, hk1 * G): every
// cached token is then read as one contiguous (hk1 - hk0) * D run instead of D-sized pieces 8 KiB apart.
// About two tasks per thread (small batches split their heads); the split depends only on the team size.
inline int64_t head_chunks(int64_t B, int64_t Hkv, int64_t threads) {
  const int64_t tasks = 2 * threads;
  return std::min(Hkv, std::max<int64_t>(1, (tasks + B - 1) / std::max<int64_t>(B, 1)));
}

// Inside an OpenMP parallel region (an orphaned `omp for`, ending with the team's barrier), or on one thread
// outside one. `chunks` = head_chunks(...) computed once for the whole team.
template <typename TQ, typename TKV>
void attend_for(const TQ* q, const TKV* kc, const TKV* vc, const int32_t* bt, const int32_t* cl, TQ* o, int64_t B,
                int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float sm_scale, int64_t chunks) {
  const int64_t G = H / Hkv;
  const int64_t hk_per = (Hkv + chunks - 1) / chunks;
  const int64_t row = Hkv * D;  // elements per cached token
  const int64_t hq_max = hk_per * G;
  std::vector<float> qf(static_cast<size_t>(hq_max * D)), acc(static_cast<size_t>(hq_max * D));
  std::vector<float> s(static_cast<size_t>(hq_max * bs)), m(static_cast<size_t>(hq_max)), l(m.size());
  std::vector<int64_t> off(static_cast<size_t>(hq_max));  // query head h of the task reads row[off[h] :]
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * chunks; ++task) {
    const int64_t b = task / chunks, hk0 = task % chunks * hk_per, hk1 = std::min(Hkv, hk0 + hk_per);
    if (hk0 >= hk1) continue;
    const int64_t h0 = hk0 * G, nh = (hk1 - hk0) * G, len = cl[b];
    for (int64_t i = 0; i < nh * D; ++i) qf[i] = to_float(q[(b * H + h0) * D + i]);
    for (int64_t h = 0; h < nh; ++h) off[h] = (hk0 + h / G) * D;
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.0f);
    for (int64_t i = 0; i * bs < len; ++i) {
      const int64_t n = std::min(bs, len - i * bs);
      const int64_t base = int64_t(bt[b * max_blocks + i]) * bs * row;  // token t of the block at base + t * row
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < nh; ++h)
          s[h * bs + t] = dot(&qf[h * D], kc + base + t * row + off[h], D) * sm_scale;
      for (int64_t h = 0; h < nh; ++h) {
        float mb = m[h];
        for (int64_t t = 0; t < n; ++t) mb = std::max(mb, s[h * bs + t]);
        const float alpha = std::exp(m[h] - mb);  // 0 on the first block (m = -inf)
        scale(&acc[h * D], alpha, D);
        l[h] *= alpha;
        m[h] = mb;
        for (int64_t t = 0; t < n; ++t) l[h] += (s[h * bs + t] = std::exp(s[h * bs + t] - mb));
        accumulate_v(&acc[h * D], &s[h * bs], vc + base + off[h], row, n, D);
      }
    }
    for (int64_t h = 0; h < nh; ++h) {
      const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;  // an empty context gives zeros
      for (int64_t d = 0; d < D; ++d) from_float(acc[h * D + d] * inv, o + (b * H + h0 + h) * D + d);
    }
  }
}

}  // namespace jr::attn
