// The decode-time GEMV/GEMM core: y [M, N] = x [M, K] @ W [N, K]^T (+ bias [N]) for small M.
// Used by linear.cpp (the `linear` op) and decode_layer.cpp (inside its one parallel region).
//
// Decode reads every weight once per step, so the kernel is built around streaming W exactly once: each thread
// owns a contiguous range of W rows, takes RN rows at a time and a K tile of them (small enough to stay in L1),
// and runs every row of x against that tile with an RN x RM block of vector accumulators before moving on.
// x is copied once per call into fp32 (`xp`); for bf16 weights each 2*kWidth chunk of x is split into its
// even and odd elements, so a bf16 weight vector widens with one shift (even) and one mask (odd).
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
// Block sizes (overridable with -D for tuning). With AVX2's 16 registers, 6 x 2 accumulators measured as fast as
// or faster than 4x3 / 4x2 / 5x2 / 8x2 on the 2-core Zen 3 box at M = 1, 8, 32 (single thread; K tiles of 256 and
// 512 were slower; software prefetch 512-2048 B ahead was slower at M = 1). Both loops issue about one load per
// FMA, so M >= 8 is bound by L1 loads, not FMAs.
// AVX-512 (32 registers; untested on hardware here): 6 x 4.
#ifndef JR_LINEAR_RN
#define JR_LINEAR_RN 6
#endif
#ifndef JR_LINEAR_RM
#define JR_LINEAR_RM (kW == 16 ? 4 : 2)
#endif
#ifndef JR_LINEAR_KTILE
#define JR_LINEAR_KTILE 1024
#endif
constexpr int kRN = JR_LINEAR_RN;            // W rows per block
constexpr int kRM = JR_LINEAR_RM;            // x rows per block
constexpr int64_t kKTile = JR_LINEAR_KTILE;  // K elements per tile (a multiple of 2*kW): kRN rows of it fit L1/L2

// Elements one step of the inner loop consumes.
template <typename WT>
constexpr int step() {
  return std::is_same_v<WT, float> ? kW : 2 * kW;
}

// part[r][m] += sum_{k in [k0, k1)} W[r, k] * x[m, k], for RN rows of W at `w` and RM rows of xp at `xp`.
// [k0, kvec) is a whole number of steps; [kvec, k1) is the scalar tail (only in the last tile).
template <int RN, int RM, typename WT>
inline void block_dot(const WT* w, const float* xp, int64_t K, int64_t k0, int64_t kvec, int64_t k1,
                      float* part, int64_t ldp) {
  vf acc[RN][RM];
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < RM; ++m) acc[r][m] = simd::zero();
  if constexpr (std::is_same_v<WT, float>) {
    for (int64_t k = k0; k < kvec; k += kW) {
      vf xv[RM];
      for (int m = 0; m < RM; ++m) xv[m] = simd::load(xp + m * K + k);
      for (int r = 0; r < RN; ++r) {
        vf wv = simd::load(w + r * K + k);
        for (int m = 0; m < RM; ++m) acc[r][m] = simd::fma(wv, xv[m], acc[r][m]);
      }
    }
  } else if constexpr (RM == 1) {
    // GEMV: even and odd halves get their own accumulators, so no FMA waits on the one before it.
    vf acc_odd[RN];
    for (int r = 0; r < RN; ++r) acc_odd[r] = simd::zero();
    for (int64_t k = k0; k < kvec; k += 2 * kW) {
      const vf xe = simd::load(xp + k), xo = simd::load(xp + k + kW);
      for (int r = 0; r < RN; ++r) {
        vf we, wo;
        simd::load_bf16_pairs(w + r * K + k, we, wo);
        acc[r][0] = simd::fma(we, xe, acc[r][0]);
        acc_odd[r] = simd::fma(wo, xo, acc_odd[r]);
      }
    }
    for (int r = 0; r < RN; ++r) acc[r][0] = simd::add(acc[r][0], acc_odd[r]);
  } else {
    for (int64_t k = k0; k < kvec; k += 2 * kW) {
      for (int r = 0; r < RN; ++r) {
        vf we, wo;
        simd::load_bf16_pairs(w + r * K + k, we, wo);
        for (int m = 0; m < RM; ++m) {
          acc[r][m] = simd::fma(we, simd::load(xp + m * K + k), acc[r][m]);
          acc[r][m] = simd::fma(wo, simd::load(xp + m * K + k + kW), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < RM; ++m) {
      float s = simd::hsum(acc[r][m]);
      for (int64_t k = std::max(k0, kvec); k < k1; ++k) s += to_float(w[r * K + k]) * xp[m * K + k];
      part[r * ldp + m] += s;
    }
}

template <int RN, typename WT>
inline void block_dot_m(int rm, const WT* w, const float* xp, int64_t K, int64_t k0, int64_t kvec, int64_t k1,
                        float* part, int64_t ldp) {
  switch (rm) {
    case 1: return block_dot<RN, 1>(w, xp, K, k0, kvec, k1, part, ldp);
    case 2: return block_dot<RN, 2>(w, xp, K, k0, kvec, k1, part, ldp);
    case 3: return block_dot<RN, 3>(w, xp, K, k0, kvec, k1, part, ldp);
    default:
      if constexpr (kRM >= 4) return block_dot<RN, kRM>(w, xp, K, k0, kvec, k1, part, ldp);
  }
}

// RN rows of W starting at row n0 against all M rows of x; writes y[:, n0:n0+RN].
template <int RN, typename WT>
void rows_block(const WT* w, const float* xp, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                int64_t n0, float* part) {
  const int64_t kvec = K / step<WT>() * step<WT>();
  std::fill(part, part + RN * M, 0.0f);
  const WT* wb = w + n0 * K;
  for (int64_t k0 = 0; k0 < K; k0 += kKTile) {
    const int64_t k1 = std::min(K, k0 + kKTile);
    const int64_t kv = std::min(k1, kvec);
    for (int64_t m0 = 0; m0 < M; m0 += kRM) {
      const int rm = int(std::min<int64_t>(kRM, M - m0));
      block_dot_m<RN>(rm, wb, xp + m0 * K, K, k0, kv, k1, part + m0, M);
    }
  }
  for (int r = 0; r < RN; ++r) {
    const float b = bias ? bias[n0 + r] : 0.0f;
    for (int64_t m = 0; m < M; ++m) y[m * N + n0 + r] = part[r * M + m] + b;
  }
}

// xp [M, K] fp32; for bf16 weights each whole 2*kW chunk is stored as [even elements, odd elements].
template <typename WT, typename XT>
void pack_x(const XT* x, float* xp, int64_t M, int64_t K) {
  const int64_t kvec = K / step<WT>() * step<WT>();
  for (int64_t m = 0; m < M; ++m) {
    const XT* src = x + m * K;
    float* dst = xp + m * K;
    if constexpr (std::is_same_v<WT, float>) {
      for (int64_t k = 0; k < K; ++k) dst[k] = to_float(src[k]);
    } else {
      for (int64_t c = 0; c < kvec; c += 2 * kW)
        for (int i = 0; i < kW; ++i) {
          dst[c + i] = to_float(src[c + 2 * i]);
          dst[c + kW + i] = to_float(src[c + 2 * i + 1]);
        }
      for (int64_t k = kvec; k < K; ++k) dst[k] = to_float(src[k]);
    }
  }
}


// Inside an OpenMP parallel region (an orphaned `omp for`, so it ends with the team's barrier): y [M, N] fp32 =
// xp @ w^T + bias, with xp packed by pack_x<WT>. Outside a parallel region it runs on the calling thread alone.
template <typename WT>
void gemv_for(const WT* w, const float* xp, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  std::vector<float> part(static_cast<size_t>(kRN * M));
  const int64_t nfull = N / kRN;
#pragma omp for schedule(dynamic, 8)
  for (int64_t nb = 0; nb < nfull; ++nb) rows_block<kRN>(w, xp, bias, y, M, N, K, nb * kRN, part.data());
#pragma omp for schedule(static)
  for (int64_t n = nfull * kRN; n < N; ++n) rows_block<1>(w, xp, bias, y, M, N, K, n, part.data());
}

}  // namespace jr::gemv
