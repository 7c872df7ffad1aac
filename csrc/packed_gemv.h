// The decode GEMV over weights packed once: y [M, N] fp32 = x [M, K] @ W [N, K]^T (+ bias) with x in W's dtype:
// bf16 x and W on CPUs with AVX512_BF16 (Zen 4/5, Sapphire Rapids), or fp32 x and W on any build. Used by
// `decode_layer` (the LLM's four weights per layer, packed by cpu_step.DecodeStack) and the `linear_packed` op
// (cpu_ops.PackedWeight).
//
// Layout: packed_layout.h (strips of 64 output columns stored step by step, a step one k or one k pair, cut into K
// tiles; a bf16 tile holds each vector's 16 columns as a run of its own), so one vector load holds step p of kW columns: for
// bf16 the (2p, 2p+1) pairs of 16 rows of W, exactly a VDPBF16PS operand. The kernel broadcasts x's step (one fp32,
// or the bf16 pair as a 32-bit word) and runs acc[m][v] += W[step, vector v] * x[m, step] for a 6 x 4 register
// block (6 rows of x, 4 vectors of W = 24 accumulators), so every lane is one y[m, n] and no horizontal sums remain.
// Blocking: a strip is cut into K tiles of ktile<WT>() steps (32 KiB fp32, 64 KiB bf16 unless set: packed_layout.h);
// every row block of x runs over a tile while it is in L1/L2, the accumulators wait in a per-thread [M, S] fp32
// buffer between tiles.
// While the row blocks run, the next tile in memory (the strip's next one or the next strip's first) is prefetched,
// spread over the row blocks so that the weight stream is read at an even rate instead of in bursts at each tile's
// first block — from 3 rows of x on (for 1 or 2 the hardware prefetchers read the stream faster alone, Zen 4 in
// 2026-12-03's measurements), for bf16 from 1 row on Zen 5 (zen5_rule) and, since 2026-12-06, on Zen 4.
// Against gemv.h's row-block kernel on the unpacked W (bf16, 2-core Zen 5, 2026-12-02, bench/RESULTS.md): ~1.8x at
// M = 32, ~1.5x at M = 2-8, with W from DRAM.
// On CPUs with AMX-BF16 (and a build for them), bf16 weights with K a multiple of 32 go to amx_gemv.h instead: the same
// layout read as AMX tiles.
// Batch invariance: y[m, n] = bias[n] + (((0 + step 0) + step 1) + ...) in fp32 lanes (FMA, or the pair's dot
// product), steps in k order whatever M, the tiling or the row block is, so a row of y is bit-identical for any M
// (tests/test_cpu_ops.py).
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "amx_gemv.h"
#include "common.h"
#include "cpu_family.h"
#include "gemv.h"
#include "packed_layout.h"
#include "simd.h"

// __builtin_prefetch locality of the next tile: 3 = prefetcht0 (L1), 2 = prefetcht1 (L2). bf16 by the rows of x:
// up to JR_PACKED_PF_L2_MAX_ROWS_BF16 rows t1, more t0. On the 2-core Zen 4 host (tenth session, 2026-12-03,
// bench_ab, 1B shape, middle half, GB/s of weights t0 -> t1): M = 1 23.2 -> 27.2, 2 24.1 -> 30.0, 8 17.9 -> 24.1,
// 12 17.3 -> 22.0, 16 13.2 -> 17.2, 18 13.0 -> 17.0; but 20 16.5 -> 14.5, 24 14.6 -> 13.4, 32 10.1 -> 9.7 (Zen 5
// 2026-12-03: t1 -11 % at M = 32; Zen 4, ninth session: the 1B decoder layers at M = 32 -3 % with t1). Up to 18
// rows x takes at most 3 row blocks per tile (see gemv_for), from 20 four or more. fp32: t1 at any M (Zen 4, ninth
// session, bench_ab: small shape M = 8 21.6 -> 23.2 GB/s, whole small fp32 generations 20.0 -> 23.8, where its
// 32 KiB tiles fill the 32 KiB L1 that t0 prefetched them into; Zen 5, fourth session: t0 / t1 / t2 / NTA alike).
// (A build's own -DJR_PACKED_PF_LOCALITY_BF16_FEW or -DJR_PACKED_PF_MIN_ROWS, e.g. through JANUS_RT_CXXFLAGS, holds
// on Zen 5 too unless its _ZEN5 counterpart below is given as well.)
#if defined(JR_PACKED_PF_LOCALITY_BF16_FEW) && !defined(JR_PACKED_PF_LOCALITY_BF16_FEW_ZEN5)
#define JR_PACKED_PF_LOCALITY_BF16_FEW_ZEN5 JR_PACKED_PF_LOCALITY_BF16_FEW
#endif
#if defined(JR_PACKED_PF_MIN_ROWS) && !defined(JR_PACKED_PF_MIN_ROWS_BF16_ZEN5)
#define JR_PACKED_PF_MIN_ROWS_BF16_ZEN5 JR_PACKED_PF_MIN_ROWS
#endif
#if defined(JR_PACKED_PF_MIN_ROWS) && !defined(JR_PACKED_PF_MIN_ROWS_BF16_ZEN4)
#define JR_PACKED_PF_MIN_ROWS_BF16_ZEN4 JR_PACKED_PF_MIN_ROWS
#endif
#ifndef JR_PACKED_PF_LOCALITY_BF16_FEW  // up to JR_PACKED_PF_L2_MAX_ROWS_BF16 rows
#define JR_PACKED_PF_LOCALITY_BF16_FEW 2
#endif
#ifndef JR_PACKED_PF_LOCALITY_BF16  // more rows
#define JR_PACKED_PF_LOCALITY_BF16 3
#endif
#ifndef JR_PACKED_PF_L2_MAX_ROWS_BF16
#define JR_PACKED_PF_L2_MAX_ROWS_BF16 18
#endif
#ifndef JR_PACKED_PF_LOCALITY_F32
#define JR_PACKED_PF_LOCALITY_F32 2
#endif
// Rows of x from which the next tile is prefetched at all: with fewer, the loop is a bare weight stream and the
// hardware prefetchers alone read it faster (Zen 4, eleventh session, 2026-12-03, bench_ab, 1B shape bf16, GB/s of
// weights, middle half / fastest quarter, prefetch -> none: M = 1 26.2 / 30.8 -> 29.1 / 38.4, the stream probe's
// rate; M = 2 33.6 / 33.3 -> 36.1 / 36.5; M = 3 alike; but M = 4 23.4 / 26.5 -> 24.6 / 21.7, M = 8 22.7 -> 18.5,
// M = 16 17.6 -> 15.0. Small shape fp32: M = 1 24.9 -> 26.2, M = 2 28.0 -> 27.6). Likely: each software prefetch
// holds one of the core's few L1 miss buffers until its line arrives, capping the lines in flight below what the
// L2's own stream prefetcher keeps going; with more rows the compute between loads needs the early requests.
#ifndef JR_PACKED_PF_MIN_ROWS
#define JR_PACKED_PF_MIN_ROWS 3
#endif
// Zen 5 (AMD family 0x1A and later) measured the other way for bf16 (2-core Zen 5 VM, thirtieth session, 2026-12-06,
// bench_ab, 1B shape, middle half / fastest quarter, GB/s of weights): the next tile prefetched from M = 1 on, M = 2
// 42.6 / 49.2 -> 48.3 / 59.7 with t1, 49.2 / 67.2 with t0; M = 1 42.3 -> 44.5 (t0); and t0 up to 18 rows too, M = 4
// 59.8 -> 65.0, M = 8 59.6 -> 68.4, M = 16 40.5 -> 42.2. Whole n = 1 generations (bench_ab --op engine, 128
// tokens): 55.3 -> 69.4 GB/s. fp32 at M = 2 alike with and without (75.4 / 75.1), so fp32 keeps the rule above.
#ifndef JR_PACKED_PF_MIN_ROWS_BF16_ZEN5
#define JR_PACKED_PF_MIN_ROWS_BF16_ZEN5 1
#endif
#ifndef JR_PACKED_PF_LOCALITY_BF16_FEW_ZEN5
#define JR_PACKED_PF_LOCALITY_BF16_FEW_ZEN5 3
#endif
// Zen 4 (cpu::zen4()) now measures the same way for bf16, with the default locality (t1) for few rows (2-core Zen 4
// VM, thirty-eighth session, 2026-12-06, bench_ab --op engine, 1B shape, n = 1 (2 rows), 96 tokens, 24 reps, GB/s of
// a step's bytes, slowest / middle / fastest quarter of the stream probe, none -> from 1 row: 30.5 / 30.9 / 32.4 ->
// 31.2 / 32.0 / 32.9, and with the builds' order swapped 27.8 / 28.9 / 28.8 -> 31.1 / 31.1 / 32.6; the GEMV alone at
// M = 1 alike, middle half in two runs 32.0 / 33.0 -> 32.2 / 33.1). fp32 keeps 3 (small shape n = 1: 29.3 / 31.4 /
// 37.8 -> 30.1 / 29.6 / 34.6).
// The eleventh session's opposite result (above) was on the code of 2026-12-03.
#ifndef JR_PACKED_PF_MIN_ROWS_BF16_ZEN4
#define JR_PACKED_PF_MIN_ROWS_BF16_ZEN4 1
#endif

// A block of 7-8 rows runs as two passes over the tile, vectors 0-1 then 2-3 of each step (8 x 2 accumulators, no
// spills; the second pass reads the tile from L2) instead of one 8 x 4 pass that spills ~5 accumulators per step.
// bf16 on (Zen 4, twelfth session, 2026-12-04, bench_ab, 1B shape, middle half / fastest quarter, GB/s: M = 8 GEMV
// 33.0 / 34.8 -> 34.5 / 36.5; whole n = 4 generations of 64 tokens 41.2 / 41.7 -> 45.3 / 44.9 and, again, 39.9 /
// 40.1 -> 42.7 / 41.7); fp32 off (small shape M = 8: 31.3 / 34.3 -> 31.2 / 31.5).
#ifndef JR_PACKED_HALF_STRIP_BF16
#define JR_PACKED_HALF_STRIP_BF16 1
#endif
#ifndef JR_PACKED_HALF_STRIP_F32
#define JR_PACKED_HALF_STRIP_F32 0
#endif

namespace jr::packed {

using simd::vf;
constexpr int kW = simd::kWidth;
// Whether this build has the packed GEMV for weights WT (fp32: always; bf16: with the bf16 dot product).
template <typename WT>
constexpr bool available() {
  return std::is_same_v<WT, float> || simd::kHaveBf16Dot;
}

// Whether the next tile's prefetch follows Zen 5's rule here (see the top): bf16 weights on AMD family 0x1A and later.
template <typename WT>
inline bool zen5_rule() {
  return !std::is_same_v<WT, float> && cpu::zen5_or_later();
}
// The rows of x from which the next tile is prefetched on this CPU (see the top).
template <typename WT>
inline int64_t prefetch_min_rows() {
  if (std::is_same_v<WT, float>) return JR_PACKED_PF_MIN_ROWS;
  return cpu::zen5_or_later() ? JR_PACKED_PF_MIN_ROWS_BF16_ZEN5
         : cpu::zen4()        ? JR_PACKED_PF_MIN_ROWS_BF16_ZEN4
                              : JR_PACKED_PF_MIN_ROWS;
}

constexpr int kMB = 6;       // x rows per register block: 6 x 4 = 24 accumulators
constexpr int kMBSmall = 8;  // M <= 8: all rows in one block (fp32: 8 x 4 spills a few accumulators, but one
                             // pass over each tile instead of two: M = 8 ~1.1-1.2x, bench/RESULTS.md; bf16: the
                             // half-strip passes below)
// The row block: MB rows of x (row stride ldx, at this tile's first step) against kn steps of one strip's tile wt;
// c [MB, strip] fp32 holds the accumulators between tiles (first: start from zero). Meanwhile lpk lines of the
// range [pf, pe) are prefetched per step with locality Loc. NV < 4: only vectors v0 .. v0 + NV - 1 of each step.
template <typename WT, int MB, int Loc, int NV = 4>
inline void block(const WT* wt, const WT* x, int64_t ldx, int64_t kn, float* c, bool first, const char* pf,
                  const char* pe, int lpk, int v0 = 0) {
  constexpr int64_t S = strip<WT>(), RE = run_elems<WT>();
  const WT* wv[NV];  // vector v0 + v of the tile's first step; step p is p * RE further
  for (int v = 0; v < NV; ++v) wv[v] = vec_at(wt, kn, v0 + v);
  vf acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = first ? simd::zero() : simd::load(c + m * S + (v0 + v) * kW);
  for (int64_t p = 0; p < kn; ++p) {
    for (int l = 0; l < lpk; ++l, pf += 64)
      if (pf < pe) __builtin_prefetch(pf, 0, Loc);
    if constexpr (std::is_same_v<WT, float>) {
      vf w[NV];
      for (int v = 0; v < NV; ++v) w[v] = simd::load(wv[v] + p * RE);
      for (int m = 0; m < MB; ++m) {
        const vf xb = simd::set1(x[m * ldx + p]);
        for (int v = 0; v < NV; ++v) acc[m][v] = simd::fma(w[v], xb, acc[m][v]);
      }
    } else {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
      __m512bh w[NV];
      for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(wv[v] + p * RE);
      for (int m = 0; m < MB; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * ldx + 2 * p, sizeof(pair));
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], w[v], xb);
      }
#endif
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) simd::store(c + m * S + (v0 + v) * kW, acc[m][v]);
}

// block<R> for mb = R <= RMax rows (a block of fewer than 6 rows, or all of a small x), chosen at run time.
template <typename WT, int R, int Loc>
inline void block_tail(int mb, const WT* wt, const WT* x, int64_t ldx, int64_t kn, float* c, bool first,
                       const char* pf, const char* pe, int lpk) {
  if constexpr (R >= 1) {
    if (mb == R) {
      if constexpr ((std::is_same_v<WT, float> ? JR_PACKED_HALF_STRIP_F32 : JR_PACKED_HALF_STRIP_BF16) && R > kMB) {
        // the half-strip passes (see JR_PACKED_HALF_STRIP_BF16), each prefetching half of the next tile's share
        const char* mid = pf + ((pe - pf) / 128) * 64;
        block<WT, R, Loc, 2>(wt, x, ldx, kn, c, first, pf, mid, (lpk + 1) / 2, 0);
        block<WT, R, Loc, 2>(wt, x, ldx, kn, c, first, mid, pe, (lpk + 1) / 2, 2);
      } else {
        block<WT, R, Loc>(wt, x, ldx, kn, c, first, pf, pe, lpk);
      }
    }
    else block_tail<WT, R - 1, Loc>(mb, wt, x, ldx, kn, c, first, pf, pe, lpk);
  }
}

// One row block of mb rows, prefetching with locality Loc: the 6-row kernel or block_tail's.
template <typename WT, int Loc>
inline void row_block(int mb, const WT* wt, const WT* x, int64_t ldx, int64_t kn, float* c, bool first,
                      const char* pf, const char* pe, int lpk) {
  if (mb == kMB) block<WT, kMB, Loc>(wt, x, ldx, kn, c, first, pf, pe, lpk);
  else block_tail<WT, kMBSmall, Loc>(mb, wt, x, ldx, kn, c, first, pf, pe, lpk);
}

// Inside an OpenMP parallel region (an orphaned `omp for`, ending with the team's barrier), or on the calling thread
// outside one: y [M, N] fp32 = x @ W^T + bias, wp = pack(W), x [M, ldx] in WT (bf16: ldx even, K even), bias fp32
// [N] or null. Callers check available<WT>(). Strips are dealt out by OpenMP's guided schedule: contiguous runs
// (a thread's weight stream stays sequential) that shrink to one strip at the end, so the two threads reach the
// closing barrier together. Against 4 equal runs per thread, dealt dynamically: +5 % at fp32 M = 8, +3 % at M = 2,
// +1-5 % at bf16 M = 32 from DRAM (bench_ab, 2026-12-03; the barrier waits had been ~10-20 us per call).
template <typename WT>
void gemv_for(const WT* wp, const WT* x, int64_t ldx, const float* bias, float* y, int64_t M, int64_t N,
              int64_t K) {
  static_assert(available<WT>(), "no packed GEMV for these weights in this build");
#if JR_HAVE_AMX
  if constexpr (std::is_same_v<WT, uint16_t>) {
    if (amx::use(K)) return amx::gemv_for(wp, x, ldx, bias, y, M, N, K);
  }
#endif
  constexpr int64_t S = strip<WT>(), E = ek<WT>(), SE = step_elems<WT>();
  const int64_t KT = ktile<WT>();
  const int64_t KS = K / E, strips = num_strips(N, S);
  const char* end = reinterpret_cast<const char*>(wp + packed_size<WT>(N, K));
  // Row blocks per tile, and their sizes: M <= 8 one block; else ceil(M / 6) blocks of as even a size as can be
  // (32 rows: 6, 6, 5, 5, 5, 5 rather than five of 6 and one of 2: a 2-row pass reads the tile from L2 as a 6-row
  // one does for a third of the work).
  const int64_t passes = M <= kMBSmall ? 1 : (M + kMB - 1) / kMB;
  const int64_t mb_lo = M / passes, n_hi = M % passes;  // the first n_hi blocks take mb_lo + 1 rows
  // the next tile's prefetch (see the top): from prefetch_min_rows rows of x on; its locality fp32's, or bf16's for
  // more rows, or for few rows the CPU's rule's
  constexpr bool f32 = std::is_same_v<WT, float>;
  constexpr int kLocMany = f32 ? JR_PACKED_PF_LOCALITY_F32 : JR_PACKED_PF_LOCALITY_BF16;
  constexpr int kLocFew = f32 ? JR_PACKED_PF_LOCALITY_F32 : JR_PACKED_PF_LOCALITY_BF16_FEW;
  constexpr int kLocFewZen5 = f32 ? JR_PACKED_PF_LOCALITY_F32 : JR_PACKED_PF_LOCALITY_BF16_FEW_ZEN5;
  const int64_t pf_rows = prefetch_min_rows<WT>();
  const int loc_case = f32 || M > JR_PACKED_PF_L2_MAX_ROWS_BF16 ? 0 : zen5_rule<WT>() ? 2 : 1;
  std::vector<float> c(static_cast<size_t>(M * S));
#pragma omp for schedule(guided, 1)
  for (int64_t s = 0; s < strips; ++s) {
    const WT* ws = wp + s * KS * SE;
    for (int64_t k0 = 0; k0 < KS; k0 += KT) {
      const int64_t kn = std::min(KT, KS - k0);
      const WT* tile = ws + k0 * SE;
      // the next tile's cache lines, one share per row block
      const NextTile nt(reinterpret_cast<const char*>(tile + kn * SE), end, KT * SE * sizeof(WT), passes, kn,
                        M >= pf_rows);
      for (int64_t m0 = 0, j = 0; j < passes; m0 += mb_lo + (j < n_hi), ++j) {
        const int mb = int(mb_lo + (j < n_hi));
        const WT* xs = x + m0 * ldx + E * k0;
        float* cs = c.data() + m0 * S;
        if (loc_case == 1) row_block<WT, kLocFew>(mb, tile, xs, ldx, kn, cs, k0 == 0, nt.begin(j), nt.end(j), nt.lpk);
        else if (loc_case == 2)
          row_block<WT, kLocFewZen5>(mb, tile, xs, ldx, kn, cs, k0 == 0, nt.begin(j), nt.end(j), nt.lpk);
        else row_block<WT, kLocMany>(mb, tile, xs, ldx, kn, cs, k0 == 0, nt.begin(j), nt.end(j), nt.lpk);
      }
    }
    const int64_t n0 = s * S, nn = std::min(S, N - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nn; ++j) y[m * N + n0 + j] = c[m * S + j] + (bias ? bias[n0 + j] : 0.0f);
  }
}

// y [M, N] = xp @ W^T + bias through the GEMV W's layout needs: this file's for a packed W, else gemv.h's (xp packed
// by gemv::pack_x<T>; the two agree on it wherever packing is available). Inside a region, as both gemv_for.
template <typename T>
void gemv_for_layout(bool is_packed, const T* w, const gemv::xpack_t<T>* xp, int64_t ldx, const float* bias, float* y,
                     int64_t M, int64_t N, int64_t K) {
  if constexpr (available<T>() && std::is_same_v<gemv::xpack_t<T>, T>) {
    if (is_packed) return gemv_for(w, xp, ldx, bias, y, M, N, K);
  }
  gemv::gemv_for(w, xp, ldx, bias, y, M, N, K);
}

}  // namespace jr::packed
