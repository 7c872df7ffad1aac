// The weight-only int8 GEMV: y [M, N] fp32 = (x [M, K] @ Q [N, K]^T) * scale [N] (+ bias), Q int8 with one fp32
// scale per output row (W ~ Q * scale[:, None]: symmetric, per channel), x bf16. What a decode step streams from
// DRAM is Q, half the bytes of the bf16 weights; each B tile is widened to bf16 in L1 just before the multiply.
//
// Layout: the bf16 strip layout of packed_layout.h with one-byte elements (the same element index for the same
// W[n, k]: runs of 16 columns x k pairs, K tiles of kKT steps), then, 64-byte aligned, the scales
// padded to whole strips (zeros past N): packed_bytes(N, K) bytes in all, written by pack().
//
// Kernels (x packed by gemv::pack_x as for bf16 weights; both need AVX512_BF16, `available`):
//   AMX (amx::use(K)): amx_gemv.h's strip passes with each B tile (16 k pairs x 16 columns: 512 bytes of Q) widened
//     into a 1 KiB L1 buffer (int8 -> int32 -> fp32 -> bf16: exact, |q| <= 127) and loaded from there; with more
//     than 32 rows (a prefill) each strip widened once into a per-thread bf16 copy that amx_gemv.h's strip passes
//     run every group of 32 rows over;
//   else: each K tile of a strip widened into a per-thread bf16 copy (64 KiB), which packed_gemv.h's AVX512-BF16
//     row blocks then run over.
// Q * x products are exact in fp32 (8 + 8 significant bits) and summed in k order in one fp32 accumulator per
// element (AMX) or per lane (AVX-512), so a row of y is bit-identical for any M, as the bf16 kernels'; the scale
// multiplies the finished sum.
//
// Measured (2-core Xeon with AMX, 2026-12-05, the 96 projections of the 1B LLM from DRAM, one call each, M rows of
// x, ms per pass, bf16 packed vs this): M = 32 97.8 vs 72.5, M = 16 88.9 vs 60.0, M = 2 83.9 vs 55.8 (1.35-1.50x,
// not the 2x of the bytes). What does not move it (M = 32, all 68-74 ms): a cheaper widening (one unpack per 32
// bytes, wrong values: 72.7), B tiles loaded straight from Q (no widening at all, wrong values: 68.5), no A tile
// loads (68.4), software prefetch none / 16 / 32 / 64 / 256 steps ahead (the same), widening b between a's
// multiplies (74.3); widening the next step's tiles a step early was slower (94). So the cap is the tile loop's
// per-step cost, ~120 ns per 1 KiB of Q per core, not the widening: per TDPBF16PS it moves half the bytes the bf16
// kernel does. What would move it (standalone loops): AMX-INT8 on Q directly, x quantized to int8 per row, 47 ms
// (the ~26 GB/s stream cap; x's rounding is then 8 bits) -- built since as W8A8's AMX route (amx_w8a8.h, x per
// group of 512); x as two int8 halves (16-bit fixed point per row, TDPBSSD + TDPBUSD), 60-62 ms (not built).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_gemv.h"
#include "packed_gemv.h"
#include "packed_layout.h"
#include "simd.h"

namespace jr::int8w {

constexpr int64_t kS = packed::strip<uint16_t>();       // 64 columns a strip
constexpr int64_t kSE = packed::step_elems<uint16_t>();  // 128 elements a step (k pair x 64 columns)
// steps per K tile: 256 (32 KiB of int8, widened to 64 KiB of bf16: the bf16 layout's default tile); fixed, unlike
// the bf16 layout's, which JANUS_RT_BF16_KTILE_KIB may change (the widened copy is this file's working buffer)
constexpr int64_t kKT = 256;
constexpr int64_t kRE = packed::run_elems<uint16_t>();   // 32: one step of one run

constexpr bool available() { return simd::kHaveBf16Dot; }

inline int64_t padded_rows(int64_t N) { return packed::num_strips(N, kS) * kS; }
inline int64_t scales_offset(int64_t N, int64_t K) { return (padded_rows(N) * K + 63) / 64 * 64; }
inline int64_t packed_bytes(int64_t N, int64_t K) { return scales_offset(N, K) + 4 * padded_rows(N); }
inline const float* scales(const int8_t* wp, int64_t N, int64_t K) {
  return reinterpret_cast<const float*>(wp + scales_offset(N, K));
}

// Run v (columns 16 v .. 16 v + 15) of the first step of the K tile at `tile` (kn steps), as packed::vec_at.
inline const int8_t* run_at(const int8_t* tile, int64_t kn, int v) { return tile + v * kn * kRE; }

// wp (packed_bytes(N, K)) = q [N, K] int8 in the layout above, and the scales s [N] after it; K even. Runs its own
// parallel region.
inline void pack(const int8_t* q, const float* s, int8_t* wp, int64_t N, int64_t K) {
  packed::for_each_tile_row(N, K / 2, kS, kSE, kKT, 16, kRE, 2, [&](int64_t n, int64_t k0, int64_t kn, int64_t at) {
    const int8_t* src = n < N ? q + n * K + 2 * k0 : nullptr;
    int8_t* d = wp + at;
    for (int64_t p = 0; p < kn; ++p) {
      d[p * kRE] = src ? src[2 * p] : 0;
      d[p * kRE + 1] = src ? src[2 * p + 1] : 0;
    }
  });
  packed::put_row_scales(reinterpret_cast<uint8_t*>(wp), padded_rows(N) * K, scales_offset(N, K), s, N,
                         padded_rows(N));
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// dst [32 n] bf16 = src [32 n] int8, exactly.
inline void widen(const int8_t* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i, src += 32, dst += 32) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}
#endif

#if JR_HAVE_AMX
// GCC's _tile_loadd is an asm with no memory operand: without this the compiler may sink or drop the stores that
// fill a buffer only tile loads read (seen in a standalone copy of this loop at -O3), or hoist the next step's
// stores above this step's loads. Called after widening and before the next widening.
inline void stores_before_tile_loads() { asm volatile("" ::: "memory"); }

// Steps g .. g + 15 of run v of the strip at ws (KS steps): 512 bytes in one piece (g a multiple of 16).
inline const int8_t* steps_at(const int8_t* ws, int64_t KS, int v, int64_t g) {
  const int64_t kt = g / kKT * kKT;
  return run_at(ws + kt * kSE, std::min(kKT, KS - kt), v) + (g - kt) * kRE;
}

// amx::strip_16 with Q: c [16, 64] fp32 = a group of <= 16 rows x the strip's 64 columns (unscaled sums).
inline void strip_16(const int8_t* ws, const amx::XTiles& xt, int64_t KS, float* c, uint16_t* bt) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t g = 0; g < KS; g += 16) {
    stores_before_tile_loads();  // (the last step's tile loads stay before these stores)
    for (int v = 0; v < 4; ++v) widen(steps_at(ws, KS, v, g), bt + 512 * v, 16);
    stores_before_tile_loads();
    _tile_loadd(4, xt.a0(g / 16), amx::XTiles::kStride);
    _tile_loadd(5, bt, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, bt + 512, 64);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(5, bt + 1024, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(6, bt + 1536, 64);
    _tile_dpbf16ps(3, 4, 6);
  }
  _tile_stored(0, c, 256); _tile_stored(1, c + 16, 256); _tile_stored(2, c + 32, 256); _tile_stored(3, c + 48, 256);
}

// amx::strip_32 with Q: c [32, 64] (rows 16.. the second block's), two passes of 32 columns over the strip.
// (No software prefetch: 16, 32, 64 or 256 steps ahead measured the same as none, 1B shape, 32 rows, 2026-12-05.)
inline void strip_32(const int8_t* ws, const amx::XTiles& xt, int64_t KS, float* c, uint16_t* bt) {
  for (int half = 0; half < 2; ++half) {
    const int va = 2 * half, vb = 2 * half + 1;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t g = 0; g < KS; g += 16) {
      stores_before_tile_loads();  // (the last step's tile loads stay before these stores)
      widen(steps_at(ws, KS, va, g), bt, 16);
      widen(steps_at(ws, KS, vb, g), bt + 512, 16);
      stores_before_tile_loads();
      _tile_loadd(4, xt.a0(g / 16), amx::XTiles::kStride);
      _tile_loadd(5, xt.a1(g / 16), amx::XTiles::kStride);
      _tile_loadd(6, bt, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, bt + 512, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    float* ch = c + half * 32;
    _tile_stored(0, ch, 256); _tile_stored(1, ch + 16, 256);
    _tile_stored(2, ch + 16 * 64, 256); _tile_stored(3, ch + 16 * 64 + 16, 256);
  }
}

inline void gemv_amx(const int8_t* wp, const uint16_t* x, int64_t ldx, const float* bias, float* y, int64_t M,
                     int64_t N, int64_t K) {
  const int64_t KS = K / 2, strips = packed::num_strips(N, kS), groups = (M + 31) / 32;
  const float* sc = scales(wp, N, K);
  alignas(64) float c[32 * 64];
  alignas(64) uint16_t bt[4 * 512];  // the widened B tiles
  const uint16_t* xp = amx::pack_x(x, ldx, M, K);
  // More than one group of 32 rows (a prefill): each strip is widened once into this bf16 copy (the bf16 layout, in
  // L2) and amx_gemv.h's own strip passes run every group over it, instead of widening every B tile per group
  // (1B, one layer's four projections at 600 rows: 152 ms that way against 123 for bf16 weights). The same products
  // in the same order: the same y.
  static thread_local std::vector<uint16_t> wide;
  if (groups > 1 && int64_t(wide.size()) < KS * kSE) wide.resize(size_t(KS * kSE));
  int loaded = -1;
#pragma omp for schedule(guided, 1)
  for (int64_t s = 0; s < strips; ++s) {
    const int8_t* ws = wp + s * KS * kSE;
    const int64_t n0 = s * kS, nn = std::min(kS, N - n0);
    if (groups > 1) stores_before_tile_loads(), widen(ws, wide.data(), KS * kSE / 32), stores_before_tile_loads();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = 32 * g, rows = std::min<int64_t>(32, M - m0);
      const int r0 = int(std::min<int64_t>(16, rows)), r1 = int(rows - r0);
      if (loaded != int(rows)) {
        const amx::TileConfig cfg = amx::config(r0, r1);
        _tile_loadconfig(&cfg);
        loaded = int(rows);
      }
      const amx::XTiles xt(xp, K, m0);
      if (groups > 1)  // the widened strip keeps this layout's K tiles
        r1 == 0 ? amx::strip_16(wide.data(), xt, KS, c, kKT) : amx::strip_32(wide.data(), xt, KS, c, kKT);
      else if (r1 == 0) strip_16(ws, xt, KS, c, bt);
      else strip_32(ws, xt, KS, c, bt);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < nn; ++j)
          y[(m0 + m) * N + n0 + j] = c[m * 64 + j] * sc[n0 + j] + (bias ? bias[n0 + j] : 0.0f);
    }
  }
  if (loaded >= 0) _tile_release();
}
#endif  // JR_HAVE_AMX

// Inside an OpenMP parallel region (an orphaned `omp for`) or outside one, as packed::gemv_for: y [M, N] fp32 =
// (x @ Q^T) * scale + bias, wp = pack(Q, scale), x [M, ldx] bf16 (gemv::pack_x), K even. Callers check available().
inline void gemv_for(const int8_t* wp, const uint16_t* x, int64_t ldx, const float* bias, float* y, int64_t M,
                     int64_t N, int64_t K) {
#if JR_HAVE_AMX
  if (amx::use(K)) return gemv_amx(wp, x, ldx, bias, y, M, N, K);
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const int64_t KS = K / 2, strips = packed::num_strips(N, kS);
  const float* sc = scales(wp, N, K);
  const int64_t passes = M <= packed::kMBSmall ? 1 : (M + packed::kMB - 1) / packed::kMB;
  const int64_t mb_lo = M / passes, n_hi = M % passes;
  std::vector<float> c(static_cast<size_t>(M * kS));
  static thread_local std::vector<uint16_t> wt;  // one K tile of the strip, widened to bf16 (the bf16 layout)
  if (int64_t(wt.size()) < kKT * kSE) wt.resize(size_t(kKT * kSE));
#pragma omp for schedule(guided, 1)
  for (int64_t s = 0; s < strips; ++s) {
    const int8_t* ws = wp + s * KS * kSE;
    for (int64_t k0 = 0; k0 < KS; k0 += kKT) {
      const int64_t kn = std::min(kKT, KS - k0);
      widen(ws + k0 * kSE, wt.data(), kn * kSE / 32);
      for (int64_t m0 = 0, j = 0; j < passes; m0 += mb_lo + (j < n_hi), ++j)
        packed::row_block<uint16_t, 2>(int(mb_lo + (j < n_hi)), wt.data(), x + m0 * ldx + 2 * k0, ldx, kn,
                                       c.data() + m0 * kS, k0 == 0, nullptr, nullptr, 0);
    }
    const int64_t n0 = s * kS, nn = std::min(kS, N - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nn; ++j) y[m * N + n0 + j] = c[m * kS + j] * sc[n0 + j] + (bias ? bias[n0 + j] : 0.0f);
  }
#else
  (void)wp, (void)x, (void)ldx, (void)bias, (void)y, (void)M, (void)N, (void)K;
#endif
}

}  // namespace jr::int8w
