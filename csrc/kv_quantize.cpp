// The `kv_quantize` op: rows of K or V as the int8 KV cache holds them (kv_int8.h, the same code decode_layer runs
// on a decode step's rows): the prefill's store of an int8 cache (kv_cache.KVCache.store), and the quantizer's own
// test against engine/kv_quant.py's quantize_kv.
//   x [rows, D] fp32 or bf16 (row stride D) -> q int8 [rows, D], scale fp32 [rows].
#include <vector>

#include <omp.h>

#include "common.h"
#include "kv_int8.h"
#include "simd.h"

namespace jr {

void kv_quantize(std::uintptr_t x, int dtype, std::uintptr_t q, std::uintptr_t scale, int64_t rows, int64_t D) {
  JR_CHECK(rows >= 0 && D >= 1, "need rows >= 0 and D >= 1");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "x must be fp32 or bf16");
  JR_CHECK(rows == 0 || (x && q && scale), "null pointer");
  int8_t* qp = ptr<int8_t>(q);
  float* sp = ptr<float>(scale);
  // a decode step's few rows on one thread; a prefill's (thousands of heads) on the team
#pragma omp parallel if (rows * D >= (int64_t(1) << 16))
  {
    std::vector<float> row(dtype == kBF16 ? size_t(D) : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      if (dtype == kBF16) simd::widen(ptr<const uint16_t>(x) + r * D, row.data(), D);
      const float* xr = dtype == kBF16 ? row.data() : ptr<const float>(x) + r * D;
      kv8::quantize_head(xr, qp + r * D, sp + r, D);
    }
  }
}

}  // namespace jr
