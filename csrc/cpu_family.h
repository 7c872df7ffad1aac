// Which x86 CPU this is, for the few kernel tunings that differ between hosts measured (bench/RESULTS.md):
// amd_family() is AMD's CPUID family (0x19 Zen 3 / Zen 4, 0x1A Zen 5), 0 on other vendors and non-x86 builds;
// intel() whether the vendor is Intel.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <cstring>

namespace jr::cpu {

// Whether CPUID's vendor string is `name` (12 characters); false on non-x86 builds.
inline bool vendor_is(const char* name) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[12];
  std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
  return std::memcmp(vendor, name, 12) == 0;
#else
  (void)name;
  return false;
#endif
}

inline int amd_family() {
  static const int family = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (!vendor_is("AuthenticAMD") || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int base = int(a >> 8) & 0xf;  // base family 0xf: the extended family adds to it
    return base == 0xf ? base + (int(a >> 20) & 0xff) : base;
#else
    return 0;
#endif
  }();
  return family;
}

// Whether this is an Intel CPU (vendor GenuineIntel), for a rule measured on the AMX Xeon of bench/RESULTS.md only.
inline bool intel() {
  static const bool i = vendor_is("GenuineIntel");
  return i;
}

// Whether the kernels take the rules measured on Zen 5 (AMD family 0x1A) rather than their default (Zen 4's); later
// AMD families too.
inline bool zen5_or_later() { return amd_family() >= 0x1A; }

// Zen 4: AMD family 0x19 with AVX-512 (Zen 3, the same family, has none), for a rule measured there only. AVX-512
// as the OS grants it: CPUID's AVX512F bit, and XCR0's SSE, AVX and the three AVX-512 state bits (0xE6) set.
inline bool zen4() {
  static const bool z = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (amd_family() != 0x19 || !__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    unsigned xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    return (xcr0_lo & 0xE6) == 0xE6 && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 16) & 1);
#else
    return false;
#endif
  }();
  return z;
}

}  // namespace jr::cpu
