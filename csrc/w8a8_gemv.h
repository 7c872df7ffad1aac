// The int8 x int8 GEMV (W8A8): y [M, N] fp32 = (x [M, K] @ W^T) with W ~ Q [N, K] * sw [N] (int8, one fp32 scale per
// output row: the weights --int8 holds) and x ~ X8 * sx, x quantized to int8 on the fly per row and per group of kG
// = 512 columns (one scale per group, kv_int8.h's quantizer: s = max|x| * fp32(1/127), X8 = round-half-even(x / s)).
// For CPUs with AVX512-VNNI (Zen 4/5; on CPUs with AMX-INT8, from 4 rows of x, amx_w8a8.h's tiles instead, the same
// bits): a weight-only int8 GEMV widens Q to bf16 for VDPBF16PS (32 MACs an instruction), where VPDPBUSD takes the
// int8 bytes as they are (64 MACs an instruction). Measured on the 2-core
// Zen 5 VM (2026-12-05, one core, independent chains): 8.95 G VPDPBUSD/s (573 GMAC/s) vs 8.25 G VDPBF16PS/s (264).
// The price: x is rounded to 8 bits per group (error <= max|x_group| / 254 per value) on top of W's rounding.
// Measured on that host, the 96 projections of the 1B LLM from DRAM, 2 threads, ms a pass (bf16 packed / weight-only
// int8 / this): 32 rows 80-81 / ~130 / 43-46, 2 rows 42-44 / ~59 / 21-22 (bench/RESULTS.md, twenty-seventh session).
//
// The accumulators: with the intrinsic (acc = _mm512_dpbusd_epi32(acc, u, x)) GCC 12 moved accumulators to other
// registers and back around the VPDPBUSDs of a loop (the instruction overwrites its accumulator operand). Measured
// on one core (bench/vpdpbusd_chains.cpp, 2026-12-06): a register-only loop of 16-24 independent chains ran at
// 4.5-5.0 G/s written with the intrinsic and 8.9-9.0 G/s with the accumulate as inline asm tied in place ("+v");
// that the moves alone cost the difference is an inference (with the intrinsic 8-12 chains reached 8.3-8.7 G/s,
// copies and all). As arrays GCC also spilled them. So: 6 rows x 4 vectors = 24 named accumulators, each row's four
// VPDPBUSDs one asm statement (the 96 projections at 32 rows: 60 ms with 6 x 2 passes of the intrinsic, 43-46 now).
// The next tile is prefetched during the row blocks from 3 rows of x on, on Zen 5 from 1 (without, in the first
// version: 93 ms).
//
// VPDPBUSD multiplies unsigned bytes by signed ones, so the weights are stored offset by 128 (U = Q + 128 in
// [1, 255]) and x's codes X8 stay signed: per group g of row m and column n,
//   sum_k U[n, k] X8[m, k] - 128 sum_k X8[m, k] = sum_k Q[n, k] X8[m, k]      (exact in int32: |.| < 2^24)
// the correction one number per (row, group), independent of n. Then, in fp32, group by group in k order:
//   c = fp32(acc_0) * sx_0;  c = c + fp32(acc_g) * sx_g;  ...;  y = c * sw[n] (+ bias[n])
// each a single rounding (no fused multiply-add: the build has -ffp-contract=off), the same operations as
// cpu_ops.w8a8_reference, so y is bit-identical to it and to itself for any M (a row's numbers depend on that row
// only).
//
// Layout (packed_bytes(N, K) bytes, written by pack()): K padded to KP, a multiple of 4 (pad columns hold U = 128,
// x's pad codes are 0); strips of kS = 64 output columns, each KP / 4 steps of 4 k (a quad, VPDPBUSD's group) x 64
// columns = 256 bytes; a strip cut into K tiles of kKT = 512 steps (128 KiB: 4 activation groups of kGS = 128 steps),
// and inside a tile the 4 runs of 16 columns one after the other (run v: kn steps x 64 bytes, byte (j % 16) * 4 + k %
// 4 of a step), so one 64-byte load is step p of 16 columns; then, 64-byte aligned, the scales sw padded to whole
// strips (zeros). The kernel reads a tile group by group (each group's 4 run segments of 8 KiB, every row block of
// x), so a tile is 4 streams of up to 32 KiB. Tiles of one group (32 KiB, 8 KiB runs: the first version) left the
// GEMV at 1-2 rows well below the memory's rate. 1B decoder weights from DRAM in 2 MiB pages as the engine holds
// them, 2 threads, Zen 4 (2026-12-07, fortieth session, bench_ab --pack-per-build; bench/RESULTS.md), GB/s, one group
// a tile -> four: M = 1 41.4 -> 52.5 (stream probe 47), M = 2 31.8 -> 34.9 (probe 33), M = 32 11.5 -> 11.2 (bound by
// VPDPBUSD; with 4 KiB pages the thirty-ninth session had measured M = 1 34 -> 49). (Trial builds whose groups were as
// long as their tiles: 256 steps gave less than 512, 1024 as much.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_w8a8.h"
#include "common.h"
#include "cpu_family.h"
#include "kv_int8.h"
#include "packed_layout.h"
#include "simd.h"

// Rows of x from which a tile's block passes prefetch the next tile (software prefetch); below, none. On Zen 5 (AMD
// family 0x1A) from 1 row on: whole 1B n = 1 generations (bench_ab --op engine --int8 w8a8, 128 tokens, 2-core Zen 5
// VM, 2026-12-06) 55.1 -> 62.6 GB/s, as packed_gemv.h's bf16 rule there.
// (A build's own -DJR_W8A8_PF_MIN_ROWS holds on Zen 5 too unless -DJR_W8A8_PF_MIN_ROWS_ZEN5 is given as well.)
#if defined(JR_W8A8_PF_MIN_ROWS) && !defined(JR_W8A8_PF_MIN_ROWS_ZEN5)
#define JR_W8A8_PF_MIN_ROWS_ZEN5 JR_W8A8_PF_MIN_ROWS
#endif
#ifndef JR_W8A8_PF_MIN_ROWS
#define JR_W8A8_PF_MIN_ROWS 3
#endif
#ifndef JR_W8A8_PF_MIN_ROWS_ZEN5
#define JR_W8A8_PF_MIN_ROWS_ZEN5 1
#endif
// The next tile's prefetch: __builtin_prefetch's locality, 2 (prefetcht1: to L2) from JR_W8A8_PF_L2_MIN_ROWS rows of
// x on, 3 (to L1) below. A tile is 128 KiB, so a line prefetched into L1 waits behind up to 128 KiB of other lines
// before it is read, and meanwhile pushes the group being multiplied (32 KiB) out of L1; to L2 instead (bench_ab
// --pack-per-build, 1B decoder weights from 1 GB, 2-core Zen 4, 2026-12-07, GB/s): M = 4 31.3 -> 33.2 (stream probe
// 34) and 37.5 -> 43.2 (probe 47), M = 8 25.9 -> 32.3-40.2, M = 16 17.9 -> 22.0, M = 32 11.2 -> 11.3. Fewer rows keep
// L1, as measured on Zen 5 (the only CPU that prefetches there; with the tiles of then, one group long).
#ifndef JR_W8A8_PF_LOCALITY
#define JR_W8A8_PF_LOCALITY 2
#endif
#ifndef JR_W8A8_PF_LOCALITY_FEW
#define JR_W8A8_PF_LOCALITY_FEW 3
#endif
#ifndef JR_W8A8_PF_L2_MIN_ROWS
#define JR_W8A8_PF_L2_MIN_ROWS 3
#endif

namespace jr::w8a8 {

// The rows of x from which the next tile is prefetched on this CPU (see the top).
inline int64_t prefetch_min_rows() {
  return cpu::zen5_or_later() ? JR_W8A8_PF_MIN_ROWS_ZEN5 : JR_W8A8_PF_MIN_ROWS;
}

constexpr int64_t kS = 64;         // output columns a strip
constexpr int64_t kE = 4;          // k a step (VPDPBUSD's quad)
constexpr int64_t kSE = kS * kE;   // bytes a step
#ifndef JR_W8A8_KT  // steps a K tile (a multiple of kGS; see the top)
#define JR_W8A8_KT 512
#endif
constexpr int64_t kGS = 128;       // steps an activation group
constexpr int64_t kG = kGS * kE;   // x's quantization group: 512 columns
constexpr int64_t kKT = JR_W8A8_KT;  // steps a K tile: 512 = 128 KiB, 4 groups
static_assert(kKT % kGS == 0, "a K tile holds whole activation groups");
constexpr int kMB = 6;             // rows of x a register block: 6 x 4 = 24 int32 accumulators

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
constexpr bool available() { return true; }
#else
constexpr bool available() { return false; }
#endif

inline int64_t kpad(int64_t K) { return (K + kE - 1) / kE * kE; }
inline int64_t padded_rows(int64_t N) { return packed::num_strips(N, kS) * kS; }
inline int64_t groups(int64_t K) { return (K + kG - 1) / kG; }
inline int64_t scales_offset(int64_t N, int64_t K) { return (padded_rows(N) * kpad(K) + 63) / 64 * 64; }
inline int64_t packed_bytes(int64_t N, int64_t K) { return scales_offset(N, K) + 4 * padded_rows(N); }
inline const float* scales(const uint8_t* wp, int64_t N, int64_t K) {
  return reinterpret_cast<const float*>(wp + scales_offset(N, K));
}

// wp (packed_bytes(N, K)) = q [N, K] int8 (in [-127, 127]) offset to U = q + 128 in the layout above, and the scales
// s [N] after it. Runs its own parallel region.
inline void pack(const int8_t* q, const float* s, uint8_t* wp, int64_t N, int64_t K) {
  packed::for_each_tile_row(N, kpad(K) / kE, kS, kSE, kKT, 16, 64, kE, [&](int64_t n, int64_t k0, int64_t kn,
                                                                          int64_t at) {
    const int8_t* src = n < N ? q + n * K : nullptr;
    uint8_t* d = wp + at;
    for (int64_t p = 0; p < kn; ++p)
      for (int64_t e = 0; e < kE; ++e) {
        const int64_t k = (k0 + p) * kE + e;
        d[p * 64 + e] = uint8_t(128 + (src && k < K ? int(src[k]) : 0));
      }
  });
  packed::put_row_scales(wp, padded_rows(N) * kpad(K), scales_offset(N, K), s, N, padded_rows(N));
}

// x [M, ldx] bf16 quantized per row and group: codes q [M, ldq] (ldq >= KP; columns K .. KP - 1 zero), the group
// scales sx [M, ng] and corrections comp [M, ng] = 128 * sum of the group's codes. A group holding a NaN or an
// infinity gets sx NaN and codes 0 (kv8::quantize_head), so its row of y is NaN.
struct QuantizedX {
  int64_t ldq = 0, ng = 0;
  std::vector<int8_t> q;
  std::vector<float> sx;
  std::vector<int32_t> comp;
  // room for M rows of K columns (grows only)
  void shape(int64_t M, int64_t K) {
    ldq = (kpad(K) + 63) / 64 * 64, ng = groups(K);
    if (int64_t(q.size()) < M * ldq) q.resize(size_t(M * ldq));
    if (int64_t(sx.size()) < M * ng) sx.resize(size_t(M * ng)), comp.resize(size_t(M * ng));
  }
  // Inside a parallel region: rows [0, M) of x, a share of the rows per thread (an orphaned `omp for`, ending with
  // the team's barrier; after shape(M, K)).
  void rows_for(const uint16_t* x, int64_t ldx, int64_t K, int64_t M) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) rows(x, ldx, K, m, m + 1);
  }
  // rows [m0, m1) of x (after shape(M >= m1, K))
  void rows(const uint16_t* x, int64_t ldx, int64_t K, int64_t m0, int64_t m1) {
    alignas(64) float xf[kG];
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* qm = q.data() + m * ldq;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t k0 = g * kG, n = std::min(kG, K - k0);
        simd::widen(x + m * ldx + k0, xf, n);
        kv8::quantize_head(xf, qm + k0, &sx[size_t(m * ng + g)], n);
        int32_t sum = 0;
        for (int64_t k = 0; k < n; ++k) sum += qm[k0 + k];
        comp[size_t(m * ng + g)] = 128 * sum;
      }
      std::fill(qm + K, qm + ldq, int8_t(0));
    }
  }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
// One row's step: a0..a3 += VPDPBUSD(u0..u3, x), in place, as one asm statement (AT&T | Intel operand order). With
// the intrinsic GCC 12 moved accumulators to other registers and back around the VPDPBUSDs (the instruction
// overwrites its accumulator); one asm per VPDPBUSD still left such moves in the 4- and 5-row blocks (review,
// 2026-12-06); tied "+v" operands of one statement per row leave none.
inline void dpbusd4(__m512i& a0, __m512i& a1, __m512i& a2, __m512i& a3, __m512i u0, __m512i u1, __m512i u2,
                    __m512i u3, __m512i x) {
  asm("{vpdpbusd %[x], %[u0], %[a0]|vpdpbusd %[a0], %[u0], %[x]}\n\t"
      "{vpdpbusd %[x], %[u1], %[a1]|vpdpbusd %[a1], %[u1], %[x]}\n\t"
      "{vpdpbusd %[x], %[u2], %[a2]|vpdpbusd %[a2], %[u2], %[x]}\n\t"
      "{vpdpbusd %[x], %[u3], %[a3]|vpdpbusd %[a3], %[u3], %[x]}"
      : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3)
      : [u0] "v"(u0), [u1] "v"(u1), [u2] "v"(u2), [u3] "v"(u3), [x] "v"(x));
}
// MB <= 6 rows of x against kn <= kGS steps of one activation group in a strip's K tile (tile: run 0 at the group's
// first step, the runs rs bytes apart; the codes xq at the group's first k, row stride ldq; this group's corrections
// and scales at comp, sx, row stride ldg): c [MB, kS] = (first ? 0 + : c +) fp32(acc) * sx.
// Meanwhile lpk lines of [pf, pe) are prefetched per step. The 24 accumulators: named variables updated in place by
// dpbusd4 (see the top).
#define JR_W8A8_ROW(r)                                                                 \
  if constexpr (MB > r) {                                                              \
    int32_t quad;                                                                      \
    std::memcpy(&quad, xq + r * ldq + 4 * p, sizeof(quad));                            \
    const __m512i xb = _mm512_set1_epi32(quad);                                        \
    dpbusd4(a##r##0, a##r##1, a##r##2, a##r##3, w0, w1, w2, w3, xb);                   \
  }
#define JR_W8A8_OUT(r)                                                                 \
  if constexpr (MB > r) {                                                              \
    const __m512i cm = _mm512_set1_epi32(comp[r * ldg]);                               \
    const __m512 sm = _mm512_set1_ps(sx[r * ldg]);                                     \
    out(c + r * kS, a##r##0, cm, sm), out(c + r * kS + 16, a##r##1, cm, sm);           \
    out(c + r * kS + 32, a##r##2, cm, sm), out(c + r * kS + 48, a##r##3, cm, sm);      \
  }
template <int MB, int Loc>
inline void block(const uint8_t* tile, int64_t rs, int64_t kn, const int8_t* xq, int64_t ldq, const int32_t* comp,
                  const float* sx, int64_t ldg, float* c, bool first, const char* pf, const char* pe, int lpk) {
  static_assert(MB >= 1 && MB <= 6, "1 to 6 rows a block");
  const uint8_t *w0p = tile, *w1p = tile + rs, *w2p = tile + 2 * rs, *w3p = tile + 3 * rs;
  const __m512i z = _mm512_setzero_si512();
  __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z, a20 = z, a21 = z, a22 = z, a23 = z;
  __m512i a30 = z, a31 = z, a32 = z, a33 = z, a40 = z, a41 = z, a42 = z, a43 = z, a50 = z, a51 = z, a52 = z, a53 = z;
  for (int64_t p = 0; p < kn; ++p) {
    for (int l = 0; l < lpk; ++l, pf += 64)
      if (pf < pe) __builtin_prefetch(pf, 0, Loc);
    const __m512i w0 = _mm512_loadu_si512(w0p + p * 64), w1 = _mm512_loadu_si512(w1p + p * 64);
    const __m512i w2 = _mm512_loadu_si512(w2p + p * 64), w3 = _mm512_loadu_si512(w3p + p * 64);
    JR_W8A8_ROW(0) JR_W8A8_ROW(1) JR_W8A8_ROW(2) JR_W8A8_ROW(3) JR_W8A8_ROW(4) JR_W8A8_ROW(5)
  }
  // c (16 lanes) = (first ? 0 + : c +) fp32(acc - cm) * sm: the group's exact sum, scaled, added in k order
  auto out = [first](float* cv, __m512i acc, __m512i cm, __m512 sm) {
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, cm)), sm);
    _mm512_storeu_ps(cv, first ? f : _mm512_add_ps(_mm512_loadu_ps(cv), f));
  };
  JR_W8A8_OUT(0) JR_W8A8_OUT(1) JR_W8A8_OUT(2) JR_W8A8_OUT(3) JR_W8A8_OUT(4) JR_W8A8_OUT(5)
}
#undef JR_W8A8_ROW
#undef JR_W8A8_OUT

template <int R, int Loc>
inline void block_tail(int mb, const uint8_t* tile, int64_t rs, int64_t kn, const int8_t* xq, int64_t ldq,
                       const int32_t* comp, const float* sx, int64_t ldg, float* c, bool first, const char* pf,
                       const char* pe, int lpk) {
  if constexpr (R >= 1) {
    if (mb == R) block<R, Loc>(tile, rs, kn, xq, ldq, comp, sx, ldg, c, first, pf, pe, lpk);
    else block_tail<R - 1, Loc>(mb, tile, rs, kn, xq, ldq, comp, sx, ldg, c, first, pf, pe, lpk);
  }
}
#endif

// Inside an OpenMP parallel region (an orphaned `omp for`, ending with the team's barrier) or outside one, as
// packed::gemv_for: y [M, N] fp32 = W8A8(x, W) + bias, wp = pack(Q, sw), xq = x [M, K] quantized by the caller
// (QuantizedX; linear_packed and decode_layer quantize it once per call, a share of the rows per thread, before the
// team's barrier). Callers check available().
inline void gemv_for(const uint8_t* wp, const QuantizedX& xq, const float* bias, float* y, int64_t M, int64_t N,
                     int64_t K) {
#if JR_HAVE_AMX_INT8
  if (amx8::use(M, K))  // (the same on every thread of a team: M, K and the switch, which no call changes)
    return amx8::gemv_for(wp, xq.q.data(), xq.ldq, xq.sx.data(), xq.comp.data(), xq.ng, scales(wp, N, K), bias, y, M,
                          N, K, kKT, kGS);
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
  const int64_t KS = kpad(K) / kE, strips = packed::num_strips(N, kS);
  const float* sw = scales(wp, N, K);
  const char* end = reinterpret_cast<const char*>(wp + padded_rows(N) * kpad(K));
  const int64_t ldq = xq.ldq, ng = xq.ng;
  // row blocks of as even a size as can be (32 rows: 6, 6, 5, 5, 5, 5), as packed_gemv.h
  const int64_t passes = (M + kMB - 1) / kMB, mb_lo = M / passes, n_hi = M % passes;
  std::vector<float> c(static_cast<size_t>(M * kS));
  const int64_t pf_rows = prefetch_min_rows();
  const bool l2 = M >= JR_W8A8_PF_L2_MIN_ROWS;  // the prefetch's locality (see the top)
#pragma omp for schedule(guided, 1)
  for (int64_t s = 0; s < strips; ++s) {
    const uint8_t* ws = wp + s * KS * kSE;
    for (int64_t k0 = 0; k0 < KS; k0 += kKT) {
      const int64_t kn = std::min(kKT, KS - k0), rs = kn * 64;  // the tile's steps; its runs' stride
      const uint8_t* tile = ws + k0 * kSE;
      // the next tile's lines, one share per row block spread over the tile's steps, from pf_rows rows of x on
      const packed::NextTile nt(reinterpret_cast<const char*>(tile + kn * kSE), end, kKT * kSE, passes, kn,
                                M >= pf_rows);
      for (int64_t p0 = 0; p0 < kn; p0 += kGS) {  // group by group (in k order), every row block against each
        const int64_t gn = std::min(kGS, kn - p0), g = (k0 + p0) / kGS;
        for (int64_t m0 = 0, j = 0; j < passes; m0 += mb_lo + (j < n_hi), ++j) {
          const int mb = int(mb_lo + (j < n_hi));
          const uint8_t* tg = tile + p0 * 64;
          const int8_t* xg = xq.q.data() + m0 * ldq + (k0 + p0) * kE;
          const int32_t* cg = xq.comp.data() + m0 * ng + g;
          const float* sg = xq.sx.data() + m0 * ng + g;
          const char* pf = nt.begin(j) + p0 * nt.lpk * 64;
          if (l2) block_tail<kMB, JR_W8A8_PF_LOCALITY>(mb, tg, rs, gn, xg, ldq, cg, sg, ng, c.data() + m0 * kS,
                                                       k0 + p0 == 0, pf, nt.end(j), nt.lpk);
          else block_tail<kMB, JR_W8A8_PF_LOCALITY_FEW>(mb, tg, rs, gn, xg, ldq, cg, sg, ng, c.data() + m0 * kS,
                                                        k0 + p0 == 0, pf, nt.end(j), nt.lpk);
        }
      }
    }
    const int64_t n0 = s * kS, nn = std::min(kS, N - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nn; ++j) {  // (no + 0.0f without a bias: it would turn a -0 into +0)
        const float v = c[m * kS + j] * sw[n0 + j];
        y[m * N + n0 + j] = bias ? v + bias[n0 + j] : v;
      }
  }
#else
  (void)wp, (void)xq, (void)bias, (void)y, (void)M, (void)N, (void)K;
#endif
}

}  // namespace jr::w8a8
