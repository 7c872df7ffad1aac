// How fast two cores can read a paged KV cache from DRAM in the orders an attention kernel could read it: pure reads
// (a vector add per 64 B, no other arithmetic), the 1B shape's layout (a cached token's K or V row = 16 heads x 128
// bf16 = 4 KiB, 16-token blocks = 64 KiB, rows' blocks interleaved in the pool as the engine hands them out), 32 rows
// x 20 blocks, 13 layers' caches (~1.1 GB, past any L3), rows handed to the threads dynamically.
//   g++ -O3 -march=native -fopenmp bench/attention_read_pattern.cpp -o /tmp/arp && /tmp/arp
// Orders (GB/s of the K and V bytes, best of 6 passes after 2 warm-ups; every order reads each byte once):
//   blocks       each block's K front to back, then its V (one stream at a time)
//   kv_256      a block's K and V front to back together, 256 B of each in turn (two streams)
//   kv_rows     token t's K row (4 KiB), then its V row, t = 0 .. 15 (two streams, page by page)
//   kv_rows_next token t's row of the next block's K, then of this block's V (as a kernel overlapping the two)
//   kernel      csrc/paged_attention.h's order for bf16 rows: K as 8 tokens x 256 B a head, 16 heads, twice; then V
//                as 8 passes of 2 heads (512 B) over the 16 tokens
//   kernel_pf   the same with its software prefetch: the next block's K and this block's V, line by line in address
//                order, spread over the K calls (prefetcht1)
//   rows4       four rows at once, each block's K and V 256 B at a time (eight streams)
// Results: bench/RESULTS.md (twenty-eighth session, 2-core Zen 5 VM).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kRows = 32, kBlocks = 20, kLayers = 13, kTokens = 16;
constexpr size_t kRow = 4096, kBlock = kTokens * kRow;  // bytes
constexpr size_t kPerLayer = size_t(kRows) * kBlocks * kBlock;

// a += the floats of p[0 : n] (n a multiple of 256)
inline __m512 sum(const char* p, size_t n, __m512 a) {
  for (size_t i = 0; i < n; i += 256) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(reinterpret_cast<const float*>(p + i)));
    a = _mm512_add_ps(a, _mm512_loadu_ps(reinterpret_cast<const float*>(p + i + 64)));
    a = _mm512_add_ps(a, _mm512_loadu_ps(reinterpret_cast<const float*>(p + i + 128)));
    a = _mm512_add_ps(a, _mm512_loadu_ps(reinterpret_cast<const float*>(p + i + 192)));
  }
  return a;
}

const char* at(const char* pool, int block, int row) { return pool + (size_t(block) * kRows + row) * kBlock; }

// one row's blocks in `order`; returns the row's sum
float read_row(const std::string& order, const char* K, const char* V, int r, int r_end) {
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < kBlocks; ++i) {
    const char *kb = at(K, i, r), *vb = at(V, i, r);
    if (order == "blocks") {
      a = sum(vb, kBlock, sum(kb, kBlock, a));
    } else if (order == "kv_256") {
      for (size_t j = 0; j < kBlock; j += 256) a = sum(vb + j, 256, sum(kb + j, 256, a));
    } else if (order == "kv_rows" || order == "kv_rows_next") {
      const char* kk = order == "kv_rows" ? kb : i + 1 < kBlocks ? at(K, i + 1, r) : nullptr;
      if (order == "kv_rows_next" && i == 0) a = sum(kb, kBlock, a);  // the first block's K, before the overlap
      for (int t = 0; t < kTokens; ++t) {
        if (kk) a = sum(kk + t * kRow, kRow, a);
        a = sum(vb + t * kRow, kRow, a);
      }
    } else if (order == "kernel" || order == "kernel_pf") {
      const char* kn = i + 1 < kBlocks ? at(K, i + 1, r) : nullptr;
      size_t pf = 0;
      for (int t0 = 0; t0 < kTokens; t0 += 8)
        for (int h = 0; h < 16; ++h) {
          if (order == "kernel_pf")
            for (int z = 0; z < 32; ++z, pf += 64) {  // 32 calls x 32 lines = a 64 KiB block of each
              if (kn) _mm_prefetch(kn + pf, _MM_HINT_T1);
              _mm_prefetch(vb + pf, _MM_HINT_T1);
            }
          for (int j = 0; j < 8; ++j) a = sum(kb + (t0 + j) * kRow + h * 256, 256, a);
        }
      for (int p = 0; p < 8; ++p)
        for (int t = 0; t < kTokens; ++t) a = sum(vb + t * kRow + p * 512, 512, a);
    } else {  // rows4: rows r .. r_end together
      for (size_t j = 0; j < kBlock; j += 256)
        for (int q = r; q < r_end; ++q) a = sum(at(V, i, q) + j, 256, sum(at(K, i, q) + j, 256, a));
    }
  }
  return _mm512_reduce_add_ps(a);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> orders = {"blocks", "kv_256", "kv_rows", "kv_rows_next", "kernel", "kernel_pf", "rows4"};
  if (argc > 1) orders.assign(argv + 1, argv + argc);
  std::vector<char*> K(kLayers), V(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    K[l] = static_cast<char*>(std::aligned_alloc(4096, kPerLayer));
    V[l] = static_cast<char*>(std::aligned_alloc(4096, kPerLayer));
    std::memset(K[l], 1, kPerLayer), std::memset(V[l], 1, kPerLayer);
  }
  float sink = 0.0f;
  for (const std::string& order : orders) {
    const int step = order == "rows4" ? 4 : 1;
    double best = 1e30;
    for (int pass = 0; pass < 8; ++pass) {
      const double t0 = omp_get_wtime();
      for (int l = 0; l < kLayers; ++l) {
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sink)
        for (int r = 0; r < kRows; r += step) sink += read_row(order, K[l], V[l], r, std::min(kRows, r + step));
      }
      if (pass >= 2) best = std::min(best, omp_get_wtime() - t0);
    }
    std::printf("%-13s %6.1f GB/s\n", order.c_str(), 2.0 * kPerLayer * kLayers / best / 1e9);
  }
  return sink == 12345.0f;  // keep the sums
}
