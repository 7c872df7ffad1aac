// The W8A8 GEMV on AMX-INT8 tiles: w8a8_gemv.h's numbers (its layout, its quantized x, its group-by-group sums) with
// TDPBSUD (signed x codes times the unsigned weight bytes U = Q + 128, 16 x 16 x 64 multiply-adds an instruction)
// instead of VPDPBUSD, on CPUs with AMX-INT8 (Sapphire Rapids and later Xeons). w8a8::gemv_for takes this route when
// `use(M, K)` says so.
//
// Why: at many rows of x VPDPBUSD is the bound on a 2-core Xeon, not the bytes (bench_ab, 1B shape from DRAM, GB/s of
// int8 weights, 2026-12-07: M = 4 / 8 / 16 / 32 at 22 / 20 / 16 / 12 against a ~29 GB/s stream), so the W8A8 GEMV at
// 32 rows read its half-size weights no faster than the bf16 AMX GEMV read its full-size ones.
//
// The layout is already what a B tile wants: inside a K tile of a strip each run of 16 columns is kn steps of 64
// bytes (step p: byte 4 j + e = U[16 v + j, 4 p + e]), so 16 consecutive steps of one run are a B tile of 16 rows x 64
// bytes (1 KiB in one piece) and an A tile is 16 rows of x's codes x 64 k. The per-group sums a C tile holds (int32,
// exact: |sum| < 2^24 per group of 512 k) are those VPDPBUSD makes; after each activation group (kGS = 128 steps,
// 8 B tiles a run) the C tiles are stored and turned into fp32 with w8a8_gemv.h's operations (c = c + fp32(acc - comp)
// * sx, group by group in k order; y = c * sw (+ bias)), so y is bit-identical to that kernel and to
// cpu_ops.w8a8_reference, for any M and either route. Tiles: C0-C3 = the strip's four runs (16 columns each) for 16
// rows of x, A = tile 4, B = tiles 5 / 6 in turn; up to JR_AMX_W8A8_BLOCKS blocks of 16 rows take each activation
// group in turn while its bytes are in L1 / L2 (one pass over the strip); a short last block a pass of its own. K must
// be a multiple of 64 (whole A tiles; the layout pads K to 4 only): Janus-Pro's 2048, 4096, 5632 and 11008 are; other
// K take the VPDPBUSD kernel.
//
// Measured (2-core Xeon with AMX, family 6 model 167, forty-fifth session, 2026-12-07; bench/RESULTS.md), bench_ab
// --op packed_gemv, 1B shape from DRAM, middle half, GB/s of int8 weights, VPDPBUSD -> this: M = 16 15.5 -> 21.0,
// M = 8 19.6 -> 21.9, M = 4 22.2 -> 22.6; M = 32 12.4 -> 15.5 in the first version (32 rows a pass, below), whose
// 16-row passes were this kernel's; whole 1B n = 16 generations (--op engine, W8A8, 96 tokens) with the int8 cache
// 11.5 -> 16.2 (with the bf16 cache 12.6 -> 15.7 in the first version); a prefill-sized call (600 x 2048 x 11264)
// 29 -> 11 ms. Tried, not kept (M = 32, GB/s): amx_gemv.h's arrangement for 17-32 rows (two row blocks x two runs,
// the strip in halves; the first version) 15.5-16.0 vs 16.3-16.7 here, and in the engine 15.1 vs 16.2; groups
// alternating between two pairs of C tiles so that a group's tiles are stored after the next group's first
// multiplies (16 rows x two runs a pass) 14.5 vs 15.4. What the per-group stores cost (trial builds with wrong
// values, the 32-row arrangement): without the fp32 step 16.6, without the stores too 18.9, vs 15.8. Software
// prefetch of each run 2 KiB ahead, as amx_gemv.h's strip_32: no change (M = 32 15.1 vs 15.0, M = 16 19.7 vs 19.7),
// so none. Forty-eighth session (the same host, 2026-12-07): the row blocks of a pass group by group instead of one
// pass over the strip each (the second from L2), M = 32 14.6 -> 15.6 and 15.0 -> 15.9 (middle half; 2 blocks a pass),
// M = 64 12.4 -> 13.4 (4 blocks a pass; 2: 12.4), M = 8 and 600 unchanged; whole 1B n = 16 W8A8 generations with the
// int8 cache (--op engine, 96 tokens, 8 repetitions) 16.7 -> 17.2 (2 a pass at 32 rows); outputs identical. Prefetching
// the next 2 or 8 KiB of each run in the first block's loop: 15.7 / 15.1 vs 15.9 without. Pairs of full blocks
// sharing each B tile (two blocks x two runs a half of the group, 8 tiles; outputs identical): M = 32 15.1 vs 16.7,
// M = 64 11.3 vs 12.5. Forty-ninth session (2026-12-08): each block's fp32 step (`out`) deferred until after the
// next block's multiplies (two acc buffers, so it could overlap them; outputs identical): M = 32 16.7 vs 16.9, M = 16
// 19.9 vs 19.8, no gain.
#pragma once

#include <algorithm>
#include <cstdint>

#include "amx_gemv.h"

#if JR_HAVE_AMX && defined(__AMX_INT8__)
#define JR_HAVE_AMX_INT8 1
#else
#define JR_HAVE_AMX_INT8 0
#endif

// Rows of x from which W8A8 GEMVs take the tiles (fewer: VPDPBUSD, which reads at the stream's rate there).
#ifndef JR_AMX_W8A8_MIN_ROWS
#define JR_AMX_W8A8_MIN_ROWS 4
#endif

// Blocks of 16 rows of x that take each activation group of a strip in turn, in one pass over the strip.
#ifndef JR_AMX_W8A8_BLOCKS
#define JR_AMX_W8A8_BLOCKS 4
#endif
static_assert(JR_AMX_W8A8_BLOCKS >= 1, "JR_AMX_W8A8_BLOCKS: at least one block of 16 rows a pass");

namespace jr::amx8 {

constexpr bool kBuilt = JR_HAVE_AMX_INT8;

// Whether a W8A8 GEMV of M rows and K input features takes the tiles now (the build, the CPU, the OS, and amx_gemv.h's
// switch: set_amx(false) turns every AMX route off).
inline bool use(int64_t M, int64_t K) {
  return kBuilt && M >= JR_AMX_W8A8_MIN_ROWS && K % 64 == 0 && amx::switch_().load(std::memory_order_relaxed) &&
         amx::permitted();
}

#if JR_HAVE_AMX_INT8

// One strip's weights (ws: its first step; KS steps; K tiles of kKT steps, activation groups of kGS).
struct Strip {
  const uint8_t* ws;
  int64_t KS, kKT;
  // step p of run v (16 columns): 64 bytes, the run's next step 64 bytes on within p's K tile
  const uint8_t* at(int64_t p, int v) const {
    const int64_t k0 = p / kKT * kKT, kn = std::min(kKT, KS - k0);
    return ws + k0 * 256 + v * kn * 64 + (p - k0) * 64;
  }
};

// After an activation group g: the C tiles (stored to acc [16, 64] int32, row = x row, column = strip column) turned
// into c [16, 64] fp32 for `rows` rows, as w8a8_gemv.h's block does: c = (first ? 0 + : c +) fp32(acc - comp) * sx
// (comp, sx: the group's, of the first row; ldg apart).
inline void out(const int32_t* acc, float* c, int rows, const int32_t* comp, const float* sx, int64_t ldg,
                bool first) {
  for (int m = 0; m < rows; ++m) {
    const __m512i cm = _mm512_set1_epi32(comp[m * ldg]);
    const __m512 sm = _mm512_set1_ps(sx[m * ldg]);
    for (int v = 0; v < 4; ++v) {
      float* cv = c + m * 64 + 16 * v;
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(acc + m * 64 + 16 * v),
                                                                          cm)), sm);
      _mm512_storeu_ps(cv, first ? f : _mm512_add_ps(_mm512_loadu_ps(cv), f));
    }
  }
}

// One strip against nb blocks of `rows` <= 16 rows of x each from row m0 (nb > 1: full blocks of 16; xa: x's packed
// A tiles, row m's tile q at xa + amx::tile_row(m, K) + 2048 q, rows 64 bytes apart; comp, sx: row m0's
// corrections and scales, ldg = groups a row): c [16 nb, 64] fp32 = the strip's columns for those rows, before the
// weights' scales. Activation group by group, every block against each group's bytes while they are in L1 / L2.
// C0-C3 = the four runs, A = tile 4, B = tiles 5 / 6 in turn.
inline void strip(const Strip& st, int64_t kGS, const int8_t* xa, int64_t K, int64_t m0, int nb, int rows,
                  const int32_t* comp, const float* sx, int64_t ldg, float* c) {
  alignas(64) int32_t acc[16 * 64];
  for (int64_t p0 = 0, g = 0; p0 < st.KS; p0 += kGS, ++g) {  // activation groups, in k order
    const int64_t pe = std::min(st.KS, p0 + kGS);
    const uint8_t *b0 = st.at(p0, 0), *b1 = st.at(p0, 1), *b2 = st.at(p0, 2), *b3 = st.at(p0, 3);
    for (int b = 0; b < nb; ++b) {
      const int8_t* xb = xa + amx::tile_row(m0 + 16 * b, K);
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t p = p0; p < pe; p += 16) {
        const int64_t o = (p - p0) * 64;
        _tile_loadd(4, xb + (p / 16) * 2048, 64);
        _tile_loadd(5, b0 + o, 64);
        _tile_dpbsud(0, 4, 5);
        _tile_loadd(6, b1 + o, 64);
        _tile_dpbsud(1, 4, 6);
        _tile_loadd(5, b2 + o, 64);
        _tile_dpbsud(2, 4, 5);
        _tile_loadd(6, b3 + o, 64);
        _tile_dpbsud(3, 4, 6);
      }
      _tile_stored(0, acc, 256); _tile_stored(1, acc + 16, 256); _tile_stored(2, acc + 32, 256);
      _tile_stored(3, acc + 48, 256);
      out(acc, c + b * 16 * 64, rows, comp + 16 * b * ldg + g, sx + 16 * b * ldg + g, ldg, p0 == 0);
    }
  }
}

// Inside an OpenMP parallel region (an orphaned `omp for`, ending with the team's barrier) or outside one, as
// w8a8::gemv_for: y [M, N] fp32 = W8A8(x, W) (+ bias). wp: w8a8::pack's bytes (strips of 64 columns, KS = K / 4 steps
// of 256 bytes, K tiles of kKT steps); codes [M, ldq], sx, comp [M, ng]: x quantized (w8a8::QuantizedX); sw: the
// weights' scales; kGS: steps an activation group. Callers check use(M, K).
inline void gemv_for(const uint8_t* wp, const int8_t* codes, int64_t ldq, const float* sx, const int32_t* comp,
                     int64_t ng, const float* sw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                     int64_t kKT, int64_t kGS) {
  constexpr int kNB = JR_AMX_W8A8_BLOCKS;
  const int64_t KS = K / 4, strips = packed::num_strips(N, 64);
  alignas(64) float c[kNB * 16 * 64];
  // x's codes packed A tile by A tile (amx_gemv.h's pack_tiles, as for bf16 x and for the same reason: 16 rows 2 KiB
  // or more apart fall into few L1 sets): row m's tile q (64 k) at xa + amx::tile_row(m, K) + q * 2048
  const int8_t* xa = reinterpret_cast<const int8_t*>(amx::pack_tiles(codes, ldq, M, K));
  int loaded = -1;  // the row count whose tile config is loaded on this thread
#pragma omp for schedule(guided, 1)
  for (int64_t s = 0; s < strips; ++s) {
    const Strip st{wp + s * KS * 256, KS, kKT};
    const int64_t n0 = s * 64, nn = std::min<int64_t>(64, N - n0);
    for (int64_t m0 = 0; m0 < M;) {  // full blocks kNB at a time, then a short one (the strip from L2 after the first)
      const int nb = m0 + 16 <= M ? int(std::min<int64_t>(kNB, (M - m0) / 16)) : 1;
      const int rows = int(std::min<int64_t>(16, M - m0));
      if (loaded != rows) {
        const amx::TileConfig cfg = amx::config(rows, 0);
        _tile_loadconfig(&cfg);
        loaded = rows;
      }
      strip(st, kGS, xa, K, m0, nb, rows, comp + m0 * ng, sx + m0 * ng, ng, c);
      for (int64_t m = 0; m < nb * rows; ++m)
        for (int64_t j = 0; j < nn; ++j) {  // (no + 0.0f without a bias: it would turn a -0 into +0)
          const float v = c[m * 64 + j] * sw[n0 + j];
          y[(m0 + m) * N + n0 + j] = bias ? v + bias[n0 + j] : v;
        }
      m0 += nb * rows;
    }
  }
  if (loaded >= 0) _tile_release();
}

#endif  // JR_HAVE_AMX_INT8

}  // namespace jr::amx8
