// idx[i] = argmin_j ||z_i - c_j||^2 (ties -> smallest j) for z [N, D], codebook [K, D], all fp32.
//
// The codebook is transposed once to cT [D, Kp] (Kp = K rounded up to the vector width) so one vector holds
// kWidth codes; each z element is pre-broadcast to a vector so the subtraction reads it as a memory operand. Each thread takes kRB rows of z at a time and walks the codebook in tiles of kTile codes:
// distances for the tile go to a small L1 buffer, and a row's running best is updated only when the tile's
// minimum beats it. Memory is O(tile), never O(N * K).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "common.h"
#include "simd.h"

namespace jr {
namespace {

using simd::vf;
constexpr int kW = simd::kWidth;
constexpr int kRB = 4;        // rows of z sharing each codebook load
constexpr int64_t kTile = 512;  // codes per tile (a multiple of kW)

// dist[r][j] = ||z_r - c_{j0 + j}||^2 for j in [0, len), len a multiple of kW. zb [RB, D, kW]: z broadcast.
template <int RB>
inline void tile_distances(const float* zb, const float* cT, int64_t Kp, int64_t D, int64_t j0, int64_t len,
                           float* dist) {
  for (int64_t j = 0; j < len; j += kW) {
    vf acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = simd::zero();
    for (int64_t d = 0; d < D; ++d) {
      const vf c = simd::load(cT + d * Kp + j0 + j);
      for (int r = 0; r < RB; ++r) {
        const vf diff = simd::sub(simd::load(zb + (r * D + d) * kW), c);
        acc[r] = simd::fma(diff, diff, acc[r]);
      }
    }
    for (int r = 0; r < RB; ++r) simd::store(dist + r * kTile + j, acc[r]);
  }
}

template <int RB>
void rows_nearest(const float* z, const float* cT, int64_t K, int64_t Kp, int64_t D, int64_t* out, float* dist,
                  float* zb) {
  for (int64_t i = 0; i < RB * D; ++i) simd::store(zb + i * kW, simd::set1(z[i]));
  float best[RB];
  int64_t arg[RB];
  for (int r = 0; r < RB; ++r) best[r] = std::numeric_limits<float>::infinity(), arg[r] = 0;
  for (int64_t j0 = 0; j0 < K; j0 += kTile) {
    const int64_t len = std::min(kTile, Kp - j0);
    const int64_t valid = std::min(kTile, K - j0);
    tile_distances<RB>(zb, cT, Kp, D, j0, len, dist);
    for (int r = 0; r < RB; ++r) {
      float* dr = dist + r * kTile;
      for (int64_t j = valid; j < len; ++j) dr[j] = std::numeric_limits<float>::infinity();  // padding codes
      vf mv = simd::load(dr);
      for (int64_t j = kW; j < len; j += kW) mv = simd::min(mv, simd::load(dr + j));
      const float m = simd::hmin(mv);
      if (m < best[r]) {  // strict: an equal distance in a later tile keeps the earlier index
        int64_t j = 0;
        while (dr[j] != m) ++j;
        best[r] = m;
        arg[r] = j0 + j;
      }
    }
  }
  for (int r = 0; r < RB; ++r) out[r] = arg[r];
}

}  // namespace

void vq_nearest(std::uintptr_t z_ptr, std::uintptr_t codebook_ptr, std::uintptr_t out_ptr, int64_t N, int64_t K,
                int64_t D) {
  JR_CHECK(N >= 0 && K >= 1 && D >= 1, "need N >= 0, K >= 1, D >= 1");
  JR_CHECK(K < (int64_t(1) << 40) && D < (int64_t(1) << 20), "K or D too large");
  if (N == 0) return;
  const float* z = ptr<const float>(z_ptr);
  const float* cb = ptr<const float>(codebook_ptr);
  int64_t* out = ptr<int64_t>(out_ptr);
  const int64_t Kp = (K + kW - 1) / kW * kW;

  // cT [D, Kp]; padded codes are zero here and masked to +inf distance in rows_nearest.
  std::vector<float> cT(size_t(D * Kp), 0.0f);
#pragma omp parallel for schedule(static) if (K * D >= (int64_t(1) << 16))
  for (int64_t j = 0; j < K; ++j)
    for (int64_t d = 0; d < D; ++d) cT[d * Kp + j] = cb[j * D + d];

  const int64_t nfull = N / kRB;
  const bool threads = N * K * D >= (int64_t(1) << 20);
#pragma omp parallel if (threads)
  {
    std::vector<float> dist(static_cast<size_t>(kRB * kTile)), zb(static_cast<size_t>(kRB * D * kW));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nfull; ++b)
      rows_nearest<kRB>(z + b * kRB * D, cT.data(), K, Kp, D, out + b * kRB, dist.data(), zb.data());
#pragma omp for schedule(static)
    for (int64_t i = nfull * kRB; i < N; ++i)
      rows_nearest<1>(z + i * D, cT.data(), K, Kp, D, out + i, dist.data(), zb.data());
  }
}

}  // namespace jr
