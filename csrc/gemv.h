// The decode-time GEMV/GEMM core: y [M, N] = x [M, K] @ W [N, K]^T (+ bias [N]) for small M.
// Used by linear.cpp (the `linear` op) and decode_layer.cpp (inside its one parallel region).
//
// Decode reads every weight once per step, so the kernel is built around streaming W exactly once: W's rows are
// cut into chunks (a few per thread), a thread takes RN rows at a time and a K tile of them (small enough to stay in
// L1), and runs every row of x against that tile with an RN x RM block of vector accumulators before moving on.
// The RN rows of a block are not neighbours: a chunk is split into RN segments and block i takes row i of each, so
// the thread reads RN long sequential streams, one per segment. Reading RN adjacent rows in step (2 KiB apart at
// K = 512 fp32, the same 4 KiB page) kept the hardware prefetchers from following them: 15-18 GB/s instead of
// 27-30 GB/s for a plain read of the same bytes on the 2-core Zen 3 box (RESULTS.md).
// x is copied once per call into fp32 (`xp`, rows padded to stride ldx); for bf16 weights each 2*kWidth chunk of x
// is split into its even and odd elements, so a bf16 weight vector widens with one shift (even) and one mask (odd).
// For M >= 3 a bf16 tile is widened once into an fp32 scratch tile in that same order, and every row of x then
// runs the fp32 loop against it: the widening is paid once per weight instead of once per row of x.
// On a CPU with AVX512_BF16 (Zen 4/5, Sapphire Rapids), bf16 weights against bf16-valued x take a third route: x is
// packed as bf16 (`XP` = uint16_t, exact since its values are bf16) and each 32-element step is one VDPBF16PS per
// (W row, x row) pair, which multiplies the bf16 pairs exactly and adds both products into the fp32 lane: twice the
// multiply-adds per instruction of the fp32 FMA and no widening at all. fp32 x against bf16 weights keeps the fp32
// route (rounding x to bf16 would change the result).
// Batch invariance: every row of y is bit-identical whatever M is (each vector lane sums its products in k order,
// across K tiles, in every block shape; one horizontal-sum order; then the scalar tail and the bias), so a request's
// logits do not depend on what else is in the decode batch (tests/test_cpu_ops.py).
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "common.h"
#include "simd.h"

namespace jr::gemv {

using simd::vf;
constexpr int kW = simd::kWidth;
// Block sizes (overridable with -D for tuning), measured on the 2-core Zen 3 box (AVX2, 16 registers).
// M >= 3: 3 W rows x 4 x rows = 12 accumulators + 3 W vectors + 1 x vector = 16 registers, 7 loads per 12 FMAs,
// so the loop is FMA-bound; 4x3 measured the same, 6x2 / 1x8 / 2x4 / 2x6 slower.
// M <= 2: 6 W rows, memory-bound (as before; 1 / 2 / 3 / 4 / 8 rows were no faster).
// AVX-512 (32 registers): 6 x 4 = 24 accumulators + 4 x vectors + 1 W vector; on the 2-core Zen 5 box (2026-12-02)
// 1.1-1.25x the 3 x 4 block at fp32 M = 8 (builds alternated, 3 rounds); 4 x 8 (spills) in between.
#ifndef JR_LINEAR_RN
#if defined(__AVX512F__)
#define JR_LINEAR_RN 6
#else
#define JR_LINEAR_RN 3
#endif
#endif
#ifndef JR_LINEAR_RM
#define JR_LINEAR_RM 4
#endif
// The bf16 dot product (AVX512_BF16): 6 W rows x 4 x rows = 24 accumulators; on the 2-core Zen 5 box (2026-12-02,
// builds alternated) 1.1-1.2x the 3 x 4 block at M = 32 and 8.
#ifndef JR_LINEAR_RN_BF16DOT
#define JR_LINEAR_RN_BF16DOT 6
#endif
#ifndef JR_LINEAR_RN_SMALL_M
#define JR_LINEAR_RN_SMALL_M 6
#endif
// bf16 weights, M >= 3: a block is kPanel * kRN rows, widened together; each 4-row slice of x is then read from
// L2 once per block and reused from L1 by its kPanel sub-blocks (2 x 512: 12 KiB of widened W + 8 KiB of x).
#ifndef JR_LINEAR_PANEL
#define JR_LINEAR_PANEL 2
#endif
// 512 and 1024 measured the same for fp32 M = 8 (K = 1376); 512 keeps the bf16 panel in L1.
#ifndef JR_LINEAR_KTILE
#define JR_LINEAR_KTILE 512
#endif
// The bf16 dot product's K tile: 8192 (the whole K of every Janus-Pro GEMV: no accumulator store and reload between
// tiles; x's rows stream from L2) measured 1.1-1.8x the 512 tile at M = 32 (builds alternated, 3 rounds, 2026-12-02;
// in one process over the four 1B shapes: 512 213-268, 1024 252-305, 2048 275-341, 8192 283-345 GFLOP/s).
#ifndef JR_LINEAR_KTILE_BF16DOT
#define JR_LINEAR_KTILE_BF16DOT 8192
#endif
// Software prefetch of the next block's rows into L2 during the current block's first pass over x: fp32 weights and
// M >= 3 only. On the Zen 5 box (2026-12-02, in one process, 4 rounds) fp32 M = 8 at the small shapes 66-68 -> 73-76
// GFLOP/s; bf16 M = 32 (dot product) unchanged at any distance (1, 2 or 4 blocks), M <= 2 (memory-bound streams)
// unchanged on the Zen 3 box, so neither takes it.
#ifndef JR_LINEAR_PREFETCH
#define JR_LINEAR_PREFETCH 1
#endif
// Rows per segment (stream) of a chunk, the target: chunks are sized so that every thread gets the same number.
// 16, 32 and 64 measured the same (fp32 M = 1 and 8, bf16 M = 1 to 32); 8 and below lose to short streams.
#ifndef JR_LINEAR_SEG
#define JR_LINEAR_SEG 32
#endif
constexpr int kRN = JR_LINEAR_RN;                  // W rows per block (M >= 3)
constexpr int kRM = JR_LINEAR_RM;                  // x rows per block
constexpr int kRNS = JR_LINEAR_RN_SMALL_M;         // W rows per block (M <= 2)
constexpr int kRNDot = JR_LINEAR_RN_BF16DOT;       // W rows per block (M >= 3, bf16 dot product)
constexpr int kPanel = JR_LINEAR_PANEL;            // bf16, M >= 3: sub-blocks of kRN rows per block
constexpr int64_t kKTile = JR_LINEAR_KTILE;        // K elements per tile (a multiple of 2*kW)
constexpr int64_t kKTileDot = JR_LINEAR_KTILE_BF16DOT;  // the same for the bf16 dot product
constexpr bool kPrefetch = JR_LINEAR_PREFETCH;     // fp32 weights, M >= 3: prefetch the next block
constexpr int64_t kWbufLd = JR_LINEAR_KTILE + 16;  // row stride of the widened tile (padded like xp's)
constexpr int64_t kSeg = JR_LINEAR_SEG;            // rows per stream (target)

template <typename WT>
constexpr int step() {
  return std::is_same_v<WT, float> ? kW : 2 * kW;
}

using simd::kHaveBf16Dot;
// The element type of packed x for weights WT when x's values are those of WT (bf16 x for bf16 weights): bf16
// where the CPU has the bf16 dot product, else fp32.
template <typename WT>
using xpack_t = std::conditional_t<kHaveBf16Dot && std::is_same_v<WT, uint16_t>, uint16_t, float>;

// Pins a loaded vector in a register: without it GCC folds the load into every FMA that uses it, which turns one
// load per vector into one per FMA, and the loop becomes bound by L1 loads (2 x 256-bit per cycle on Zen 3).
inline vf in_reg(vf v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__AVX2__)
  asm("" : "+x"(v));
#endif
  return v;
}

// The horizontal sum of an accumulator: (lanes 0-3 as (0+1)+(2+3)) + (lanes 4-7 likewise), one order for every row.
inline float hsum_tree(vf a) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256 t = _mm256_hadd_ps(a, a);
  const __m256 u = _mm256_hadd_ps(t, t);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
#else
  return simd::hsum(a);
#endif
}

// hsum_tree of four accumulators at once (the same sums, one transposing hadd reduction instead of four).
inline void hsum_tree4(vf a, vf b, vf c, vf d, float* out) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#else
  out[0] = hsum_tree(a), out[1] = hsum_tree(b), out[2] = hsum_tree(c), out[3] = hsum_tree(d);
#endif
}

// For RN rows of W at `w` (row stride ldw) and RM rows of xp at `xp` (row stride ldx), over kn elements (whole
// steps; the scalar tail is rows_block's): the vector accumulator of (r, m) goes on with W[r, k] * x[m, k] — from
// zero on the first K tile, else from where the previous tile left it at part + (r * ldp + m) * kW. On the last
// tile (out not null) it is reduced into out[r * ldp + m], else stored back. Every lane sums its products in k
// order across the tiles and every accumulator reduces in hsum_tree's order, so a row's result depends neither
// on the tiling nor on which other rows of x share the block.
// Rows r < RN of pf (stride ldw) at offset k into L2, if pf is set.
// always_inline: as a plain inline function GCC 12 split it (-fpartial-inlining), found the outlined loop free of
// side effects and deleted the calls — the built extension had no prefetch instruction at all (2026-12-02).
template <int RN, typename WT>
__attribute__((always_inline)) inline void prefetch_rows(const WT* pf, int64_t ldw, int64_t k) {
  if (pf)
    for (int r = 0; r < RN; ++r) __builtin_prefetch(pf + r * ldw + k, 0, 2);
}

// pf (fp32 weights only, else null): the next block's rows at the same K offset, same stride; one line of each is
// prefetched into L2 per step while this block computes.
template <int RN, int RM, typename WT, typename XP>
inline void block_dot(const WT* w, int64_t ldw, const XP* xp, int64_t ldx, int64_t kn, float* part,
                      int64_t ldp, bool first, float* out, const WT* pf = nullptr) {
  vf acc[RN][RM];
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < RM; ++m) acc[r][m] = first ? simd::zero() : simd::load(part + (r * ldp + m) * kW);
  if constexpr (std::is_same_v<XP, uint16_t>) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    // bf16 W and x: lane j of acc[r][m] += W[r, 2j] x[m, 2j] + W[r, 2j+1] x[m, 2j+1], one instruction per step.
    static_assert(std::is_same_v<WT, uint16_t>);
    for (int64_t k = 0; k < kn; k += 2 * kW) {
      __m512bh wv[RN];
      for (int r = 0; r < RN; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * ldw + k);
      for (int m = 0; m < RM; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + m * ldx + k);
        for (int r = 0; r < RN; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
#endif
  } else if constexpr (std::is_same_v<WT, float> && RN <= RM) {
    // Hold the RN W vectors, stream the RM x vectors: RN*RM + RN + 1 registers.
    for (int64_t k = 0; k < kn; k += kW) {
      prefetch_rows<RN>(pf, ldw, k);
      vf wv[RN];
      for (int r = 0; r < RN; ++r) wv[r] = in_reg(simd::load(w + r * ldw + k));
      for (int m = 0; m < RM; ++m) {
        const vf xv = RN > 1 ? in_reg(simd::load(xp + m * ldx + k)) : simd::load(xp + m * ldx + k);
        for (int r = 0; r < RN; ++r) acc[r][m] = simd::fma(wv[r], xv, acc[r][m]);
      }
    }
  } else if constexpr (std::is_same_v<WT, float>) {
    // Hold the RM x vectors, stream the RN W vectors: RN*RM + RM + 1 registers.
    for (int64_t k = 0; k < kn; k += kW) {
      prefetch_rows<RN>(pf, ldw, k);
      vf xv[RM];
      for (int m = 0; m < RM; ++m) xv[m] = simd::load(xp + m * ldx + k);
      for (int r = 0; r < RN; ++r) {
        const vf wv = RM > 1 ? in_reg(simd::load(w + r * ldw + k)) : simd::load(w + r * ldw + k);
        for (int m = 0; m < RM; ++m) acc[r][m] = simd::fma(wv, xv[m], acc[r][m]);
      }
    }
  } else {
    for (int64_t k = 0; k < kn; k += 2 * kW) {
      for (int r = 0; r < RN; ++r) {
        vf we, wo;
        simd::load_bf16_pairs(w + r * ldw + k, we, wo);
        for (int m = 0; m < RM; ++m) {
          acc[r][m] = simd::fma(we, simd::load(xp + m * ldx + k), acc[r][m]);
          acc[r][m] = simd::fma(wo, simd::load(xp + m * ldx + k + kW), acc[r][m]);
        }
      }
    }
  }
  if (!out) {
    for (int r = 0; r < RN; ++r)
      for (int m = 0; m < RM; ++m) simd::store(part + (r * ldp + m) * kW, acc[r][m]);
    return;
  }
  for (int r = 0; r < RN; ++r) {
    int m = 0;
    for (; m + 4 <= RM; m += 4) hsum_tree4(acc[r][m], acc[r][m + 1], acc[r][m + 2], acc[r][m + 3], out + r * ldp + m);
    for (; m < RM; ++m) out[r * ldp + m] = hsum_tree(acc[r][m]);
  }
}

// block_dot<RS, R> for the R = rm rows left at the end of x (rm < RMX), chosen at run time.
template <int RS, int R, typename WT, typename XP>
inline void block_dot_tail(int64_t rm, const WT* w, int64_t ldw, const XP* xp, int64_t ldx, int64_t kn,
                           float* part, int64_t ldp, bool first, float* out, const WT* pf) {
  if constexpr (R >= 1) {
    if (rm == R) block_dot<RS, R>(w, ldw, xp, ldx, kn, part, ldp, first, out, pf);
    else block_dot_tail<RS, R - 1>(rm, w, ldw, xp, ldx, kn, part, ldp, first, out, pf);
  }
}

// All M rows of xp (row stride ldx) against RN rows of W (row stride ldw), kn elements: RMX rows of x at a time,
// each against the RN rows RS at a time (RS < RN: the x rows come from L2 once per RN rows, then from L1).
// part: the vector accumulators between K tiles (RN*M*kW floats); out: the reduced sums (RN*M), on the last tile.
// pf: the next block's rows, prefetched during the first pass over x.
template <int RN, int RMX, int RS, typename WT, typename XP>
inline void block_dot_all_m(const WT* w, int64_t ldw, const XP* xp, int64_t ldx, int64_t M, int64_t kn,
                            float* part, bool first, float* out, const WT* pf = nullptr) {
  static_assert(RN % RS == 0);
  for (int64_t m0 = 0; m0 < M; m0 += RMX) {
    const int64_t rm = std::min<int64_t>(RMX, M - m0);
    for (int s = 0; s < RN; s += RS) {
      const WT* ws = w + s * ldw;
      const XP* xs = xp + m0 * ldx;
      float* ps = part + (s * M + m0) * kW;
      float* os = out ? out + s * M + m0 : nullptr;
      const WT* pfs = pf && m0 == 0 ? pf + s * ldw : nullptr;
      if (rm == RMX) block_dot<RS, RMX>(ws, ldw, xs, ldx, kn, ps, M, first, os, pfs);
      else block_dot_tail<RS, RMX - 1>(rm, ws, ldw, xs, ldx, kn, ps, M, first, os, pfs);
    }
  }
}

// dst[r * kWbufLd + j] = W[r, k0 + j] as fp32, for j < kn (whole steps): the bf16 pairs come out as [even, odd]
// vectors, the order pack_x gives x.
template <int RN>
inline void widen_tile(const uint16_t* w, int64_t ldw, int64_t kn, float* dst) {
  for (int r = 0; r < RN; ++r)
    for (int64_t k = 0; k < kn; k += 2 * kW) {
      vf we, wo;
      simd::load_bf16_pairs(w + r * ldw + k, we, wo);
      simd::store(dst + r * kWbufLd + k, we);
      simd::store(dst + r * kWbufLd + k + kW, wo);
    }
}

// RN rows of W, rows n0 + r * rs (r < RN), against all M rows of x (xp, row stride ldx); writes those columns of y.
// part holds RN*M*kW + RN*M floats (the vector accumulators, then the sums), wbuf RN*kWbufLd floats (bf16 weights
// with M >= 3 only).
// Batch invariance: a row of y is bit-identical for any M (each lane sums in k order, then hsum_tree, then the
// scalar tail and the bias, whatever the block shape or K tiling), so a request's logits do not depend on which
// other rows share its decode step.
template <int RN, int RMX, int RS, typename WT, typename XP>
void rows_block(const WT* w, const XP* xp, int64_t ldx, const float* bias, float* y, int64_t M, int64_t N,
                int64_t K, int64_t n0, int64_t rs, float* part, float* wbuf, int64_t n_next = -1) {
  const int64_t kvec = K / step<WT>() * step<WT>();
  // fp32 weights, M >= 3: the next block (first row n_next) is prefetched while this one computes
  const WT* pf = std::is_same_v<WT, float> && kPrefetch && M >= 3 && n_next >= 0 ? w + n_next * K : nullptr;
  float* sums = part + RN * M * kW;
  std::fill(sums, sums + RN * M, 0.0f);  // K < one step: no tile runs
  const WT* wb = w + n0 * K;
  const int64_t ldw = rs * K;
  // One pass over x (RMX >= M) reuses nothing from a K tile: then the whole K is one tile — unless the tile is
  // widened into wbuf, which holds kKTile columns.
  const bool widen = !std::is_same_v<WT, float> && std::is_same_v<XP, float> && RMX >= 3 && M >= 3;
  const int64_t ktile = M <= RMX && !widen ? std::max<int64_t>(kvec, 1)
                        : std::is_same_v<XP, uint16_t> ? kKTileDot : kKTile;
  for (int64_t k0 = 0; k0 < kvec; k0 += ktile) {
    const int64_t kn = std::min(ktile, kvec - k0);
    const bool first = k0 == 0;
    float* out = k0 + kn >= kvec ? sums : nullptr;
    if constexpr (!std::is_same_v<WT, float> && std::is_same_v<XP, float> && RMX >= 3) {
      if (M >= 3) {
        widen_tile<RN>(wb + k0, ldw, kn, wbuf);
        block_dot_all_m<RN, RMX, RS>(static_cast<const float*>(wbuf), kWbufLd, xp + k0, ldx, M, kn, part, first,
                                     out);
        continue;
      }
    }
    block_dot_all_m<RN, RMX, RS>(wb + k0, ldw, xp + k0, ldx, M, kn, part, first, out, pf ? pf + k0 : nullptr);
  }
  for (int r = 0; r < RN; ++r) {
    const float b = bias ? bias[n0 + r * rs] : 0.0f;
    for (int64_t m = 0; m < M; ++m) {
      float s = sums[r * M + m];
      if (kvec < K) {
        float t = 0.0f;
        for (int64_t k = kvec; k < K; ++k) t += to_float(wb[r * ldw + k]) * to_float(xp[m * ldx + k]);
        s += t;
      }
      y[m * N + n0 + r * rs] = s + b;
    }
  }
}

// Row stride of xp: K padded so that the rows do not all fall on the same L1 sets (with K a multiple of 1024,
// rows 4 KiB apart made the 4 x rows and the 3 W rows of a block compete for one 8-way set).
inline int64_t x_stride(int64_t K) { return (K + 15) / 16 * 16 + 16; }

// xp [M, ldx] fp32; for bf16 weights each whole 2*kW chunk is stored as [even elements, odd elements]. With
// XP = uint16_t (xpack_t, the bf16 dot product) xp is x as bf16 in its own order: x's values must be bf16 ones.
template <typename WT, typename XT, typename XP>
void pack_x(const XT* x, XP* xp, int64_t M, int64_t K, int64_t ldx) {
  const int64_t kvec = K / step<WT>() * step<WT>();
  for (int64_t m = 0; m < M; ++m) {
    const XT* src = x + m * K;
    XP* dst = xp + m * ldx;
    if constexpr (std::is_same_v<XP, uint16_t>) {
      for (int64_t k = 0; k < K; ++k) from_float(to_float(src[k]), dst + k);
    } else if constexpr (std::is_same_v<WT, float>) {
      simd::widen(src, dst, K);
    } else if constexpr (std::is_same_v<XT, uint16_t>) {
      for (int64_t c = 0; c < kvec; c += 2 * kW) {
        simd::vf even, odd;
        simd::load_bf16_pairs(src + c, even, odd);
        simd::store(dst + c, even), simd::store(dst + c + kW, odd);
      }
      simd::widen(src + kvec, dst + kvec, K - kvec);
    } else {
      for (int64_t c = 0; c < kvec; c += 2 * kW)
        for (int i = 0; i < kW; ++i) dst[c + i] = src[c + 2 * i], dst[c + kW + i] = src[c + 2 * i + 1];
      simd::widen(src + kvec, dst + kvec, K - kvec);
    }
  }
}

// The body of a parallel region over W's rows: an orphaned `omp for` over chunks, ending with the team's barrier.
// Chunk c is rows [c0, c1); its first RN * seg rows form RN segments of seg rows, block i = row i of each segment
// (rows c0 + i + j * seg), and the last (c1 - c0) % RN rows go one at a time. The number of chunks is a multiple
// of the team size, about kSeg rows per segment; dynamic scheduling keeps the threads even when another process
// takes part of a core.
template <int RN, int RMX, int RS, typename WT, typename XP>
void blocks_for(const WT* w, const XP* xp, int64_t ldx, const float* bias, float* y, int64_t M, int64_t N,
                int64_t K) {
  const bool widen = !std::is_same_v<WT, float> && std::is_same_v<XP, float> && M >= 3;
  std::vector<float> part(static_cast<size_t>(RN * M * (kW + 1)));
  std::vector<float> wbuf(widen ? static_cast<size_t>(RN * kWbufLd) : 0);
  const int64_t team = omp_get_num_threads(), per_round = team * RN * kSeg;
  const int64_t chunks = team * ((N + per_round - 1) / per_round);
#pragma omp for schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t c0 = N * c / chunks, c1 = N * (c + 1) / chunks, seg = (c1 - c0) / RN;
    for (int64_t i = 0; i < seg; ++i)
      rows_block<RN, RMX, RS>(w, xp, ldx, bias, y, M, N, K, c0 + i, seg, part.data(), wbuf.data(),
                              i + 1 < seg ? c0 + i + 1 : -1);
    for (int64_t n = c0 + RN * seg; n < c1; ++n)
      rows_block<1, RMX, 1>(w, xp, ldx, bias, y, M, N, K, n, 1, part.data(), wbuf.data());
  }
}

// Inside an OpenMP parallel region (ends with the team's barrier), or on the calling thread outside one:
// y [M, N] fp32 = xp @ w^T + bias, with xp [M, ldx] packed by pack_x<WT> (ldx = x_stride(K)); XP = uint16_t
// (bf16 weights and bf16 x, xpack_t) takes the bf16 dot product.
template <typename WT, typename XP>
void gemv_for(const WT* w, const XP* xp, int64_t ldx, const float* bias, float* y, int64_t M, int64_t N,
              int64_t K) {
  static_assert(std::is_same_v<XP, float> || (kHaveBf16Dot && std::is_same_v<WT, uint16_t>));
  if (M <= 2) blocks_for<kRNS, 2, kRNS>(w, xp, ldx, bias, y, M, N, K);
  else if constexpr (std::is_same_v<XP, uint16_t>) blocks_for<kRNDot, kRM, kRNDot>(w, xp, ldx, bias, y, M, N, K);
  else if constexpr (std::is_same_v<WT, float>) blocks_for<kRN, kRM, kRN>(w, xp, ldx, bias, y, M, N, K);
  else blocks_for<kRN * kPanel, kRM, kRN>(w, xp, ldx, bias, y, M, N, K);
}

}  // namespace jr::gemv
