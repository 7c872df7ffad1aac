// Shared helpers for the janus_rt CPU kernels: argument guards and bf16 <-> fp32 conversion.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace jr {

// Element types the kernels accept; the Python accessor passes these codes.
enum DType : int { kF32 = 0, kBF16 = 1 };
// The packed ops' weight code for int8 weights with a fp32 scale per output row and bf16 x (int8_gemv.h).
constexpr int kInt8W = 2;
// The KV cache code for int8 elements with one fp32 scale per (token, head) beside them (kv_int8.h).
constexpr int kInt8KV = 3;
// The packed ops' weight code for W8A8: kInt8W's weights (offset by 128) with x quantized to int8 per row and group
// of 512 columns (w8a8_gemv.h, AVX512-VNNI).
constexpr int kW8A8 = 4;

// pybind11 turns std::invalid_argument into ValueError, so a bad size from Python reads like the accessor's own checks.
#define JR_CHECK(cond, msg)                                                        \
  do {                                                                             \
    if (!(cond)) throw std::invalid_argument(std::string(__func__) + ": " + (msg)); \
  } while (0)

// bf16 is the top half of an fp32: widening is a shift.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline float to_float(int8_t x) { return float(x); }

inline void from_float(float x, float* dst) { *dst = x; }
inline void from_float(float x, uint16_t* dst) { *dst = float_to_bf16(x); }

// The value a T tensor would hold (T = float or uint16_t for bf16): where the torch path rounds to the model dtype.
template <typename T>
inline float rnd(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return bf16_to_float(float_to_bf16(x));
}

template <typename T>
inline T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace jr
