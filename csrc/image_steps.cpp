// The multi-step decode of a batch of image rows (cpu_step.ImageStep.steps) as one call: k decode steps of
//   each image's last token -> gen_embed row -> gen aligner (mlp_gelu) -> its cond and uncond rows -> rotary rows of
//   each row's position -> the decoder layers (decode_layer; the last one with the final norm) -> gen head
//   (mlp_gelu, logits rounded to the model dtype) -> CFG + sampling (cfg_sample)
// with each step's sampled tokens the next step's inputs. The same calls on the same values as ImageStep's Python
// loop over the ops (so the same tokens), without a return to the interpreter between them: at the small benchmark
// shape the ~15 wrapper calls per step, each from cold caches after the step's weight stream, took ~0.1-0.2 ms of a
// ~6 ms step (bench/RESULTS.md).
//   plan int64 [kPlanLen] (below): the batch's sizes, buffers and weights as integers, built once per batch by
//   cpu_step.ImageStep; layers int64 [L, layer_stride]: each layer's in_norm, qkv, o, post_norm, gate_up, down,
//   k_cache, v_cache, and with layer_stride 10 an int8 cache's k_scale, v_scale (cpu_step.DecodeStack; 8, the default,
//   is the table older builds read). Per call: tokens int64 [n] (the first step's inputs); positions int64 [k, R];
//   lens int32 [k, R] (positions + 1); slots int64 [k, R]; block_tables int32 [R, max_blocks] covering every step's slots;
//   seeds int64 [k, n] -> out int64 [k, n], step j's sampled tokens.
#include <cstdint>

#include "common.h"
#include "ops.h"

namespace jr {

// The plan's entries; cpu_step.ImageStep.PLAN lists the same names in the same order (tests check the count).
enum Plan : int {
  kDtype, kPacked, kRows, kImages, kHidden, kHeads, kInter, kHeadDim, kNumBlocks, kBlockSize,
  kGenEmbed, kGenEmbedRows, kGenEmbedDim,                                   // gen_embed [V_img, E]
  kAlignW1, kAlignB1, kAlignW2, kAlignB2, kAlignHidden,                     // aligner E -> hidden -> C
  kHeadW1, kHeadB1, kHeadW2, kHeadB2, kHeadHidden, kVocab,                  // gen head C -> hidden -> V
  kCos, kSin, kRopePositions, kFinalNorm,                                   // rotary tables [P, D]; final norm [C]
  kBufX, kBufEmb, kBufH, kBufOut, kBufCos, kBufSin, kBufLogits,             // the batch's buffers
  kEmbedRows, kCondRows, kUncondRows,                                       // row maps (int64)
  kCfgWeight, kTemperature, kTopK, kTopP, kGreedy,                          // sampling parameters [n]
  kAdaptors,                                                                // the adaptors' weights (mlp_gelu's packed)
  kPlanLen
};

int64_t image_steps_plan_len() { return kPlanLen; }

void image_steps(std::uintptr_t plan, std::uintptr_t layers, int64_t L, int64_t k, std::uintptr_t tokens,
                 std::uintptr_t positions, std::uintptr_t lens, std::uintptr_t slots, std::uintptr_t block_tables,
                 int64_t max_blocks, std::uintptr_t seeds, std::uintptr_t out, double eps, double final_eps,
                 double sm_scale, int64_t layer_stride) {
  JR_CHECK(plan && layers && tokens && positions && lens && slots && block_tables && seeds && out, "null pointer");
  JR_CHECK(L >= 1 && k >= 1 && max_blocks >= 1, "need L, k, max_blocks >= 1");
  JR_CHECK(layer_stride == 8 || layer_stride == 10, "layer_stride must be 8, or 10 with an int8 cache's scales");
  const int64_t* p = ptr<const int64_t>(plan);
  const int64_t* lay = ptr<const int64_t>(layers);
  const int dt = int(p[kDtype]);
  const int packed = int(p[kPacked]);  // the layers' weights (decode_layer's packed: 0, 1, 2 int8, 4 W8A8)
  const int adaptors = int(p[kAdaptors]);  // the gen aligner's and gen head's (0, 1, or the layers' int8 kind)
  const int64_t R = p[kRows], n = p[kImages], C = p[kHidden], D = p[kHeadDim], V = p[kVocab];
  auto u = [&](Plan i) { return std::uintptr_t(p[i]); };
  for (int64_t j = 0; j < k; ++j) {
    const std::uintptr_t tok = j == 0 ? tokens : out + 8 * n * (j - 1);  // step j - 1's samples
    gather_rows(u(kGenEmbed), dt, tok, u(kBufX), dt, n, p[kGenEmbedDim], p[kGenEmbedRows]);
    mlp_gelu(u(kBufX), u(kAlignW1), u(kAlignB1), u(kAlignW2), u(kAlignB2), u(kBufEmb), dt, n, p[kGenEmbedDim],
             p[kAlignHidden], C, adaptors, true);
    gather_rows(u(kBufEmb), kF32, u(kEmbedRows), u(kBufH), dt, R, C, n);
    gather_rows(u(kCos), kF32, positions + 8 * R * j, u(kBufCos), kF32, R, D, p[kRopePositions]);
    gather_rows(u(kSin), kF32, positions + 8 * R * j, u(kBufSin), kF32, R, D, p[kRopePositions]);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* w = lay + layer_stride * l;
      const std::uintptr_t ks = layer_stride == 10 ? std::uintptr_t(w[8]) : 0;
      const std::uintptr_t vs = layer_stride == 10 ? std::uintptr_t(w[9]) : 0;
      const bool last = l == L - 1;  // the final norm into the out buffer
      decode_layer(u(kBufH), dt, std::uintptr_t(w[0]), std::uintptr_t(w[1]), std::uintptr_t(w[2]),
                   std::uintptr_t(w[3]), std::uintptr_t(w[4]), std::uintptr_t(w[5]), std::uintptr_t(w[6]),
                   std::uintptr_t(w[7]), slots + 8 * R * j, block_tables, lens + 4 * R * j, u(kBufCos), u(kBufSin), R,
                   C, p[kHeads], p[kInter], p[kNumBlocks], p[kBlockSize], max_blocks, eps, sm_scale,
                   last ? u(kFinalNorm) : 0, last ? u(kBufOut) : 0, final_eps, packed, ks, vs);
    }
    mlp_gelu(u(kBufOut), u(kHeadW1), u(kHeadB1), u(kHeadW2), u(kHeadB2), u(kBufLogits), dt, R, C, p[kHeadHidden], V,
             adaptors, true);
    cfg_sample(u(kBufLogits), u(kBufLogits), u(kCfgWeight), u(kTemperature), u(kTopK), u(kTopP), seeds + 8 * n * j,
               u(kGreedy), out + 8 * n * j, n, V, V, V, u(kCondRows), u(kUncondRows), R);
  }
}

}  // namespace jr
