// The paged decode-attention core: one query token per sequence.
// Used by paged_decode_attention.cpp (the op) and decode_layer.cpp (inside its one parallel region).
//   q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables int32 [B, max_blocks];
//   context_lens int32 [B]; o [B, H, D] = softmax(q k^T * sm_scale) v over the first context_lens[b] tokens.
// q/o fp32 or bf16, caches fp32, bf16 or int8 (with k_scale, v_scale [num_blocks, block_size, Hkv] fp32: kv_int8.h),
// all math in fp32. Query head h reads kv head h / (H / Hkv). An int8 cache's scales are applied to a chunk's
// scores (s = sm_scale * (q . k) * k_scale) and to its softmax weights before the V pass (p * v_scale), so the
// loops over D run on the int8 values as they do on bf16 ones, at half the bytes.
// The bit-identities claimed below (paths, batches, block sizes) assume no FMA contraction of separate multiplies and
// adds (-ffp-contract=off, as setup.py builds).
// The context is read in chunks of kChunk (16) tokens at fixed positions, whatever the cache's block size: an online
// softmax per query head rescales its accumulator once per chunk, so a row's result does not depend on the block
// size. A chunk across cache blocks (bs not a multiple of 16) is read in runs, one per block, through per-token row
// pointers: its tokens get the same arithmetic as in one block. 2-core Zen 4, forty-first session, bench_ab
// --block-sizes, 32 rows x 308 tokens, middle half, GB/s, bs 16 / 8 / 5: 1B dims bf16 32.1 / 31.8 / 31.8 (summing
// block by block before: 31.7 / 31.8 / 22.9), int8 28.4 / 28.1 / 27.3 (28.1 / 26.0 / 15.9); the small shape fp32
// 25.5 / 24.6 / 25.0 (26.7 / 25.5 / 19.3), its 3-5 % loss at bs 16 seen in every repeated A/B (five variants did not
// remove it; it looks like code placement: changing only the signature of a score kernel that shape never calls cost
// it ~2 %). Copying such chunks to staging rows instead kept bs 16's code but cost bs 8 31-44 %.
// V is accumulated for 16 vectors of the task's output row at a time over the chunk's tokens (each token's V read as
// long runs; fp32 small shape +4-10 %, Janus-Pro-1B dims bf16 +8-12 %, fp32 +5 % from DRAM, bit-identical:
// bench/RESULTS.md 2026-12-03).
// Narrow fp32 rows (a task's K row <= kTokenMajorBytes) score token by token instead of 8 tokens per head, so
// K too is read front to back (+7 % more at the small shape; -8 % for 4 KiB bf16 rows, where it is not used).
// (The measurements below were of 16-token cache blocks, the chunks now.)
// The task's part of the next chunk's K and of this chunk's V is prefetched in address order while the chunk's K is
// scored (RangePrefetcher): from DRAM on the 2-core Zen 5 host (2026-12-03, bench_ab) +8-14 % at the
// small shape (fp32) and +12-19 % at Janus-Pro-1B dims in bf16, where the 8-tokens-per-head K reads otherwise visit
// 8 pages at a time 256 B each; prefetching the same lines in the order the kernel reads them gained ~0 for bf16.
// (On the earlier Zen 3 box, 2026-11-25, software prefetch of the next block had left the DRAM rate unchanged.)
// The prefetches go to L2 (prefetcht1; L1 on Zen 5, below), and the next chunk may be the first of the row's next
// part: on the 2-core Zen 4 host (2026-12-03, ninth session, bench_ab, middle half) the 1B dims in bf16 from DRAM
// 17.3 -> 20.0 GB/s with t1 instead of t0 (likely: a t0 prefetch holds one of the core's few L1 miss buffers until
// its line arrives), and 22.5 -> 23.7 in another A/B with the prefetch crossing into the next part; the small shape
// fp32 16.4 -> 20.9.
// On Zen 5 (AMD family 0x1A) t0 is the faster (2-core Zen 5 VM, thirtieth session, 2026-12-06, bench_ab, 1B dims
// bf16, 32 rows x 312 tokens, middle half: 42.2 -> 44.2 and 40.8 -> 44.8 GB/s when memory was fast, +0-3 % when
// slow), so there the prefetches go to L1.
// Prefetching 2 or 3 chunks ahead, or spreading the prefetches over the V passes as well as the K scoring, gained
// nothing (Zen 5, the Xeon); NTA was slower.
// On Zen 4 (k_during_v()) the next chunk's K is prefetched during this chunk's V pass instead, and this chunk's V
// alone during its K scoring, so memory is not idle while the V pass computes (2-core Zen 4 VM, thirty-seventh
// session, 2026-12-06, bench_ab, 1B dims, middle half, GB/s): the int8 cache from DRAM 32 rows 24.1 -> 27.7, 2 rows
// 17.7 -> 19.3; bf16 28.0 -> 28.7, from L3 33.7 -> 36.8; small fp32 23.8 -> 24.3 (outputs identical: prefetches only).
// On Intel for bf16 caches only (2-core Xeon with AMX, family 6 model 167, forty-fifth session, 2026-12-07,
// bench_ab, 1B dims, 32 rows x 312 tokens from DRAM, middle half, GB/s, in three A/Bs): bf16 21.5 -> 22.7, 21.6 ->
// 23.0, 21.4 -> 22.7; the int8 cache 18.2 -> 17.3 (slower); 2 rows bf16 16.9 -> 16.8, small fp32 21.8 -> 21.6 (kept
// off). Unmeasured on Zen 5, which keeps the interleaved order (the Xeon had measured the next K over the V pass as
// well as the K scoring at 22.3 vs 23.1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_family.h"
#include "simd.h"

namespace jr::attn {

using simd::vf;
constexpr int kW = simd::kWidth;
#ifndef JR_ATTN_CHUNK  // tokens per online-softmax step (see attend_for)
#define JR_ATTN_CHUNK 16
#endif
#ifndef JR_ATTN_PART_CHUNKS  // chunks per attention part (see make_plan)
#define JR_ATTN_PART_CHUNKS 8
#endif
// (A build's own -DJR_ATTN_PF_LOCALITY holds on Zen 5 too unless -DJR_ATTN_PF_LOCALITY_ZEN5 is given as well.)
#if defined(JR_ATTN_PF_LOCALITY) && !defined(JR_ATTN_PF_LOCALITY_ZEN5)
#define JR_ATTN_PF_LOCALITY_ZEN5 JR_ATTN_PF_LOCALITY
#endif
#ifndef JR_ATTN_PF_LOCALITY  // __builtin_prefetch locality of RangePrefetcher: 2 = prefetcht1 (L2), 3 = prefetcht0
#define JR_ATTN_PF_LOCALITY 2
#endif
#ifndef JR_ATTN_PF_LOCALITY_ZEN5  // the same on AMD family 0x1A and later (see the top)
#define JR_ATTN_PF_LOCALITY_ZEN5 3
#endif
#ifndef JR_ATTN_K_DURING_V  // 1: the next chunk's K prefetched during this chunk's V pass, 0: during the K scoring
#define JR_ATTN_K_DURING_V -1  // with this chunk's V; -1: by the CPU (1 on Zen 4, and for bf16 caches on Intel)
#endif
constexpr int64_t kTokenMajorBytes = 2048;  // token-major K scoring for fp32 task rows up to this (see the top)
constexpr int64_t kChunk = JR_ATTN_CHUNK;   // tokens per online-softmax step (see the top)

// RangePrefetcher's locality on this CPU (see the top).
inline int prefetch_locality() { return cpu::zen5_or_later() ? JR_ATTN_PF_LOCALITY_ZEN5 : JR_ATTN_PF_LOCALITY; }

// Whether the next chunk's K is prefetched during this chunk's V pass on this CPU for a cache of TKV (see the top).
template <typename TKV>
inline bool k_during_v() {
#if JR_ATTN_K_DURING_V >= 0
  return JR_ATTN_K_DURING_V;
#else
  return cpu::zen4() || (cpu::intel() && std::is_same_v<TKV, uint16_t>);
#endif
}

// Chunk i of a row (its tokens [i * kChunk, i * kChunk + n), none past the row's length): token t's K and V rows at
// k[t], v[t] (flat cache slot st: kc + st * row, vc + st * row), in `runs` runs of tokens that lie in one cache block,
// run r = tokens [cut[r], cut[r + 1]) (one run wherever bs is a multiple of kChunk); st0 the first token's slot.
template <typename TKV>
struct ChunkRows {
  const TKV* k[kChunk];
  const TKV* v[kChunk];
  int64_t cut[kChunk + 1];
  int64_t n = 0, runs = 0, st0 = 0;
  // bt_row: the row's block table; len: its tokens
  void fill(const TKV* kc, const TKV* vc, const int32_t* bt_row, int64_t bs, int64_t row, int64_t len, int64_t i) {
    const int64_t p0 = i * kChunk;
    n = std::max<int64_t>(0, std::min(kChunk, len - p0)), runs = 0;
    for (int64_t t = 0; t < n; ++runs) {
      const int64_t p = p0 + t, blk = p / bs, o = p - blk * bs, end = t + std::min(n - t, bs - o);
      int64_t st = int64_t(bt_row[blk]) * bs + o;
      if (runs == 0) st0 = st;
      cut[runs] = t;
      for (; t < end; ++t, ++st) k[t] = kc + st * row, v[t] = vc + st * row;
    }
    cut[runs] = n;
  }
};

// Prefetches the task's part of the tokens of two chunks (the next chunk's K, this chunk's V: per token `seg`
// elements from its row + off) line by line, token after token, `per` lines of each per issue(), so the lines are
// requested at an even rate over a chunk's issue() calls rather than in one burst. Or (v_calls > 0) this chunk's V
// alone over the K scoring's issue() calls and the next chunk's K over the V pass's v_calls issue_a() calls.
struct RangePrefetcher {
  struct Stream {
    uintptr_t run_at[kChunk];                 // each run's first segment
    int64_t run_len[kChunk];                  // and its tokens (segments `stride` bytes apart)
    uintptr_t start = 0, cur = 0, end = 0;    // this token's segment [start, end) and its next line
    int64_t seg = 0, stride = 0, left = 0;    // segment and stride bytes; the run's tokens after this one
    int64_t next = 0, runs = 0;               // the next run; runs
    template <typename T>
    void init(const ChunkRows<T>& c, const T* const* rows, int64_t off, int64_t seg_bytes, int64_t stride_bytes) {
      for (int64_t r = 0; r < c.runs; ++r)
        run_at[r] = reinterpret_cast<uintptr_t>(rows[c.cut[r]] + off), run_len[r] = c.cut[r + 1] - c.cut[r];
      start = cur = end = 0, seg = seg_bytes, stride = stride_bytes, left = 0, next = 0, runs = c.runs;
    }
    template <int Loc>
    void step() {
      if (cur >= end) {
        if (left > 0)
          --left, start += stride;
        else if (next < runs)
          start = run_at[next], left = run_len[next] - 1, ++next;
        else
          return;
        cur = start & ~uintptr_t(63), end = start + seg;
      }
      __builtin_prefetch(reinterpret_cast<const char*>(cur), 0, Loc);
      cur += 64;
    }
  };
  Stream a, b;
  int64_t per = 0;      // lines per issue(): of each stream, or of b alone where a_in_v
  int64_t per_a = 0;    // lines of a per issue_a()
  bool a_in_v = false;  // stream a (the next chunk's K) issued by issue_a() during the V pass
  bool zen5 = cpu::zen5_or_later();  // the locality: JR_ATTN_PF_LOCALITY_ZEN5 there, else JR_ATTN_PF_LOCALITY
  // a: the next chunk's K rows + off, b: this chunk's V rows + off (at least one token), seg elements of each;
  // row: elements from a token to the next in a cache block
  template <typename T>
  void set(const ChunkRows<T>& next, const ChunkRows<T>& cur, int64_t off, int64_t seg, int64_t row, int64_t calls,
           int64_t v_calls = 0) {
    const int64_t seg_bytes = seg * int64_t(sizeof(T)), na = next.n, nb = cur.n;
    a.init(next, next.k, off, seg_bytes, row * int64_t(sizeof(T)));
    b.init(cur, cur.v, off, seg_bytes, row * int64_t(sizeof(T)));
    const auto lines = [&](uintptr_t p, int64_t tokens) {  // (the first token's alignment for all)
      return tokens * ((int64_t(p & 63) + seg_bytes + 63) / 64);
    };
    a_in_v = v_calls > 0;
    per = calls > 0 ? (lines(b.run_at[0], a_in_v ? nb : std::max(na, nb)) + calls - 1) / calls : 0;
    per_a = a_in_v && na > 0 ? (lines(a.run_at[0], na) + v_calls - 1) / v_calls : 0;
  }
  template <int Loc>
  void steps() {
    for (int64_t i = 0; i < per; ++i) {
      if (!a_in_v) a.step<Loc>();
      b.step<Loc>();
    }
  }
  void issue() {
    if (zen5)
      steps<JR_ATTN_PF_LOCALITY_ZEN5>();
    else
      steps<JR_ATTN_PF_LOCALITY>();
  }
  void issue_a() {
    if (zen5)
      for (int64_t i = 0; i < per_a; ++i) a.step<JR_ATTN_PF_LOCALITY_ZEN5>();
    else
      for (int64_t i = 0; i < per_a; ++i) a.step<JR_ATTN_PF_LOCALITY>();
  }
};

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

// The same over a task's whole output row of W = heads * D elements (MHA: the task's heads are contiguous in acc
// and in the cached row): kSeg vectors of acc stay in registers while the chunk's n tokens stream by, so each
// token's V is read in runs of kSeg vectors instead of one D-sized piece per head and pass. The weight of token t
// for head h is p[h * ph + t * pt]. Needs D % kW == 0 and W % (kSeg * kW) == 0; per element the same FMAs in the
// same order as accumulate_v.
constexpr int kSeg = kW >= 16 ? 16 : 8;  // AVX-512: 16 of 32 registers; AVX2 8 of 16

// One pass for VPH = D / kW vectors per head (a power of two <= kSeg): the kSeg / VPH heads of the pass each get one
// broadcast of their weight per token (with a run-time VPH the compiler kept 16 weight pointers, spilled to vector
// registers, and moved one back for every FMA).
template <int VPH, typename T>
inline void accumulate_v_pass(float* acc, const float* p, int64_t ph, int64_t pt, const T* v, int64_t ldv, int64_t n,
                              RangePrefetcher* pf) {
  constexpr int NH = kSeg / VPH;
  // kPairs: bf16 V widened 32 elements at a time by a shift (even elements) and an AND (odd ones) instead of 16 at a
  // time by a lane-crossing vpmovzxwd; for the pass, a[2 i] and a[2 i + 1] hold the even and odd elements of acc's
  // elements 32 i .. 32 i + 31 (two permutes in, two out), so acc stays in element order and every element gets the
  // same FMAs in the same order (the same bits). Zen 4 (512-bit shuffles on 256-bit units), 1B dims: +7-11 % from
  // L3, +2.5 % from DRAM (bench/RESULTS.md, thirty-sixth session).
#if defined(__AVX512F__)
  constexpr bool kPairs = std::is_same_v<T, uint16_t> && VPH % 2 == 0;
  const __m512i even_of = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_of = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i lo_of = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_of = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#else
  constexpr bool kPairs = false;
#endif
  vf a[kSeg];
#pragma GCC unroll 16
  for (int j = 0; j < kSeg; ++j) a[j] = simd::load(acc + j * kW);
#if defined(__AVX512F__)
  // each pair (a[j], a[j + 1]) -> (its elements picked by `first`, by `second`): in, to even / odd; out, back
  [[maybe_unused]] const auto permute_pairs = [&a](__m512i first, __m512i second) {
#pragma GCC unroll 16
    for (int j = 0; j < kSeg; j += 2) {
      const vf x = a[j], y = a[j + 1];
      a[j] = _mm512_permutex2var_ps(x, first, y), a[j + 1] = _mm512_permutex2var_ps(x, second, y);
    }
  };
  if constexpr (kPairs) permute_pairs(even_of, odd_of);
#endif
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = v + t * ldv;
    if (pf) pf->issue_a();
#pragma GCC unroll 16
    for (int h = 0; h < NH; ++h) {
      const vf w = simd::set1(p[h * ph + t * pt]);
      if constexpr (kPairs) {
#pragma GCC unroll 16
        for (int j = h * VPH; j < (h + 1) * VPH; j += 2) {
          vf ve, vo;
          simd::load_bf16_pairs(vt + j * kW, ve, vo);
          a[j] = simd::fma(w, ve, a[j]), a[j + 1] = simd::fma(w, vo, a[j + 1]);
        }
      } else {
#pragma GCC unroll 16
        for (int j = h * VPH; j < (h + 1) * VPH; ++j) a[j] = simd::fma(w, simd::load_as_float(vt + j * kW), a[j]);
      }
    }
  }
#if defined(__AVX512F__)
  if constexpr (kPairs) permute_pairs(lo_of, hi_of);
#endif
#pragma GCC unroll 16
  for (int j = 0; j < kSeg; ++j) simd::store(acc + j * kW, a[j]);
}

// pf: issue_a() once per token of each pass (kSeg * kW elements of the row a pass), or nullptr.
template <typename T>
inline void accumulate_v_rows(float* acc, const float* p, int64_t ph, int64_t pt, const T* v, int64_t ldv, int64_t n,
                              int64_t W, int64_t D, RangePrefetcher* pf = nullptr) {
  const int64_t vph = D / kW;
  for (int64_t e0 = 0; e0 < W; e0 += kSeg * kW) {
    const float* pe = p + e0 / D * ph;  // the pass's first head (vph <= kSeg: passes start at a head)
    switch (vph) {
      case 1: accumulate_v_pass<1>(acc + e0, pe, ph, pt, v + e0, ldv, n, pf); continue;
      case 2: accumulate_v_pass<2>(acc + e0, pe, ph, pt, v + e0, ldv, n, pf); continue;
      case 4: accumulate_v_pass<4>(acc + e0, pe, ph, pt, v + e0, ldv, n, pf); continue;
      case 8: accumulate_v_pass<8>(acc + e0, pe, ph, pt, v + e0, ldv, n, pf); continue;
      case 16: if constexpr (kSeg >= 16) { accumulate_v_pass<16>(acc + e0, pe, ph, pt, v + e0, ldv, n, pf); continue; }
      default: break;
    }
    const float* pj[kSeg];  // other widths: a weight pointer per vector
    vf a[kSeg];
#pragma GCC unroll 16
    for (int j = 0; j < kSeg; ++j) pj[j] = p + (e0 + j * kW) / D * ph, a[j] = simd::load(acc + e0 + j * kW);
    for (int64_t t = 0; t < n; ++t) {
      const T* vt = v + t * ldv + e0;
      if (pf) pf->issue_a();
#pragma GCC unroll 16
      for (int j = 0; j < kSeg; ++j)
        a[j] = simd::fma(simd::set1(pj[j][t * pt]), simd::load_as_float(vt + j * kW), a[j]);
    }
#pragma GCC unroll 16
    for (int j = 0; j < kSeg; ++j) simd::store(acc + e0 + j * kW, a[j]);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Fast paths for AVX2 (Zen 3, where they were tuned) and AVX-512 builds (Zen 5: the same 8-lane exp and score
// layout, kWidth-lane dot products); other builds take the generic loops below.
#define JR_ATTN_AVX2 1

// exp(x) for x <= 0 (softmax after the max is subtracted), 8 lanes: Cephes' expf (range reduction by ln 2 in two
// parts, degree-5 polynomial, 2^n through the exponent bits), ~2 ulp. Below -87.3 (where 2^n would leave the
// normal range) it returns exp(-87.3) ~ 1e-38 instead of a smaller number: nothing next to a softmax sum >= 1.
// A NaN stays NaN (maxps returns its second operand when one is NaN), so a NaN score poisons its row's output, as
// std::exp and torch's softmax do, instead of weighing ~1e-38.
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// [sum of b0's lanes, ..., sum of b7's lanes]: each accumulator folded to 8 lanes (AVX-512: low half + high half),
// then one transposing hadd reduction instead of eight separate horizontal sums (which dominated the in-cache time).
inline __m256 reduce8(vf b0, vf b1, vf b2, vf b3, vf b4, vf b5, vf b6, vf b7) {
  const __m256 a0 = simd::fold8(b0), a1 = simd::fold8(b1), a2 = simd::fold8(b2), a3 = simd::fold8(b3);
  const __m256 a4 = simd::fold8(b4), a5 = simd::fold8(b5), a6 = simd::fold8(b6), a7 = simd::fold8(b7);
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// q . k_j for 8 keys k_0 ... k_7 over D (a multiple of kWidth) -> [q.k_0, ..., q.k_7]: eight accumulators.
template <typename T>
inline __m256 dots8(const float* q, const T* k0, const T* k1, const T* k2, const T* k3, const T* k4, const T* k5,
                    const T* k6, const T* k7, int64_t D) {
  vf b0 = simd::zero(), b1 = b0, b2 = b0, b3 = b0, b4 = b0, b5 = b0, b6 = b0, b7 = b0;
  for (int64_t d = 0; d < D; d += kW) {
    const vf qv = simd::load(q + d);
    b0 = simd::fma(simd::load_as_float(k0 + d), qv, b0);
    b1 = simd::fma(simd::load_as_float(k1 + d), qv, b1);
    b2 = simd::fma(simd::load_as_float(k2 + d), qv, b2);
    b3 = simd::fma(simd::load_as_float(k3 + d), qv, b3);
    b4 = simd::fma(simd::load_as_float(k4 + d), qv, b4);
    b5 = simd::fma(simd::load_as_float(k5 + d), qv, b5);
    b6 = simd::fma(simd::load_as_float(k6 + d), qv, b6);
    b7 = simd::fma(simd::load_as_float(k7 + d), qv, b7);
  }
  return reduce8(b0, b1, b2, b3, b4, b5, b6, b7);
}

// The 8 keys k + j * ldk (8 tokens of one cache block).
template <typename T>
inline __m256 dots8(const float* q, const T* k, int64_t ldk, int64_t D) {
  return dots8(q, k, k + ldk, k + 2 * ldk, k + 3 * ldk, k + 4 * ldk, k + 5 * ldk, k + 6 * ldk, k + 7 * ldk, D);
}

// The 8 keys rows[j] + off (8 tokens in any places; the same bits as above for the same keys).
template <typename T>
inline __m256 dots8_rows(const float* q, const T* const* rows, int64_t off, int64_t D) {
  return dots8(q, rows[0] + off, rows[1] + off, rows[2] + off, rows[3] + off, rows[4] + off, rows[5] + off,
               rows[6] + off, rows[7] + off, D);
}

// q_h . k_row[off[h] : off[h] + D] for 8 query heads h (q_h = q + h * D) of one cached token -> [s_0, ..., s_7]:
// the token-major counterpart of dots8, the same reduction tree per lane (so the same scores).
template <typename T>
inline __m256 dots8_heads(const float* q, const T* krow, const int64_t* off, int64_t D) {
  vf b0 = simd::zero(), b1 = b0, b2 = b0, b3 = b0, b4 = b0, b5 = b0, b6 = b0, b7 = b0;
  const T *k0 = krow + off[0], *k1 = krow + off[1], *k2 = krow + off[2], *k3 = krow + off[3];
  const T *k4 = krow + off[4], *k5 = krow + off[5], *k6 = krow + off[6], *k7 = krow + off[7];
  for (int64_t d = 0; d < D; d += kW) {
    b0 = simd::fma(simd::load_as_float(k0 + d), simd::load(q + d), b0);
    b1 = simd::fma(simd::load_as_float(k1 + d), simd::load(q + D + d), b1);
    b2 = simd::fma(simd::load_as_float(k2 + d), simd::load(q + 2 * D + d), b2);
    b3 = simd::fma(simd::load_as_float(k3 + d), simd::load(q + 3 * D + d), b3);
    b4 = simd::fma(simd::load_as_float(k4 + d), simd::load(q + 4 * D + d), b4);
    b5 = simd::fma(simd::load_as_float(k5 + d), simd::load(q + 5 * D + d), b5);
    b6 = simd::fma(simd::load_as_float(k6 + d), simd::load(q + 6 * D + d), b6);
    b7 = simd::fma(simd::load_as_float(k7 + d), simd::load(q + 7 * D + d), b7);
  }
  return reduce8(b0, b1, b2, b3, b4, b5, b6, b7);
}
#endif

// s[t] = exp(s[t] - mb) for t < n; returns their sum.
inline float exp_sub_sum(float* s, int64_t n, float mb) {
  int64_t t = 0;
  float sum = 0.0f;
#ifdef JR_ATTN_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(mb);
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = simd::hsum8(acc);
#endif
  for (; t < n; ++t) sum += (s[t] = std::exp(s[t] - mb));
  return sum;
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

// One task = one sequence b, a chunk of kv heads [hk0, hk1) with their query heads [hk0 * G, hk1 * G), and parts of
// b's context: every cached token is read as one contiguous (hk1 - hk0) * D run instead of D-sized pieces 8 KiB
// apart. About two tasks per thread from the rows alone (small batches split their heads).
// A context of more than kPartChunks chunks is computed in parts of kPartChunks chunks, each part's online
// softmax (m, l, acc) from scratch, merged at the end in part order — always, so a row's result depends only on its own
// length, never on its batch. Where the rows alone make fewer than kTasksPerThread tasks per thread, each part is its
// own task (the team then reaches the barrier together: one 300-token row of the small shape was one ~100 us task;
// parts: attention +6-9 % from DRAM) and attend_for's second loop merges them after the barrier; else a task runs all
// parts of its row and merges them itself (separate part tasks cost the 1B shape's 32 rows 2-4 %).
constexpr int64_t kPartChunks = JR_ATTN_PART_CHUNKS;
constexpr int64_t kTasksPerThread = 8;

inline int64_t head_chunks(int64_t B, int64_t Hkv, int64_t threads) {
  const int64_t tasks = 2 * threads;
  return std::min(Hkv, std::max<int64_t>(1, (tasks + B - 1) / std::max<int64_t>(B, 1)));
}

inline int64_t num_chunks(int64_t len) { return (std::max<int64_t>(len, 0) + kChunk - 1) / kChunk; }

inline int64_t num_parts(int64_t len) {
  return std::max<int64_t>(1, (num_chunks(len) + kPartChunks - 1) / kPartChunks);
}

// The task list of one call, made before the parallel region (it holds the scratch the team shares).
struct Plan {
  int64_t chunks = 1, hq_max = 0, D = 0, max_parts = 1;
  bool split = false;                                   // parts of a row are separate tasks
  std::vector<int64_t> item_b, item_part, row_item;  // items (b, first part) in row order, b's from row_item[b]
  std::vector<float> scratch;                           // split: per task m[hq_max], l[hq_max], acc[hq_max * D]
  int64_t tasks() const { return int64_t(item_b.size()) * chunks; }
  int64_t slot_size() const { return hq_max * (D + 2); }
};

inline Plan make_plan(const int32_t* cl, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t threads) {
  Plan p;
  p.chunks = head_chunks(B, Hkv, threads);
  p.hq_max = (Hkv + p.chunks - 1) / p.chunks * (H / Hkv);
  p.D = D;
  for (int64_t b = 0; b < B; ++b) p.max_parts = std::max(p.max_parts, num_parts(cl[b]));
  p.split = p.max_parts > 1 && B * p.chunks < kTasksPerThread * threads;
  for (int64_t b = 0; b < B; ++b) {
    p.row_item.push_back(int64_t(p.item_b.size()));
    const int64_t items = p.split ? num_parts(cl[b]) : 1;
    for (int64_t k = 0; k < items; ++k) p.item_b.push_back(b), p.item_part.push_back(k);
  }
  p.row_item.push_back(int64_t(p.item_b.size()));
  if (p.split) p.scratch.resize(size_t(p.tasks() * p.slot_size()));
  return p;
}

// o[h] = sum_k acc_k[h] e^(m_k[h] - M) / sum_k l_k[h] e^(m_k[h] - M), M = max_k m_k[h], over the parts' states
// slot(k) = m[hq_max], l[hq_max], acc[hq_max * D] in part order; acc: D floats of room.
template <typename TQ, typename Slot>
inline void merge_parts(Slot slot, int64_t parts, int64_t nh, int64_t hq_max, int64_t D, float* acc, TQ* o) {
  for (int64_t h = 0; h < nh; ++h) {
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
    for (int64_t k = 0; k < parts; ++k) mx = std::max(mx, slot(k)[h]);
    std::fill(acc, acc + D, 0.0f);
    for (int64_t k = 0; k < parts; ++k) {
      const float* st = slot(k);
      const float w = std::exp(st[h] - mx);
      sum += st[hq_max + h] * w;
      const float* a = st + 2 * hq_max + h * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += a[d] * w;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t d = 0; d < D; ++d) from_float(acc[d] * inv, o + h * D + d);
  }
}

// Inside an OpenMP parallel region (orphaned `omp for`s, each ending with the team's barrier), or on one thread
// outside one; every thread passes the same plan (make_plan(...) of this call).
template <typename TQ, typename TKV>
void attend_for(const TQ* q, const TKV* kc, const TKV* vc, const int32_t* bt, const int32_t* cl, TQ* o, int64_t B,
                int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float sm_scale, Plan& plan,
                const float* ks = nullptr, const float* vs = nullptr) {
  const int64_t G = H / Hkv, chunks = plan.chunks;
  const int64_t hk_per = (Hkv + chunks - 1) / chunks;
  const int64_t row = Hkv * D;  // elements per cached token
  const int64_t hq_max = plan.hq_max;
  std::vector<float> qf(static_cast<size_t>(hq_max * D)), acc(static_cast<size_t>(hq_max * D));
  std::vector<float> s(static_cast<size_t>(hq_max * kChunk)), m(static_cast<size_t>(hq_max)), l(m.size());
  std::vector<int64_t> off(static_cast<size_t>(hq_max));  // query head h of the task reads row[off[h] :]
  std::vector<float> local(plan.split ? 0 : size_t(plan.max_parts * plan.slot_size()));  // unsplit: the parts' states
  // an int8 cache's scales of a chunk across cache blocks, gathered (token t, kv head hk at t * Hkv + hk)
  std::vector<float> ks_st(bs % kChunk != 0 && ks ? size_t(kChunk * Hkv) : 0), vs_st(ks_st.size());
  ChunkRows<TKV> rows[2];  // a chunk's and the next one's
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < plan.tasks(); ++task) {
    const int64_t item = task / chunks, b = plan.item_b[item];
    const int64_t hk0 = task % chunks * hk_per, hk1 = std::min(Hkv, hk0 + hk_per);
    if (hk0 >= hk1) continue;
    const int64_t h0 = hk0 * G, nh = (hk1 - hk0) * G, len = cl[b], parts = num_parts(len);
    const int64_t k0 = plan.item_part[item], k1 = plan.split ? k0 + 1 : parts;  // this task's parts
    simd::widen(q + (b * H + h0) * D, qf.data(), nh * D);
    for (int64_t h = 0; h < nh; ++h) off[h] = (hk0 + h / G) * D;
    // V for the whole row at once (accumulate_v_rows) where the task's heads are contiguous and fill its vectors
    const bool rows_v = G == 1 && D % kW == 0 && (nh * D) % (kSeg * kW) == 0;
    bool k_in_v = false;  // the next chunk's K prefetched during the V pass (vector builds: the others prefetch none)
#ifdef JR_ATTN_AVX2
    k_in_v = rows_v && k_during_v<TKV>();
#endif
    bool token_major = false;
#ifdef JR_ATTN_AVX2
    token_major = rows_v && std::is_same_v<TKV, float> && nh % 8 == 0 &&
                  nh * D * int64_t(sizeof(TKV)) <= kTokenMajorBytes;
#endif
    for (int64_t part = k0; part < k1; ++part) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      const int64_t i_end = std::min(num_chunks(len), (part + 1) * kPartChunks);
      ChunkRows<TKV>*cur = &rows[0], *nxt = &rows[1];
      cur->fill(kc, vc, bt + b * max_blocks, bs, row, len, part * kPartChunks);
      for (int64_t i = part * kPartChunks; i < i_end; ++i, std::swap(cur, nxt)) {
        // chunk i (cur) and the next (nxt, none past the row's end); every token gets the same arithmetic whatever
        // the runs: the scores of 8 tokens are dots8 of 8 rows in any places, the V passes run over the runs in order
        nxt->fill(kc, vc, bt + b * max_blocks, bs, row, len, i + 1);
        const int64_t n = cur->n, runs = cur->runs;
        const TKV* const* kr = cur->k;
        const TKV* const* vr = cur->v;
        const float *ksb = ks, *vsb = vs;  // an int8 cache's scales: token t, kv head hk at t * Hkv + hk
        if (ks && runs == 1) {
          ksb += cur->st0 * Hkv, vsb += cur->st0 * Hkv;
        } else if (ks) {
          for (int64_t t = 0; t < n; ++t) {
            const int64_t st = (kr[t] - kc) / row;
            std::copy(ks + st * Hkv + hk0, ks + st * Hkv + hk1, ks_st.data() + t * Hkv + hk0);
            std::copy(vs + st * Hkv + hk0, vs + st * Hkv + hk1, vs_st.data() + t * Hkv + hk0);
          }
          ksb = ks_st.data(), vsb = vs_st.data();
        }
        // V over the runs: fn(first token, tokens) per run, in token order
        const auto over_runs = [&](auto fn) {
          for (int64_t r = 0; r < runs; ++r) fn(cur->cut[r], cur->cut[r + 1] - cur->cut[r]);
        };
        // the row's next chunk's K (in this part or the next: a part run as its own task may leave the next one to
        // the other thread) and this chunk's V, prefetched over the K-scoring calls (see the top)
        RangePrefetcher pf;
        pf.set(*nxt, *cur, off[0], (hk1 - hk0) * D, row, token_major ? n : n / 8 * nh,
               k_in_v ? n * (nh * D / (kSeg * kW)) : 0);
        int64_t t = 0;
#ifdef JR_ATTN_AVX2
        if (token_major) {
          // Scores s[t * nh + h] and the softmax 8 heads per vector, every value bit-identical to the per-head path
          // below (the same reduce8 tree per score, dot() for the tail tokens past the last 8, exp_sub_sum's lanes
          // and sum order), so a row's result does not depend on the batch that decides nh.
          const __m256 sc = _mm256_set1_ps(sm_scale);
          const int64_t n8 = n / 8 * 8;
          for (; t < n8; ++t) {
            pf.issue();
            for (int64_t h = 0; h < nh; h += 8)
              _mm256_storeu_ps(&s[t * nh + h],
                               _mm256_mul_ps(dots8_heads(&qf[h * D], kr[t], &off[h], D), sc));
          }
          for (; t < n; ++t)
            for (int64_t h = 0; h < nh; ++h)
              s[t * nh + h] = dot(&qf[h * D], kr[t] + off[h], D) * sm_scale;
          for (int64_t h = 0; h < nh; h += 8) {
            __m256 mb = _mm256_loadu_ps(&m[h]);
            for (int64_t u = 0; u < n; ++u) mb = _mm256_max_ps(mb, _mm256_loadu_ps(&s[u * nh + h]));
            const __m256 mz = _mm256_andnot_ps(  // as the per-head path's mz: -inf lanes subtract 0
                _mm256_cmp_ps(mb, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ), mb);
            __m256 lane[8];  // lane[k] = exp_sub_sum's accumulator lane k: the sum over tokens u = k mod 8, u < n8
            for (int k = 0; k < 8; ++k) lane[k] = _mm256_setzero_ps();
            for (int64_t u = 0; u < n8; ++u) {
              const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(&s[u * nh + h]), mz));
              _mm256_storeu_ps(&s[u * nh + h], e);
              lane[u % 8] = _mm256_add_ps(lane[u % 8], e);
            }
            const __m256 sum = _mm256_add_ps(  // hsum8's tree: ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7))
                _mm256_add_ps(_mm256_add_ps(lane[0], lane[4]), _mm256_add_ps(lane[2], lane[6])),
                _mm256_add_ps(_mm256_add_ps(lane[1], lane[5]), _mm256_add_ps(lane[3], lane[7])));
            alignas(32) float mbs[8], mzs[8], sums[8];
            _mm256_store_ps(mbs, mb);
            _mm256_store_ps(mzs, mz);
            _mm256_store_ps(sums, sum);
            for (int64_t j = 0; j < 8; ++j) {
              float sum_j = sums[j];
              for (int64_t u = n8; u < n; ++u) sum_j += (s[u * nh + h + j] = std::exp(s[u * nh + h + j] - mzs[j]));
              const float alpha = std::exp(m[h + j] - mzs[j]);  // 0 on the first chunk (m = -inf)
              scale(&acc[(h + j) * D], alpha, D);
              l[h + j] *= alpha;
              l[h + j] += sum_j;
              m[h + j] = mbs[j];
            }
          }
          over_runs([&](int64_t t0, int64_t nt) {
            accumulate_v_rows(acc.data(), &s[t0 * nh], 1, nh, vr[t0] + off[0], row, nt, nh * D, D,
                              k_in_v ? &pf : nullptr);
          });
          continue;
        }
        if (D % kW == 0) {
          const __m256 sc = _mm256_set1_ps(sm_scale);
          for (; t + 8 <= n; t += 8)
            for (int64_t h = 0; h < nh; ++h) {
              pf.issue();
              const __m256 d8 = runs == 1 ? dots8(&qf[h * D], kr[t] + off[h], row, D)
                                          : dots8_rows(&qf[h * D], &kr[t], off[h], D);
              _mm256_storeu_ps(&s[h * kChunk + t], _mm256_mul_ps(d8, sc));
            }
        }
#endif
        for (; t < n; ++t)
          for (int64_t h = 0; h < nh; ++h)
            s[h * kChunk + t] = dot(&qf[h * D], kr[t] + off[h], D) * sm_scale;
        if (ks)
          for (int64_t h = 0; h < nh; ++h)
            for (int64_t u = 0; u < n; ++u) s[h * kChunk + u] *= ksb[u * Hkv + hk0 + h / G];
        for (int64_t h = 0; h < nh; ++h) {
          float mb = m[h];
          for (int64_t t = 0; t < n; ++t) mb = std::max(mb, s[h * kChunk + t]);
          // the max subtracted: mb, or 0 while every score so far is -inf (keys of -inf: only non-finite inputs),
          // which weighs those scores ~0 instead of exp(-inf - -inf) = NaN
          const float mz = mb == -std::numeric_limits<float>::infinity() ? 0.0f : mb;
          const float alpha = std::exp(m[h] - mz);  // 0 on the first chunk (m = -inf)
          scale(&acc[h * D], alpha, D);
          l[h] *= alpha;
          m[h] = mb;
          l[h] += exp_sub_sum(&s[h * kChunk], n, mz);
          if (vs)
            for (int64_t u = 0; u < n; ++u) s[h * kChunk + u] *= vsb[u * Hkv + hk0 + h / G];
          if (!rows_v)
            over_runs([&](int64_t t0, int64_t nt) {
              accumulate_v(&acc[h * D], &s[h * kChunk + t0], vr[t0] + off[h], row, nt, D);
            });
        }
        if (rows_v)
          over_runs([&](int64_t t0, int64_t nt) {
            accumulate_v_rows(acc.data(), &s[t0], kChunk, 1, vr[t0] + off[0], row, nt, nh * D, D,
                              k_in_v ? &pf : nullptr);
          });
      }
      if (parts > 1) {  // this part's state, for the merge
        float* state = (plan.split ? plan.scratch.data() + task * plan.slot_size()
                                   : local.data() + part * plan.slot_size());
        std::copy(m.begin(), m.begin() + nh, state);
        std::copy(l.begin(), l.begin() + nh, state + hq_max);
        std::copy(acc.begin(), acc.begin() + nh * D, state + 2 * hq_max);
        continue;
      }
      for (int64_t h = 0; h < nh; ++h) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;  // an empty context gives zeros
        for (int64_t d = 0; d < D; ++d) from_float(acc[h * D + d] * inv, o + (b * H + h0 + h) * D + d);
      }
    }
    if (parts > 1 && !plan.split)
      merge_parts([&](int64_t k) { return local.data() + k * plan.slot_size(); }, parts, nh, hq_max, D, acc.data(),
                  o + (b * H + h0) * D);
  }
  if (!plan.split) return;
#pragma omp for schedule(static)
  for (int64_t bc = 0; bc < B * chunks; ++bc) {
    const int64_t b = bc / chunks, c = bc % chunks, i0 = plan.row_item[b], parts = plan.row_item[b + 1] - i0;
    const int64_t hk0 = c * hk_per, hk1 = std::min(Hkv, hk0 + hk_per);
    if (parts == 1 || hk0 >= hk1) continue;
    merge_parts([&](int64_t k) { return plan.scratch.data() + ((i0 + k) * chunks + c) * plan.slot_size(); }, parts,
                (hk1 - hk0) * G, hq_max, D, acc.data(), o + (b * H + hk0 * G) * D);
  }
}

}  // namespace jr::attn
