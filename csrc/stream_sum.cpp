// sum(x) for a long fp32 array, written to run at the memory system's read bandwidth: the roofline probe of
// bench/bench_gemv.py (torch.sum reads slower than the GEMV kernels it is meant to bound). Each thread reads its
// share as kStreams interleaved sequential streams, as the GEMV reads several weight rows at once: one stream
// per core leaves the hardware prefetchers short of requests.
#include <algorithm>

#include <omp.h>

#include "common.h"
#include "simd.h"

namespace jr {

double stream_sum(std::uintptr_t x_ptr, int64_t n) {
  JR_CHECK(n >= 0, "n must be >= 0");
  using simd::vf;
  constexpr int kW = simd::kWidth;
  constexpr int kStreams = 8;
  const float* x = ptr<const float>(x_ptr);
  double total = 0.0;
#pragma omp parallel reduction(+ : total) if (n >= (int64_t(1) << 20))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
    const int64_t part = (end - begin) / kStreams / kW * kW;  // elements per stream, whole vectors
    vf acc[kStreams];
    for (int s = 0; s < kStreams; ++s) acc[s] = simd::zero();
    for (int64_t i = 0; i < part; i += kW)
      for (int s = 0; s < kStreams; ++s) acc[s] = simd::add(acc[s], simd::load(x + begin + s * part + i));
    for (int s = 1; s < kStreams; ++s) acc[0] = simd::add(acc[0], acc[s]);
    double rest = 0.0;
    for (int64_t i = begin + kStreams * part; i < end; ++i) rest += x[i];
    total += double(simd::hsum(acc[0])) + rest;
  }
  return total;
}

}  // namespace jr
