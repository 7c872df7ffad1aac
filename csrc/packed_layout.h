// The packed weight layout ("strips") that packed_gemv.h's and amx_gemv.h's GEMVs read: W [N, K] copied once so
// that each kernel reads its weights as long sequential runs of exactly the operands it multiplies.
//
// W's rows are taken strip<WT>() at a time — 64 output columns on AVX-512 (4 vectors of 16 fp32 lanes) — and each
// strip is stored step by step, a step being one k (fp32) or one k pair (bf16): a step of a strip is 64 columns x E
// k = 256 bytes, and one vector (16 columns) of it is exactly a VDPBF16PS / FMA operand (bf16: the (2p, 2p + 1)
// pairs of 16 rows). A strip is cut into K tiles of ktile<WT>() steps (fp32 32 KiB; bf16 64 KiB unless
// set: ktile_bytes_bf16) that the AVX-512 kernel runs every row block of x over while the tile is in cache.
//   fp32: the tile's steps one after another: step p at tile + p * 64, vector v 16 v further.
//   bf16: one run per vector: the tile's columns 0-15 of every step (64 bytes a step), then 16-31, 32-47, 48-63:
//     wp[s K S + k0 S + v kn 32 + (p - k0) 32 + 2 jj + e] = W[64 s + 16 v + jj, 2 p + e]
//   (S = 64 columns x 2; k0, kn: the tile's first step and its step count). Why: at 17-32 rows of x the AMX kernel
//   runs the strip as two passes of 32 columns (eight tile registers hold 2 x 2 C tiles, not 2 x 4); with all 64
//   columns in each 256-byte step, the first pass pulled the whole strip from DRAM and the second reread it from L2,
//   so DRAM sat idle for half the time; and the hardware prefetchers keep more lines in flight over several runs read
//   side by side than over one. Measured on the 2-core Xeon with AMX (bench_ab, 1B shape, from 1 GB, 2026-12-04,
//   seventeenth session, GB/s, middle half), 256-byte steps -> two runs per tile (columns 0-31, 32-63) -> one run
//   per vector: AMX M = 32 20.5-20.9 -> 22.4-23.0 -> 24.3, M = 16 25.8 -> 26.7 -> 28.4, M = 2 27.6 -> 28.9 / 28.4 ->
//   29.2; the 24 decoder layers at 32 rows x 308 tokens (`--op layers`, attention included) 20.7 -> 22.0 / 22.2 ->
//   22.6. The AVX-512 kernel (JANUS_RT_AMX=0, same host): M = 2 19.5 -> 24.7 / 23.5 -> 28.2, M = 8 20.1 -> 22.2 /
//   20.1 -> 20.4. fp32 keeps one run per tile (no AMX; unmeasured).
// Columns past N are zeros. Batch invariance and the order of the sums are the kernels' (see them).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <strings.h>

#include "simd.h"

// K tile bytes of fp32 weights (bench/bench_ab.py, 2026-12-03, bench/RESULTS.md): 32 KiB (+2-5 % over 64 KiB from
// DRAM at M = 2 and 8); bf16: ktile_bytes_bf16 below.
#ifndef JR_PACKED_KTILE_BYTES_F32
#define JR_PACKED_KTILE_BYTES_F32 32768
#endif
#ifndef JR_PACKED_KTILE_BYTES_BF16
#define JR_PACKED_KTILE_BYTES_BF16 65536
#endif

namespace jr::packed {

// K tile bytes of bf16 weights: 64 KiB (Zen 5, 2026-12-03: 32 KiB +3 % at M = 2 but -1-6 % at M = 32, the 1B
// benchmark's rows; Zen 4, 2026-12-07, 256 KiB: -3-5 % at M = 32, no difference at M = 1-2, weights in huge pages as
// the engine holds them; bench/RESULTS.md). The AMX route reads the same layout. JANUS_RT_BF16_KTILE_KIB = 4, 8, ...,
// 1024 sets it for a process (tuning on another CPU; the tests' many-tile layouts): a weight's layout is fixed when
// it is packed, and packed weights are read by the process that packed them. Another value is reported once and
// ignored. A build with -DJR_PACKED_KTILE_BYTES_BF16=B (bench_ab's trial builds) takes B unless the variable is set.
// Always a power of two and a multiple of 16 steps (the AMX route's B tiles). The cached value is each loaded
// build's own (pybind11's build hides the extension's symbols: -fvisibility=hidden), so bench_ab's builds keep their
// own defaults.
inline int64_t ktile_bytes_bf16() {
  static const int64_t bytes = [] {
    if (const char* v = std::getenv("JANUS_RT_BF16_KTILE_KIB"); v && *v && strcasecmp(v, "auto") != 0) {
      // exactly the CLI's values (janus_rt/errors.py): digits only, no sign, space or leading zero
      long kib = v[0] == '0' ? -1 : 0;
      for (const char* c = v; *c && kib >= 0; ++c)
        kib = *c >= '0' && *c <= '9' && kib < 100000 ? 10 * kib + (*c - '0') : -1;
      if (kib >= 4 && kib <= 1024 && (kib & (kib - 1)) == 0) return int64_t(kib) << 10;
      std::fprintf(stderr, "janus_rt: JANUS_RT_BF16_KTILE_KIB=%s ignored (expected auto or a power of two from 4 to "
                   "1024)\n", v);
    }
    return int64_t(JR_PACKED_KTILE_BYTES_BF16);
  }();
  return bytes;
}

template <typename WT>
constexpr int64_t strip() {  // W rows per strip: 4 vectors of fp32 lanes (bf16: 64 on any build)
  return std::is_same_v<WT, float> ? 4 * simd::kWidth : 64;
}
template <typename WT>
constexpr int64_t ek() {  // k per step
  return std::is_same_v<WT, float> ? 1 : 2;
}
template <typename WT>
constexpr int64_t step_elems() {  // elements of one step of a strip
  return strip<WT>() * ek<WT>();
}
template <typename WT>
inline int64_t ktile() {  // steps per K tile (bf16: a multiple of 16, the AMX route's B tiles)
  const int64_t bytes = std::is_same_v<WT, float> ? JR_PACKED_KTILE_BYTES_F32 : ktile_bytes_bf16();
  return std::max<int64_t>(1, bytes / int64_t(step_elems<WT>() * sizeof(WT)));
}
template <typename WT>
constexpr int runs() {  // runs a K tile is stored as: bf16 4 (one per vector of 16 columns), fp32 1
  return std::is_same_v<WT, float> ? 1 : 4;
}
template <typename WT>
constexpr int64_t run_elems() {  // elements of one step within one run
  return step_elems<WT>() / runs<WT>();
}

// Vector v (0-3: columns 16 v .. 16 v + 15 of fp32 lanes) of the first step of the K tile at `tile` (kn steps); the
// same vector of the tile's step p lies p * run_elems<WT>() further.
template <typename WT>
inline const WT* vec_at(const WT* tile, int64_t kn, int v) {
  constexpr int VR = 4 / runs<WT>();  // vectors per run
  return tile + (v / VR) * kn * run_elems<WT>() + (v % VR) * (step_elems<WT>() / 4);
}

inline int64_t num_strips(int64_t N, int64_t S) { return (N + S - 1) / S; }

// The next tile's cache lines (the strip's next tile or the next strip's first: [next, end) capped at tile_bytes),
// dealt out to a tile's `passes` row blocks: block j prefetches [begin(j), end(j)), lpk lines a step of the tile's kn
// steps, so the weight stream is read at an even rate; lpk 0 (no prefetch) unless `on`. packed_gemv.h and
// w8a8_gemv.h.
struct NextTile {
  const char* next;
  int64_t lines, share;
  int lpk;
  NextTile(const char* next_, const char* end_, int64_t tile_bytes, int64_t passes, int64_t kn, bool on)
      : next(next_), lines(std::min<int64_t>(tile_bytes, std::max<int64_t>(0, end_ - next_)) / 64),
        share((lines + passes - 1) / passes), lpk(on ? int((share + kn - 1) / kn) : 0) {}
  const char* begin(int64_t j) const { return next + j * share * 64; }
  const char* end(int64_t j) const { return next + std::min(lines, (j + 1) * share) * 64; }
};
// Elements of the packed W [N, K] (bf16: K even).
template <typename WT>
int64_t packed_size(int64_t N, int64_t K) {
  return num_strips(N, strip<WT>()) * strip<WT>() * K;
}

// The packed layout's order, for the packers here and in int8_gemv.h and w8a8_gemv.h: put(n, k0, kn, at) for every
// row n of the whole strips (n >= N: the zero padding) and K tile (steps k0 .. k0 + kn - 1 of KS), `at` the element
// offset of row n's step k0; its step k0 + p is at at + p * RE. Strips of S columns, SE elements a strip's step, K
// tiles of KT steps, runs of SR columns, RE elements a run's step, E elements a row's step. Each row is visited front
// to back; runs its own parallel region over the strips.
template <typename Put>
void for_each_tile_row(int64_t N, int64_t KS, int64_t S, int64_t SE, int64_t KT, int64_t SR, int64_t RE, int64_t E,
                       Put put) {
  const int64_t strips = num_strips(N, S);
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < strips; ++s)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t k0 = 0; k0 < KS; k0 += KT) {
        const int64_t kn = std::min(KT, KS - k0);
        put(s * S + j, k0, kn, s * KS * SE + k0 * SE + (j / SR) * kn * RE + (j % SR) * E);
      }
}

// The row scales after an int8 layout's bytes (int8_gemv.h, w8a8_gemv.h): the gap from `bytes` to the scales at
// `offset` zeroed, then s [N] and zeros up to `rows`.
inline void put_row_scales(uint8_t* wp, int64_t bytes, int64_t offset, const float* s, int64_t N, int64_t rows) {
  std::memset(wp + bytes, 0, size_t(offset - bytes));
  float* sp = reinterpret_cast<float*>(wp + offset);
  for (int64_t n = 0; n < rows; ++n) sp[n] = n < N ? s[n] : 0.0f;
}

// wp (packed_size(N, K) elements) = W [N, K] in the layout above; runs its own parallel region. Each row of W is read
// front to back (long runs for the hardware prefetcher) and written a step at a time as one 32-bit word (a bf16 pair
// or one fp32) into its strip, which stays in L2 meanwhile; rows past N are zeros. (The 1B decoder's four bf16
// matrices per layer, Zen 4, tenth session: 2.1 -> 2.6 GB/s against an element-by-element copy, fp32 2.3 as before;
// most of what is left is the first touch of the new copy's pages, ~24 of the 40 ms per 103 MB.)
template <typename WT>
void pack(const WT* w, WT* wp, int64_t N, int64_t K) {
  constexpr int64_t E = ek<WT>();
  static_assert(E * sizeof(WT) == sizeof(uint32_t), "a step of one row is one 32-bit word");
  constexpr int64_t RE = run_elems<WT>();
  for_each_tile_row(N, K / E, strip<WT>(), step_elems<WT>(), ktile<WT>(), strip<WT>() / runs<WT>(), RE, E,
                    [&](int64_t n, int64_t k0, int64_t kn, int64_t at) {
                      const WT* src = n < N ? w + n * K + E * k0 : nullptr;
                      uint32_t* d = reinterpret_cast<uint32_t*>(wp + at);
                      for (int64_t p = 0; p < kn; ++p) {
                        uint32_t word = 0;
                        if (src) std::memcpy(&word, src + E * p, sizeof(uint32_t));
                        d[p * (RE / E)] = word;
                      }
                    });
}

}  // namespace jr::packed
