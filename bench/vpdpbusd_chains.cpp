// VPDPBUSD throughput against the number of independent accumulator chains, written with the intrinsic and with
// the accumulate as inline asm tied in place (csrc/w8a8_gemv.h's dpbusd4): one core, registers only, no loads.
//   g++ -O2 -march=native bench/vpdpbusd_chains.cpp -o /tmp/chains && /tmp/chains
// 2-core Zen 5 VM, 2026-12-06: see bench/RESULTS.md (twenty-seventh session). Needs AVX512-VNNI. The accumulators
// are named variables (as arrays GCC kept them in memory, which measures something else).
#include <immintrin.h>

#include <chrono>
#include <cstdio>

#define STEP(i, w)                                                                                               \
  if constexpr (C > i) {                                                                                       \
    if constexpr (ASM)                                                                                           \
      asm("{vpdpbusd %[x], %[u], %[a]|vpdpbusd %[a], %[u], %[x]}" : [a] "+v"(a##i) : [u] "v"(w), [x] "v"(x)); \
    else                                                                                                         \
      a##i = _mm512_dpbusd_epi32(a##i, w, x);                                                                    \
  }

template <int C, bool ASM>
__attribute__((noinline)) double rate(long iters) {
  __m512i a0 = _mm512_set1_epi32(1), a1 = _mm512_set1_epi32(2), a2 = _mm512_set1_epi32(3), a3 = _mm512_set1_epi32(4), a4 = _mm512_set1_epi32(5), a5 = _mm512_set1_epi32(6), a6 = _mm512_set1_epi32(7), a7 = _mm512_set1_epi32(8), a8 = _mm512_set1_epi32(9), a9 = _mm512_set1_epi32(10), a10 = _mm512_set1_epi32(11), a11 = _mm512_set1_epi32(12);
  __m512i a12 = _mm512_set1_epi32(13), a13 = _mm512_set1_epi32(14), a14 = _mm512_set1_epi32(15), a15 = _mm512_set1_epi32(16), a16 = _mm512_set1_epi32(17), a17 = _mm512_set1_epi32(18), a18 = _mm512_set1_epi32(19), a19 = _mm512_set1_epi32(20), a20 = _mm512_set1_epi32(21), a21 = _mm512_set1_epi32(22), a22 = _mm512_set1_epi32(23), a23 = _mm512_set1_epi32(24);
  __m512i w0 = _mm512_set1_epi32(1), w1 = _mm512_set1_epi32(2), w2 = _mm512_set1_epi32(3), w3 = _mm512_set1_epi32(4);
  __m512i x = _mm512_set1_epi32(0x01010101);
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
    STEP(0, w0)
    STEP(1, w1)
    STEP(2, w2)
    STEP(3, w3)
    STEP(4, w0)
    STEP(5, w1)
    STEP(6, w2)
    STEP(7, w3)
    STEP(8, w0)
    STEP(9, w1)
    STEP(10, w2)
    STEP(11, w3)
    STEP(12, w0)
    STEP(13, w1)
    STEP(14, w2)
    STEP(15, w3)
    STEP(16, w0)
    STEP(17, w1)
    STEP(18, w2)
    STEP(19, w3)
    STEP(20, w0)
    STEP(21, w1)
    STEP(22, w2)
    STEP(23, w3)
    asm volatile("" : "+v"(x), "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m512i sum = a0;
  if constexpr (C > 1) sum = _mm512_add_epi32(sum, a1);
  if constexpr (C > 2) sum = _mm512_add_epi32(sum, a2);
  if constexpr (C > 3) sum = _mm512_add_epi32(sum, a3);
  if constexpr (C > 4) sum = _mm512_add_epi32(sum, a4);
  if constexpr (C > 5) sum = _mm512_add_epi32(sum, a5);
  if constexpr (C > 6) sum = _mm512_add_epi32(sum, a6);
  if constexpr (C > 7) sum = _mm512_add_epi32(sum, a7);
  if constexpr (C > 8) sum = _mm512_add_epi32(sum, a8);
  if constexpr (C > 9) sum = _mm512_add_epi32(sum, a9);
  if constexpr (C > 10) sum = _mm512_add_epi32(sum, a10);
  if constexpr (C > 11) sum = _mm512_add_epi32(sum, a11);
  if constexpr (C > 12) sum = _mm512_add_epi32(sum, a12);
  if constexpr (C > 13) sum = _mm512_add_epi32(sum, a13);
  if constexpr (C > 14) sum = _mm512_add_epi32(sum, a14);
  if constexpr (C > 15) sum = _mm512_add_epi32(sum, a15);
  if constexpr (C > 16) sum = _mm512_add_epi32(sum, a16);
  if constexpr (C > 17) sum = _mm512_add_epi32(sum, a17);
  if constexpr (C > 18) sum = _mm512_add_epi32(sum, a18);
  if constexpr (C > 19) sum = _mm512_add_epi32(sum, a19);
  if constexpr (C > 20) sum = _mm512_add_epi32(sum, a20);
  if constexpr (C > 21) sum = _mm512_add_epi32(sum, a21);
  if constexpr (C > 22) sum = _mm512_add_epi32(sum, a22);
  if constexpr (C > 23) sum = _mm512_add_epi32(sum, a23);
  volatile int sink = _mm512_reduce_add_epi32(sum);
  (void)sink;
  return double(C) * iters / s / 1e9;
}

int main() {
  const long n = 50000000;
  std::printf("chains  intrinsic G/s  asm G/s\n");
  std::printf("%6d  %13.2f  %7.2f\n", 8, rate<8, false>(n), rate<8, true>(n));
  std::printf("%6d  %13.2f  %7.2f\n", 12, rate<12, false>(n), rate<12, true>(n));
  std::printf("%6d  %13.2f  %7.2f\n", 16, rate<16, false>(n), rate<16, true>(n));
  std::printf("%6d  %13.2f  %7.2f\n", 20, rate<20, false>(n), rate<20, true>(n));
  std::printf("%6d  %13.2f  %7.2f\n", 24, rate<24, false>(n), rate<24, true>(n));
}
