// dst[i, :] = src[idx[i], :] in dst's dtype (fp32 -> bf16 rounds to nearest even, as .to(torch.bfloat16)): the
// embedding lookups, rotary-table rows and cond/uncond row repeats of a decode step, without a torch op per step
// (cpu_ops.gather_rows and cpu_step.ImageStep).
//   src [src_rows, cols] (row stride cols); idx int64 [n], each in [0, src_rows), or null for idx[i] = i;
//   dst [n, cols]. dtypes: 0 = fp32, 1 = bf16.
#include <cstring>
#include <string>
#include <type_traits>

#include "common.h"

namespace jr {

void gather_rows(std::uintptr_t src, int src_dtype, std::uintptr_t idx, std::uintptr_t dst, int dst_dtype, int64_t n,
                 int64_t cols, int64_t src_rows) {
  JR_CHECK(n >= 0 && cols >= 1 && src_rows >= 0, "need n >= 0, cols >= 1, src_rows >= 0");
  JR_CHECK((src_dtype == kF32 || src_dtype == kBF16) && (dst_dtype == kF32 || dst_dtype == kBF16),
           "dtypes must be fp32 or bf16");
  JR_CHECK(n == 0 || (src && dst), "null pointer");
  const int64_t* ix = ptr<const int64_t>(idx);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = ix ? ix[i] : i;
    JR_CHECK(r >= 0 && r < src_rows, "idx[" + std::to_string(i) + "] = " + std::to_string(r) + " outside [0, " +
                                         std::to_string(src_rows) + ")");
  }
  auto run = [&](auto* s, auto* d) {
    for (int64_t i = 0; i < n; ++i) {
      const auto* a = s + (ix ? ix[i] : i) * cols;
      auto* b = d + i * cols;
      using S = std::remove_cv_t<std::remove_pointer_t<decltype(s)>>;
      if constexpr (std::is_same_v<S, std::remove_pointer_t<decltype(d)>>) std::memcpy(b, a, size_t(cols) * sizeof(S));
      else
        for (int64_t c = 0; c < cols; ++c) from_float(to_float(a[c]), b + c);
    }
  };
  const bool sf = src_dtype == kF32, df = dst_dtype == kF32;
  if (sf && df) run(ptr<const float>(src), ptr<float>(dst));
  else if (sf) run(ptr<const float>(src), ptr<uint16_t>(dst));
  else if (df) run(ptr<const uint16_t>(src), ptr<float>(dst));
  else run(ptr<const uint16_t>(src), ptr<uint16_t>(dst));
}

}  // namespace jr
