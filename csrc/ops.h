// The ops' entry points, one .cpp each (raw data pointers and sizes; dtype codes 0 = fp32, 1 = bf16): declared once
// here for bindings.cpp (the Python module) and for the ops that call other ops (image_steps.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>

namespace jr {
using ptr_t = std::uintptr_t;

void vq_nearest(ptr_t z, ptr_t codebook, ptr_t out, int64_t N, int64_t K, int64_t D);
void paged_decode_attention(ptr_t q, int q_dtype, ptr_t k_cache, ptr_t v_cache, int kv_dtype, ptr_t block_tables,
                            ptr_t context_lens, ptr_t o, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                            int64_t num_blocks, int64_t block_size, int64_t max_blocks, double sm_scale,
                            ptr_t k_scale, ptr_t v_scale);
void kv_quantize(ptr_t x, int dtype, ptr_t q, ptr_t scale, int64_t rows, int64_t D);
void kv_store(ptr_t k, ptr_t v, ptr_t k_cache, ptr_t v_cache, ptr_t slot_mapping, int64_t N, int64_t row_elems,
              int64_t elem_size, int64_t num_slots);
void cfg_sample(ptr_t cond, ptr_t uncond, ptr_t cfg_weight, ptr_t temperature, ptr_t top_k, ptr_t top_p,
                ptr_t seeds, ptr_t greedy, ptr_t out, int64_t B, int64_t V, int64_t ldc, int64_t ldu, ptr_t cond_rows,
                ptr_t uncond_rows, int64_t rows);
void linear(ptr_t x, int x_dtype, ptr_t w, int w_dtype, ptr_t bias, ptr_t y, int64_t M, int64_t N, int64_t K);
void decode_layer(ptr_t h, int dtype, ptr_t in_norm, ptr_t qkv, ptr_t o, ptr_t post_norm, ptr_t gate_up, ptr_t down,
                  ptr_t k_cache, ptr_t v_cache, ptr_t slot_mapping, ptr_t block_tables, ptr_t context_lens, ptr_t cos,
                  ptr_t sin, int64_t R, int64_t C, int64_t H, int64_t I, int64_t num_blocks, int64_t block_size,
                  int64_t max_blocks, double eps, double sm_scale, ptr_t final_norm, ptr_t out, double final_eps,
                  int packed, ptr_t k_scale, ptr_t v_scale);
void decode_phase_timing(bool on);
int decode_phase_count();
const char* decode_phase_name(int i);
int64_t decode_phase_read(ptr_t seconds, bool reset);
void mlp_gelu(ptr_t x, ptr_t w1, ptr_t b1, ptr_t w2, ptr_t b2, ptr_t y, int dtype, int64_t M, int64_t K, int64_t H,
              int64_t N, int packed, bool round_out);
void gather_rows(ptr_t src, int src_dtype, ptr_t idx, ptr_t dst, int dst_dtype, int64_t n, int64_t cols,
                 int64_t src_rows);
bool packed_available(int dtype);
bool amx_available();
bool amx_w8a8_available();
bool set_amx(bool on);
int64_t packed_size(int64_t N, int64_t K, int dtype);
std::tuple<int64_t, int64_t, int64_t> packed_layout(int dtype);  // (columns a strip, steps a K tile, runs a tile)
void pack_weight(ptr_t w, ptr_t wp, int64_t N, int64_t K, int dtype);
void linear_packed(ptr_t x, ptr_t wp, ptr_t bias, ptr_t y, int64_t M, int64_t N, int64_t K, int dtype);
void pack_int8(ptr_t q, ptr_t scales, ptr_t wp, int64_t N, int64_t K);
void pack_w8a8(ptr_t q, ptr_t scales, ptr_t wp, int64_t N, int64_t K);
void swiglu(ptr_t gate, int64_t ldg, ptr_t up, int64_t ldu, ptr_t out, int64_t R, int64_t n, int dtype);
void rms_norm(ptr_t x, int64_t ldx, ptr_t residual, int64_t ldr, ptr_t weight, ptr_t out, ptr_t h_out, int64_t R,
              int64_t C, double eps, int dtype);
void rope(ptr_t x, int64_t ldx, ptr_t cos, ptr_t sin, ptr_t out, int64_t R, int64_t H, int64_t D, int dtype);
void image_steps(ptr_t plan, ptr_t layers, int64_t L, int64_t k, ptr_t tokens, ptr_t positions, ptr_t lens, ptr_t slots,
                 ptr_t block_tables, int64_t max_blocks, ptr_t seeds, ptr_t out, double eps, double final_eps,
                 double sm_scale, int64_t layer_stride);
int64_t image_steps_plan_len();
double stream_sum(ptr_t x, int64_t n);
bool prefill_attention_available();
void prefill_attention(ptr_t q, ptr_t k, ptr_t v, ptr_t o, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t Hkv,
                       int64_t D, bool causal, double scale, int64_t q_sb, int64_t q_st, int64_t k_sb, int64_t k_st,
                       int64_t v_sb, int64_t v_st);
const char* simd_isa();
// The decode kernels' software-prefetch rules as this CPU takes them (packed_gemv.h, w8a8_gemv.h, paged_attention.h).
std::map<std::string, int64_t> prefetch_rules();
// The calling thread's OpenMP team size (thread_team.cpp): torch's process-wide count left as it is.
void set_thread_team(int64_t n);
}  // namespace jr
