// One decoder layer of the LLM for a decode step (one token per row), in one OpenMP parallel region:
//   h [R, C] (the residual stream, model dtype T, updated in place):
//     a = RMSNorm(h) -> qkv = a Wqkv^T -> RoPE(q, k) -> k, v into the paged cache at slot_mapping[r]
//     -> o = paged attention(q) -> h += o Wo^T -> a = RMSNorm(h) -> g, u = a Wgate_up^T -> h += (silu(g) u) Wdown^T
//   and for the model's last layer (final_norm not null) also out [R, C] (T) = RMSNorm(h) with final_norm
// Weights [out, in] in T (with `packed` 1: qkv, o, gate_up and down in packed_gemv.h's strip layout instead, packed
// once by cpu_step.DecodeStack; bf16 on AVX512_BF16 CPUs only; `packed` 2: those four int8 with row scales in
// int8_gemv.h's layout, T bf16; `packed` 4: W8A8, w8a8_gemv.h, T bf16), caches [num_blocks, block_size, H, D] in T, T = fp32 or
// bf16, or int8 with fp32 scales k_scale, v_scale [num_blocks, block_size, H] (kv_int8.h: the new K, V rows quantized
// from the values the T cache would hold); cos/sin fp32 [R, D] (the rotary tables of each row's position, already
// rounded to T). MHA only (Janus-Pro).
//
// Why one call: on the 2-core CPU a decode step of the small model spent about as long in the ~15 small torch ops
// and Python around each layer as in its four GEMVs. Here every phase is an `omp for` of the same team, so a
// phase boundary costs a barrier, not an interpreter round trip and an OpenMP fork/join.
//
// Numerics follow the torch path (ops.py) op by op: every value the torch path holds in a T tensor is rounded to T
// here at the same point (rnd), sums and products in between are fp32, and the GEMV is gemv.h's, fed the same
// values, so the fp32 path differs from the torch one only in summation order.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <omp.h>

#include "common.h"
#include "gemv.h"
#include "int8_gemv.h"
#include "kind_gemv.h"
#include "kv_int8.h"
#include "w8a8_gemv.h"
#include "packed_gemv.h"
#include "paged_attention.h"
#include "rms_norm.h"
#include "rope.h"
#include "swiglu.h"

namespace jr {
namespace {

// ---- optional phase timers (`janus-rt bench --profile`) -------------------------------------------------------
// The wall time of each phase of run_layer, taken by the team's thread 0 after the phase's closing barrier: the
// phase's time on the critical path (its slowest thread, plus the barrier), not a sum over threads. Off by default;
// off, a call pays one relaxed atomic load.
// layer_setup: from the call's start to the team's first phase (the buffers, the attention plan, the region's start).
enum Phase : int { kSetup, kInNorm, kQkv, kRopeStore, kAttention, kPackO, kOProj, kPostNorm, kGateUp, kSiluMul, kDown,
                   kResidual, kNumPhases };
constexpr const char* kPhaseNames[kNumPhases] = {"layer_setup", "input_norm", "qkv_proj", "rope_kv_store",
                                                 "attention", "pack_o", "o_proj", "residual_post_norm",
                                                 "gate_up_proj", "silu_mul", "down_proj", "residual"};
std::atomic<bool> g_timing{false};
std::mutex g_timing_mu;
// A layer call below this much work (multiply-adds of its four projections over its rows, plus its rows' K and V
// elements) runs on one thread: ~1e6 is ~10 us of one core's arithmetic, about what the team's barriers cost.
constexpr int64_t kTeamWork = int64_t(1) << 20;
double g_phase_s[kNumPhases] = {};
int64_t g_timed_calls = 0;

struct PhaseClock {
  double* acc;  // null: not timing (timing off, or not thread 0)
  double t;
  PhaseClock(double* a, double start) : acc(a), t(start) {}
  void mark(Phase p) {
    if (!acc) return;
    const double now = omp_get_wtime();
    acc[p] += now - t;
    t = now;
  }
};

// h [C] (values of T) = T(h + T(y)): the residual add of a layer output y (fp32 from the GEMV, held in T by torch);
// y is overwritten (the sums, then stored to h).
template <typename T>
inline void add_residual(T* h, float* y, int64_t C) {
  using namespace simd;
  int64_t c = 0;
  for (; c + kWidth <= C; c += kWidth)
    store(y + c, act::rnd_v<T>(add(load_as_float(h + c), act::rnd_v<T>(load(y + c)))));
  for (; c < C; ++c) y[c] = rnd<T>(to_float(h[c]) + rnd<T>(y[c]));
  act::store_values(y, h, C);
}

template <typename T>
struct Layer {
  const T *in_norm, *qkv, *o, *post_norm, *gate_up, *down;
  void *k_cache, *v_cache;  // T, or int8 where k_scale is set
  float *k_scale, *v_scale;  // the int8 cache's scales (null: a T cache)
  const int64_t* slots;
  const int32_t *block_tables, *context_lens;
  const float *cos, *sin;
  int64_t R, C, H, D, I, num_slots, block_size, max_blocks;
  float eps, sm_scale;
  const T* final_norm;  // the model's last layer: out = RMSNorm(h) with this weight (null for other layers)
  T* out;
  float final_eps;
  int packed;  // qkv, o, gate_up, down: 0 [N, K] in T, 1 packed (packed_gemv.h), 2 int8 packed (int8_gemv.h),
              // 4 W8A8 (w8a8_gemv.h)
};

// y [R, N] = xp @ W^T for one of the layer's weights, through the GEMV its layout needs (inside the region).
// W8A8: xq (the team's, shaped for R rows of K columns) first gets xp quantized, a share of the rows per thread.
template <typename T>
inline void layer_gemv(const Layer<T>& L, const T* w, const gemv::xpack_t<T>* xp, int64_t ldx, float* y, int64_t N,
                       int64_t K, w8a8::QuantizedX& xq) {
  if constexpr (w8a8::available() && std::is_same_v<gemv::xpack_t<T>, uint16_t>) {
    if (L.packed == kW8A8) xq.rows_for(xp, ldx, K, L.R);
  }
  gemv_for_kind(L.packed, w, xp, ldx, xq, nullptr, y, L.R, N, K);
}

// A layer call's buffers, kept by the calling thread from call to call and grown only when a call has more rows
// (or another C, I): allocated afresh, the 1B step's ~2.8 MB per layer call came from new pages (page faults and
// zeroing) on every call. xc, xi: GEMV inputs of width C and of width I (gemv::pack_x<T>, rows padded to ldc, ldi;
// pack_x writes a row's first C or I entries only, so the padding stays zero as allocated); y: GEMV output (fp32);
// row: a normed / activated row before packing; q, o: rotated queries, attention output; xq_c, xq_i: W8A8's
// quantized xc, xi (shaped before each W8A8 layer call's region; they only grow).
template <typename T>
struct Buffers {
  int64_t rows = 0, C = 0, I = 0;
  std::vector<gemv::xpack_t<T>> xc, xi;
  std::vector<float> y, row;
  std::vector<T> q, o;
  w8a8::QuantizedX xq_c, xq_i;
};

template <typename T>
Buffers<T>& layer_buffers(int64_t R, int64_t C, int64_t I) {
  thread_local Buffers<T> b;
  if (R > b.rows || C != b.C || I != b.I) {
    b = Buffers<T>{};
    b.rows = R, b.C = C, b.I = I;
    b.xc.assign(size_t(R * gemv::x_stride(C)), {});
    b.xi.assign(size_t(R * gemv::x_stride(I)), {});
    b.y.assign(size_t(R * std::max(3 * C, 2 * I)), 0.0f);
    b.row.assign(size_t(R * std::max(C, I)), 0.0f);
    b.q.assign(size_t(R * C), T{});
    b.o.assign(size_t(R * C), T{});
  }
  return b;
}

template <typename T>
void run_layer(T* h, const Layer<T>& L) {
  const bool timed = g_timing.load(std::memory_order_relaxed);
  const double start = timed ? omp_get_wtime() : 0.0;
  const int64_t R = L.R, C = L.C, H = L.H, D = L.D, I = L.I;
  const int64_t ldc = gemv::x_stride(C), ldi = gemv::x_stride(I);
  Buffers<T>& buf = layer_buffers<T>(R, C, I);
  gemv::xpack_t<T>*const xc = buf.xc.data(), *const xi = buf.xi.data();
  float *const y = buf.y.data(), *const row = buf.row.data();
  T *const q = buf.q.data(), *const o = buf.o.data();
  attn::Plan plan = attn::make_plan(L.context_lens, R, H, H, D, omp_get_max_threads());
  if (L.packed == kW8A8) buf.xq_c.shape(R, C), buf.xq_i.shape(R, I);  // (grows only)
  double phase_s[kNumPhases] = {};
  // A layer this small runs on the calling thread (the same plan and values): the team's dozen barriers a layer cost
  // more than its work, and far more on a shared machine, where each waits for a descheduled thread (the embedded
  // model's decode step: 0.06 ms alone, 66-150 ms beside another process's two busy threads).
  int64_t context = 0;
  for (int64_t r = 0; r < R; ++r) context += L.context_lens[r];
  const bool team = R * C * (4 * C + 3 * I) + 2 * C * context >= kTeamWork;
#pragma omp parallel if (team)
  {
    PhaseClock clock(timed && omp_get_thread_num() == 0 ? phase_s : nullptr, start);
    clock.mark(kSetup);
    // a = norm(h) -> qkv
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      norm::rms_norm_row(h + r * C, L.in_norm, &row[r * C], C, L.eps);
      gemv::pack_x<T>(&row[r * C], &xc[r * ldc], 1, C, ldc);
    }
    clock.mark(kInNorm);
    layer_gemv(L, L.qkv, xc, ldc, y, 3 * C, C, buf.xq_c);
    clock.mark(kQkv);
    // RoPE on q and k; k and v into the cache
    std::vector<float> tmp(static_cast<size_t>(D));  // this thread's rope_head scratch
    std::vector<T> krow(L.k_scale ? size_t(D) : 0);    // int8 cache: the rotated k head in T, before quantizing
#pragma omp for schedule(static)
    for (int64_t rh = 0; rh < R * H; ++rh) {
      const int64_t r = rh / H, hd = rh % H;
      float* qkv = &y[r * 3 * C];
      float* qh = qkv + hd * D;
      float* kh = qkv + C + hd * D;
      float* vh = qkv + 2 * C + hd * D;
      act::round_to<T>(qh, D);
      act::round_to<T>(kh, D);
      rotary::rope_head(qh, L.cos + r * D, L.sin + r * D, &q[r * C + hd * D], D, tmp.data());
      const int64_t s = L.slots[r];
      if (s >= 0 && s < L.num_slots) {  // padding rows (slot < 0) write nothing, as kv_store
        const int64_t at = (s * H + hd) * D;
        act::round_to<T>(vh, D);
        if (L.k_scale) {  // int8: quantize the values a T cache would hold (tmp: k's rounded values after RoPE)
          rotary::rope_head(kh, L.cos + r * D, L.sin + r * D, krow.data(), D, tmp.data());
          kv8::quantize_head(tmp.data(), static_cast<int8_t*>(L.k_cache) + at, L.k_scale + s * H + hd, D);
          kv8::quantize_head(vh, static_cast<int8_t*>(L.v_cache) + at, L.v_scale + s * H + hd, D);
        } else {
          rotary::rope_head(kh, L.cos + r * D, L.sin + r * D, static_cast<T*>(L.k_cache) + at, D, tmp.data());
          act::store_values(vh, static_cast<T*>(L.v_cache) + at, D);
        }
      }
    }
    clock.mark(kRopeStore);
    if (L.k_scale)
      attn::attend_for(q, static_cast<const int8_t*>(L.k_cache), static_cast<const int8_t*>(L.v_cache),
                       L.block_tables, L.context_lens, o, R, H, H, D, L.block_size, L.max_blocks, L.sm_scale, plan,
                       L.k_scale, L.v_scale);
    else
      attn::attend_for(q, static_cast<const T*>(L.k_cache), static_cast<const T*>(L.v_cache), L.block_tables,
                       L.context_lens, o, R, H, H, D, L.block_size, L.max_blocks, L.sm_scale, plan);
    clock.mark(kAttention);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) gemv::pack_x<T>(&o[r * C], &xc[r * ldc], 1, C, ldc);
    clock.mark(kPackO);
    layer_gemv(L, L.o, xc, ldc, y, C, C, buf.xq_c);
    clock.mark(kOProj);
    // h += attention; a = norm(h) -> gate, up
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      add_residual(h + r * C, &y[r * C], C);
      norm::rms_norm_row(h + r * C, L.post_norm, &row[r * C], C, L.eps);
      gemv::pack_x<T>(&row[r * C], &xc[r * ldc], 1, C, ldc);
    }
    clock.mark(kPostNorm);
    layer_gemv(L, L.gate_up, xc, ldc, y, 2 * I, C, buf.xq_c);
    clock.mark(kGateUp);
    // silu(gate) * up -> down
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      act::silu_mul<T>(&y[r * 2 * I], &y[r * 2 * I + I], &row[r * I], I);
      gemv::pack_x<T>(&row[r * I], &xi[r * ldi], 1, I, ldi);
    }
    clock.mark(kSiluMul);
    layer_gemv(L, L.down, xi, ldi, y, C, I, buf.xq_i);
    clock.mark(kDown);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      add_residual(h + r * C, &y[r * C], C);
      if (L.final_norm) {  // the model's final norm, while the row is in cache
        norm::rms_norm_row(h + r * C, L.final_norm, &row[r * C], C, L.final_eps);
        act::store_values(&row[r * C], L.out + r * C, C);
      }
    }
    clock.mark(kResidual);
  }
  if (timed) {
    std::lock_guard<std::mutex> lock(g_timing_mu);
    for (int p = 0; p < kNumPhases; ++p) g_phase_s[p] += phase_s[p];
    ++g_timed_calls;
  }
}

}  // namespace

void decode_phase_timing(bool on) { g_timing.store(on, std::memory_order_relaxed); }

int decode_phase_count() { return kNumPhases; }

std::map<std::string, int64_t> prefetch_rules() {
  const bool bf16 = packed::available<uint16_t>();  // (no packed bf16 GEMV without AVX512_BF16)
  return {{"amd_family", cpu::amd_family()},
          {"intel", cpu::intel()},
          {"zen5", cpu::zen5_or_later()},
          {"packed_bf16_min_rows", bf16 ? packed::prefetch_min_rows<uint16_t>() : -1},
          {"packed_fp32_min_rows", packed::prefetch_min_rows<float>()},
          {"w8a8_min_rows", w8a8::prefetch_min_rows()},
          {"attention_locality", attn::prefetch_locality()},
          {"attention_k_during_v", attn::k_during_v<float>()},  // fp32 and int8 caches alike
          {"attention_k_during_v_bf16", attn::k_during_v<uint16_t>()}};
}

const char* decode_phase_name(int i) {
  JR_CHECK(i >= 0 && i < kNumPhases, "phase index out of range");
  return kPhaseNames[i];
}

// seconds[0:kNumPhases] = the accumulated phase times; returns the number of timed decode_layer calls.
int64_t decode_phase_read(std::uintptr_t seconds, bool reset) {
  JR_CHECK(seconds, "null pointer");
  std::lock_guard<std::mutex> lock(g_timing_mu);
  double* out = ptr<double>(seconds);
  for (int p = 0; p < kNumPhases; ++p) out[p] = g_phase_s[p];
  const int64_t calls = g_timed_calls;
  if (reset) {
    std::fill(g_phase_s, g_phase_s + kNumPhases, 0.0);
    g_timed_calls = 0;
  }
  return calls;
}

void decode_layer(std::uintptr_t h, int dtype, std::uintptr_t in_norm, std::uintptr_t qkv, std::uintptr_t o,
                  std::uintptr_t post_norm, std::uintptr_t gate_up, std::uintptr_t down, std::uintptr_t k_cache,
                  std::uintptr_t v_cache, std::uintptr_t slot_mapping, std::uintptr_t block_tables,
                  std::uintptr_t context_lens, std::uintptr_t cos, std::uintptr_t sin, int64_t R, int64_t C,
                  int64_t H, int64_t I, int64_t num_blocks, int64_t block_size, int64_t max_blocks, double eps,
                  double sm_scale, std::uintptr_t final_norm, std::uintptr_t out, double final_eps, int packed,
                  std::uintptr_t k_scale, std::uintptr_t v_scale) {
  JR_CHECK(R >= 1 && C >= 1 && H >= 1 && I >= 1, "need R, C, H, I >= 1");
  JR_CHECK(C % H == 0 && (C / H) % 2 == 0, "C must be H * D with an even head_dim D");
  JR_CHECK(num_blocks >= 1 && block_size >= 1 && max_blocks >= 1, "num_blocks, block_size, max_blocks must be >= 1");
  JR_CHECK(dtype == kF32 || dtype == kBF16, "dtype must be fp32 or bf16");
  JR_CHECK(h && in_norm && qkv && o && post_norm && gate_up && down && k_cache && v_cache && slot_mapping &&
               block_tables && context_lens && cos && sin, "null pointer");
  const int32_t* bt = ptr<const int32_t>(block_tables);
  const int32_t* cl = ptr<const int32_t>(context_lens);
  JR_CHECK(!final_norm || out, "final_norm needs an output pointer");
  JR_CHECK((packed >= 0 && packed <= kInt8W) || packed == kW8A8, "packed must be 0, 1, 2 (int8) or 4 (W8A8)");
  JR_CHECK(!packed || dtype == kF32 || (simd::kHaveBf16Dot && C % 2 == 0 && I % 2 == 0),
           "packed bf16 weights need an AVX512_BF16 build and even C and I");
  JR_CHECK(packed != kInt8W || (dtype == kBF16 && int8w::available()), "int8 weights need bf16 x and AVX512_BF16");
  JR_CHECK(packed != kW8A8 || (dtype == kBF16 && w8a8::available() && simd::kHaveBf16Dot),
           "W8A8 weights need bf16 x, AVX512_VNNI and AVX512_BF16");
  JR_CHECK((k_scale != 0) == (v_scale != 0), "an int8 cache needs both k_scale and v_scale");
  attn::check_tables(bt, cl, R, num_blocks, block_size, max_blocks);
  auto run = [&](auto* hp) {
    using T = std::remove_pointer_t<decltype(hp)>;
    Layer<T> L{ptr<const T>(in_norm), ptr<const T>(qkv), ptr<const T>(o), ptr<const T>(post_norm),
               ptr<const T>(gate_up), ptr<const T>(down), ptr<void>(k_cache), ptr<void>(v_cache),
               ptr<float>(k_scale), ptr<float>(v_scale),
               ptr<const int64_t>(slot_mapping), bt, cl, ptr<const float>(cos), ptr<const float>(sin),
               R, C, H, C / H, I, num_blocks * block_size, block_size, max_blocks, float(eps), float(sm_scale),
               ptr<const T>(final_norm), ptr<T>(out), float(final_eps), packed};
    run_layer(hp, L);
  };
  if (dtype == kF32) run(ptr<float>(h));
  else run(ptr<uint16_t>(h));
}

}  // namespace jr
