// The `paged_decode_attention` op: q [B, H, D] against a paged KV cache; argument guards, then the core in
// paged_attention.h (online softmax over the block table; tasks of a sequence, a chunk of heads and a part of its context).
// kv_dtype int8 (kInt8KV): the caches hold int8 with fp32 scales k_scale, v_scale [num_blocks, block_size, Hkv].
#include <string>

#include <omp.h>

#include "common.h"
#include "paged_attention.h"

namespace jr {
namespace {

template <typename TQ, typename TKV>
void attend(const TQ* q, const TKV* kc, const TKV* vc, const int32_t* bt, const int32_t* cl, TQ* o, int64_t B,
            int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, float sm_scale, const float* ks,
            const float* vs) {
  int64_t work = 0;  // cached elements read, to leave tiny calls on one thread
  for (int64_t b = 0; b < B; ++b) work += int64_t(cl[b]) * Hkv * D;
  attn::Plan plan = attn::make_plan(cl, B, H, Hkv, D, omp_get_max_threads());
#pragma omp parallel if (work >= (int64_t(1) << 16))
  attn::attend_for(q, kc, vc, bt, cl, o, B, H, Hkv, D, bs, max_blocks, sm_scale, plan, ks, vs);
}

template <typename TQ>
void dispatch_kv(int kv_dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, const int32_t* bt,
                 const int32_t* cl, std::uintptr_t o, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                 int64_t max_blocks, float sm_scale, const float* ks, const float* vs) {
  if (kv_dtype == kF32)
    attend(ptr<const TQ>(q), ptr<const float>(k), ptr<const float>(v), bt, cl, ptr<TQ>(o), B, H, Hkv, D, bs,
           max_blocks, sm_scale, nullptr, nullptr);
  else if (kv_dtype == kBF16)
    attend(ptr<const TQ>(q), ptr<const uint16_t>(k), ptr<const uint16_t>(v), bt, cl, ptr<TQ>(o), B, H, Hkv, D, bs,
           max_blocks, sm_scale, nullptr, nullptr);
  else
    attend(ptr<const TQ>(q), ptr<const int8_t>(k), ptr<const int8_t>(v), bt, cl, ptr<TQ>(o), B, H, Hkv, D, bs,
           max_blocks, sm_scale, ks, vs);
}

}  // namespace

void paged_decode_attention(std::uintptr_t q, int q_dtype, std::uintptr_t k_cache, std::uintptr_t v_cache,
                            int kv_dtype, std::uintptr_t block_tables, std::uintptr_t context_lens, std::uintptr_t o,
                            int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t num_blocks, int64_t block_size,
                            int64_t max_blocks, double sm_scale, std::uintptr_t k_scale, std::uintptr_t v_scale) {
  JR_CHECK(B >= 0 && H >= 1 && Hkv >= 1 && D >= 1, "need B >= 0 and H, Hkv, D >= 1");
  JR_CHECK(H % Hkv == 0, "H must be a multiple of the cache's head count");
  JR_CHECK(num_blocks >= 1 && block_size >= 1 && max_blocks >= 1, "num_blocks, block_size, max_blocks must be >= 1");
  JR_CHECK(q_dtype == kF32 || q_dtype == kBF16, "q dtype must be fp32 or bf16");
  JR_CHECK(kv_dtype == kF32 || kv_dtype == kBF16 || kv_dtype == kInt8KV, "cache dtype must be fp32, bf16 or int8");
  JR_CHECK((k_scale != 0) == (kv_dtype == kInt8KV) && (v_scale != 0) == (kv_dtype == kInt8KV),
           "an int8 cache needs both scale pointers, and only an int8 cache takes them");
  const float* ks = ptr<const float>(k_scale);
  const float* vs = ptr<const float>(v_scale);
  const int32_t* bt = ptr<const int32_t>(block_tables);
  const int32_t* cl = ptr<const int32_t>(context_lens);
  attn::check_tables(bt, cl, B, num_blocks, block_size, max_blocks);  // before any thread reads the cache
  if (q_dtype == kF32)
    dispatch_kv<float>(kv_dtype, q, k_cache, v_cache, bt, cl, o, B, H, Hkv, D, block_size, max_blocks, float(sm_scale),
                       ks, vs);
  else
    dispatch_kv<uint16_t>(kv_dtype, q, k_cache, v_cache, bt, cl, o, B, H, Hkv, D, block_size, max_blocks,
                          float(sm_scale), ks, vs);
}

}  // namespace jr
