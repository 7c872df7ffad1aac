// Scatter one step's keys/values into the paged cache: k_cache.view(-1, H, D)[slot_mapping[i]] = k[i] (same for v).
//   k, v [N, H, D]; k_cache, v_cache [num_blocks, block_size, H, D]; slot_mapping int64 [N]. Slots < 0 (padding
//   tokens) or >= num_blocks * block_size are skipped, as in kernels/kv_store.py. A bit-exact copy of rows of
//   H * D elements of `elem_size` bytes.
#include <cstring>

#include <omp.h>

#include "common.h"

namespace jr {

void kv_store(std::uintptr_t k, std::uintptr_t v, std::uintptr_t k_cache, std::uintptr_t v_cache,
              std::uintptr_t slot_mapping, int64_t N, int64_t row_elems, int64_t elem_size, int64_t num_slots) {
  JR_CHECK(N >= 0 && row_elems >= 1 && num_slots >= 1, "need N >= 0, H * D >= 1, num_slots >= 1");
  JR_CHECK(elem_size == 1 || elem_size == 2 || elem_size == 4 || elem_size == 8, "element size must be 1, 2, 4 or 8");
  const int64_t* slots = ptr<const int64_t>(slot_mapping);
  const int64_t row = row_elems * elem_size;
  const char* ks = ptr<const char>(k);
  const char* vs = ptr<const char>(v);
  char* kd = ptr<char>(k_cache);
  char* vd = ptr<char>(v_cache);
  // A decode step writes a few KiB: threads only pay off for prefill-sized copies.
#pragma omp parallel for schedule(static) if (N * row >= (int64_t(1) << 20))
  for (int64_t i = 0; i < N; ++i) {
    const int64_t s = slots[i];
    if (s < 0 || s >= num_slots) continue;
    std::memcpy(kd + s * row, ks + i * row, size_t(row));
    std::memcpy(vd + s * row, vs + i * row, size_t(row));
  }
}

}  // namespace jr
