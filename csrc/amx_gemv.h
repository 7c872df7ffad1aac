// The packed bf16 GEMV on AMX tiles: y [M, N] fp32 = x [M, K] @ W [N, K]^T (+ bias), W in packed_gemv.h's strip
// layout, on CPUs with AMX-BF16 (Sapphire Rapids and later Xeons). packed_gemv.h's gemv_for takes this route for
// bf16 weights when `use()` says so; the AVX512-BF16 kernel there stays the route elsewhere.
//
// Why: at 32 rows of x (Janus-Pro-1B, n = 16 images with CFG) the AVX512-BF16 dot products are compute bound on a
// 2-core Xeon (~200 GFLOP/s: 5.8 GB/s of weights), while one TDPBF16PS does 16 x 16 x 32 multiply-adds. bench_ab,
// 1B shape (a layer's four matrices + the gen head, 1 GB per call), 2026-12-04, GB/s (middle half) against a
// ~30-31 GB/s stream, layout of one run per vector (seventeenth session) / of 256-byte steps (before it): M = 2
// 29.2 / 27.6, 16 28.4 / 25.8, 32 24.3 / 20.5-20.9; the AVX512-BF16 kernel at M = 32 ~6. (The numbers in the notes
// below marked "170 MB" had one layer per call, which this host's 480 MiB L3 partly held: higher.)
//
// The strip layout (packed_layout.h) is already what a B tile wants: a K tile of a strip holds each 16-column vector's
// steps as a run of its own (one k pair x 16 columns = 64 bytes a step), so 16 consecutive steps of the columns
// 16 v .. 16 v + 15 are a B tile of 16 rows x 64 bytes, 1 KiB in one piece (row r = k pair p0 + r, bytes 4 j ..
// 4 j + 3 = W[16 v + j, 2 (p0 + r) + 0..1]). An A tile is 16 rows of x x 32 k (from a per-thread copy of x laid out
// tile by tile, pack_x), a C tile 16 rows x 16 fp32 columns. Eight tiles (each thread loads its config and releases
// the tiles at the end of the call):
//   group of <= 16 rows: C0-C3 = the strip's four column vectors, A = tile 4, B = tiles 5 / 6 in turn, one pass;
//   group of 17-32 rows: C0-C3 = 2 row blocks x 2 column vectors, A = tiles 4, 5, B = tiles 6, 7, two passes over
//   the strip, columns 0-31 then 32-63: each pass reads only its own two runs from DRAM.
// Rows of x past 32 run as further groups of 32 over the same strip (from L2). K must be a multiple of 32 (whole
// 16-pair steps; `use`): Janus-Pro's 2048, 4096, 5632 and 11008 are.
//
// Batch invariance: y[m, n] = bias[n] + the TDPBF16PS accumulation of steps 0, 1, ... in k order in one fp32 C
// element, the same for any M or group (each C row is its own x row's), so a row of y is bit-identical for any M.
// The sums differ from the AVX512-BF16 kernel's (another order), within the tests' tolerance to the reference.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "packed_layout.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define JR_HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define JR_HAVE_AMX 0
#endif

namespace jr::amx {

constexpr bool kBuilt = JR_HAVE_AMX;

// Whether this process may use the tiles: Linux hands out AMX tile state only to a process that asked for it
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); asked once. False on builds without AMX.
inline bool permitted() {
#if JR_HAVE_AMX
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// On/off switch (the `set_amx` op; JANUS_RT_AMX=0 starts it off): tests compare the two routes in one process. Each
// thread of a call reads it, so it must not change while a kernel runs (set it between calls).
inline std::atomic<bool>& switch_() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("JANUS_RT_AMX");
    return !(v && std::strcmp(v, "0") == 0);
  }()};
  return on;
}
// Whether bf16 GEMVs of K input features take this route now.
inline bool use(int64_t K) { return kBuilt && K % 32 == 0 && switch_().load(std::memory_order_relaxed) && permitted(); }

#if JR_HAVE_AMX

constexpr int64_t kS = packed::strip<uint16_t>();       // 64 columns a strip
constexpr int64_t kSE = packed::step_elems<uint16_t>();  // 128: one step of a strip (k pair x 64 columns)
inline int64_t ktile() { return packed::ktile<uint16_t>(); }  // steps per K tile of the layout
constexpr int64_t kRE = packed::run_elems<uint16_t>();   // 32: one step of one run (16 columns), 64 bytes

// Software prefetch of the weights, every line of each run the loop reads, kPfSteps steps (2 KiB) ahead within the
// run (across the layout's K tiles, where a run continues 3 runs further on; nothing past the strip's end). A core
// whose loads are spread between tile multiplies keeps too few misses in flight on the hardware prefetchers alone:
// bench_ab, 1B shape from 1 GB, M = 32, 2026-12-05, twentieth session, GB/s (middle half): none 24.4, 1 / 2 / 4 / 8
// KiB ahead 25.9 / 25.8 / 25.6 / 25.5 (t0 25.7, t2 25.9), every other line only 24.0; again 24.4 -> 25.7, and the
// 24 decoder layers at 32 rows x 312 tokens (`--op layers`) 23.5 -> 24.3. strip_32 only: strip_16's four runs lose
// with it (M = 16 28.0 -> 27.3, M = 8 28.6 -> 28.1). (The seventeenth session had measured none better than "16
// KiB ahead", 24.3 vs 24.0: most likely because 16 KiB past a run's current line is another run's, a run of a K
// tile being 16 KiB at the default tile, not the next steps of the same run.)
// Written out in strip_32's loop: GCC 12 dropped the prefetches of a helper function once it was inlined there.
constexpr int64_t kPfSteps = 32;

// x packed A tile by A tile, once per call on each thread, so that an A tile is 1 KiB at a 64-byte stride instead of
// 16 rows of x at x's row stride: at Janus-Pro's 2048 columns a bf16 row is 4 KiB, so those 16 lines (32 for the two
// tiles of strip_32) all fall in one L1 set and evict each other, and the A tiles came from L2.
// xp[((g * Q + q) * 32 + r) * 32 + e] = x[32 g + r, 32 q + e], Q = K / 32 (groups of 32 rows; a short last group
// leaves its missing rows unwritten: its tiles are configured with fewer rows).
// Measured (2026-12-04, sixteenth session, this 2-core Xeon): a standalone loop of strip_32 over 2 MB of weights (in
// L2, 2 threads) 24.5 -> 35.2 GB/s (the same loop with every tile load hoisted out, the TDPBF16PS alone: 76);
// bench_ab, 1B shape from 1 GB, GB/s (middle half), unpacked -> packed: M = 32 19.2 -> 19.8, M = 16 25.3 -> 25.0,
// M = 8 25.6 -> 25.8, M = 2 25.7 -> 26.0; the 1B decoder layers at 32 rows, context 312 (`--op layers`) 20.4 -> 20.7
// (slowest quarter 19.5 -> 20.8, fastest 19.0 -> 20.6). Tried with it, not kept: the next step's packed A tiles
// prefetched into L1 (M = 32 19.7), and strip_32 prefetching the next strip at an even 2 KiB a step
// over both halves (M = 32 19.9 -> 19.0, as before packing). From DRAM the M = 32 kernel stays near ~20 GB/s even
// with every tile load hoisted out of the standalone loop (only the weight prefetches left): the cap is then the
// rate one core's prefetches reach, not the tiles.
// In bytes, for any element type (amx_w8a8.h packs its int8 codes the same way): M rows of `row` bytes (a multiple of
// 64), ld bytes apart, into tiles of 32 rows x 64 bytes, tile q of row group g at byte (g * row / 64 + q) * 2048;
// row m's tile 0 at byte tile_row(m, row).
inline int64_t tile_row(int64_t m, int64_t row) { return (m / 32 * (row / 64) * 32 + m % 32) * 64; }
inline const char* pack_tiles(const void* x, int64_t ld, int64_t M, int64_t row) {
  static thread_local std::vector<char> buf;
  const int64_t Q = row / 64, groups = (M + 31) / 32;
  if (int64_t(buf.size()) < groups * Q * 2048) buf.resize(size_t(groups * Q * 2048));
  const char* src = static_cast<const char*>(x);
  for (int64_t m = 0; m < M; ++m) {
    char* d = buf.data() + tile_row(m, row);
    for (int64_t q = 0; q < Q; ++q) std::memcpy(d + q * 2048, src + m * ld + 64 * q, 64);
  }
  asm volatile("" ::: "memory");  // read only by tile loads, whose asm names no memory: keep these stores before them
  return buf.data();
}
inline int64_t packed_row(int64_t m, int64_t K) { return tile_row(m, 2 * K) / 2; }  // x[m, 0], bf16 elements
inline const uint16_t* pack_x(const uint16_t* x, int64_t ldx, int64_t M, int64_t K) {
  return reinterpret_cast<const uint16_t*>(pack_tiles(x, 2 * ldx, M, 2 * K));
}

// The A tiles of the group of rows m0 .. m0 + 31 (m0 a multiple of 16) in pack_x's copy xp: tile q (k pairs 16 q ..
// 16 q + 15) of its first 16 rows at a0(q), of the next 16 at a1(q), rows kStride bytes apart.
struct XTiles {
  static constexpr int64_t kStride = 64;
  const uint16_t* x;  // tile 0 of row m0
  XTiles(const uint16_t* xp, int64_t K, int64_t m0) : x(xp + packed_row(m0, K)) {}
  const uint16_t* a0(int64_t q) const { return x + q * 1024; }
  const uint16_t* a1(int64_t q) const { return x + q * 1024 + 512; }
};

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile shapes for a group of r0 (+ r1) rows: C tiles rows x 64 bytes, A tiles rows x 64 bytes, B 16 x 64.
inline TileConfig config(int r0, int r1) {
  TileConfig t;
  auto set = [&](int i, int rows) { t.rows[i] = uint8_t(rows), t.colsb[i] = 64; };
  if (r1 == 0) {
    for (int i = 0; i < 4; ++i) set(i, r0);
    set(4, r0), set(5, 16), set(6, 16);
  } else {
    set(0, r0), set(1, r0), set(2, r1), set(3, r1);
    set(4, r0), set(5, r1), set(6, 16), set(7, 16);
  }
  return t;
}

// One strip (ws: its first step, KS = K / 2 steps) against a group of r0 <= 16 rows of x (xt: where its A tiles
// are): c [16, 64] fp32 (row stride 64) = the group's rows x the strip's 64 columns. Each K tile's four runs are
// read side by side, a B tile being 16 steps of one run: 1 KiB in one piece. kKT: the steps of a K tile (a power of
// two, at least 16), the layout's unless the strip is a copy with tiles of its own (int8_gemv.h's widened strips).
inline void strip_16(const uint16_t* ws, const XTiles& xt, int64_t KS, float* c, int64_t kKT = ktile()) {
  constexpr int64_t sw = 2 * kRE;  // bytes between a B tile's rows
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k0 = 0; k0 < KS; k0 += kKT) {
    const int64_t kn = std::min(kKT, KS - k0);
    const uint16_t* tile = ws + k0 * kSE;
    const uint16_t *r0 = packed::vec_at(tile, kn, 0), *r1 = packed::vec_at(tile, kn, 1);
    const uint16_t *r2 = packed::vec_at(tile, kn, 2), *r3 = packed::vec_at(tile, kn, 3);
    for (int64_t p = 0; p < kn; p += 16) {
      const int64_t o = p * kRE;
      _tile_loadd(4, xt.a0((k0 + p) / 16), XTiles::kStride);
      _tile_loadd(5, r0 + o, sw);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, r1 + o, sw);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, r2 + o, sw);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, r3 + o, sw);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, c, 256); _tile_stored(1, c + 16, 256); _tile_stored(2, c + 32, 256); _tile_stored(3, c + 48, 256);
}

// As strip_16 for a group of 16 + r1 rows (r1 <= 16): c [32, 64], rows 16.. = the second block's. Eight tiles hold
// only half the strip's columns for two row blocks: two passes, columns 0-31 (runs 0 and 1) over the whole strip,
// then 32-63 (runs 2 and 3), each pass reading only its own runs.
inline void strip_32(const uint16_t* ws, const XTiles& xt, int64_t KS, float* c, int64_t kKT = ktile()) {
  constexpr int64_t sw = 2 * kRE;
  for (int half = 0; half < 2; ++half) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k0 = 0; k0 < KS; k0 += kKT) {
      const int64_t kn = std::min(kKT, KS - k0);
      const uint16_t* tile = ws + k0 * kSE;
      const uint16_t *ra = packed::vec_at(tile, kn, 2 * half), *rb = packed::vec_at(tile, kn, 2 * half + 1);
      for (int64_t p = 0; p < kn; p += 16) {
        const int64_t o = p * kRE;
        if (const int64_t g = k0 + p + kPfSteps; g < KS) {  // g's 16 steps lie in one K tile (g: a multiple of 16)
          const int64_t kt = g & -kKT, ktn = std::min(kKT, KS - kt);  // (kKT: a power of two)
          const uint16_t* t = ws + kt * kSE;
          const char* pa = reinterpret_cast<const char*>(packed::vec_at(t, ktn, 2 * half) + (g - kt) * kRE);
          const char* pb = reinterpret_cast<const char*>(packed::vec_at(t, ktn, 2 * half + 1) + (g - kt) * kRE);
          for (int l = 0; l < 16; ++l) _mm_prefetch(pa + 64 * l, _MM_HINT_T1), _mm_prefetch(pb + 64 * l, _MM_HINT_T1);
        }
        _tile_loadd(4, xt.a0((k0 + p) / 16), XTiles::kStride);
        _tile_loadd(5, xt.a1((k0 + p) / 16), XTiles::kStride);
        _tile_loadd(6, ra + o, sw);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        _tile_loadd(7, rb + o, sw);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* ch = c + half * 32;
    _tile_stored(0, ch, 256); _tile_stored(1, ch + 16, 256);
    _tile_stored(2, ch + 16 * 64, 256); _tile_stored(3, ch + 16 * 64 + 16, 256);
  }
}

// (Reordered so that each tile load waits on the earliest-finished TDPBF16PS, and strip_16 with x's tile
// alternating between two tiles: 19.8 vs 19.4 GB/s at M = 32, 24.4 vs 24.3 at M = 16, bench_ab from DRAM (2 GB),
// 2026-12-04: not kept. Both M are ~70-100 % of the stream probe of the moment, which moved between 20 and 31 GB/s.)
// Rows of x per pass over a strip: 32 (strip_32) or 16 (strip_16 only, the strip re-read from L2 for each 16 rows):
// bench_ab, 1B shape, 170 MB, 2026-12-04, GB/s (middle half) 32 vs 16: M = 32 23.5 vs 22.2, M = 24 23.5 vs 21.0;
// from 2 GB M = 32 18.1 vs 17.6.
#ifndef JR_AMX_GROUP_ROWS
#define JR_AMX_GROUP_ROWS 32
#endif

// Inside an OpenMP parallel region (an orphaned `omp for`, ending with the team's barrier), or outside one: as
// packed::gemv_for<uint16_t> (xp [M, ldx] bf16, wp = packed::pack(W), 64 columns a strip). Callers check use(K).
inline void gemv_for(const uint16_t* wp, const uint16_t* x, int64_t ldx, const float* bias, float* y, int64_t M,
                     int64_t N, int64_t K) {
  constexpr int64_t S = kS, GR = JR_AMX_GROUP_ROWS;
  const int64_t KS = K / 2, strips = packed::num_strips(N, S), groups = (M + GR - 1) / GR;
  alignas(64) float c[32 * 64];
  const uint16_t* xp = pack_x(x, ldx, M, K);
  int loaded = -1;  // the row count whose tile config is loaded on this thread
#pragma omp for schedule(guided, 1)
  for (int64_t s = 0; s < strips; ++s) {
    const uint16_t* ws = wp + s * KS * kSE;
    const int64_t n0 = s * S, nn = std::min(S, N - n0);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = GR * g, rows = std::min<int64_t>(GR, M - m0);
      const int r0 = int(std::min<int64_t>(16, rows)), r1 = int(rows - r0);
      if (loaded != int(rows)) {
        const TileConfig cfg = config(r0, r1);
        _tile_loadconfig(&cfg);
        loaded = int(rows);
      }
      const XTiles xt(xp, K, m0);
      if (r1 == 0) strip_16(ws, xt, KS, c);
      else strip_32(ws, xt, KS, c);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t j = 0; j < nn; ++j) y[(m0 + m) * N + n0 + j] = c[m * 64 + j] + (bias ? bias[n0 + j] : 0.0f);
    }
  }
  if (loaded >= 0) _tile_release();
}

#endif  // JR_HAVE_AMX

}  // namespace jr::amx
