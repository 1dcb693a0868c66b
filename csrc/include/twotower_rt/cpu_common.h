// What the CPU kernels (csrc/cpu/*.cpp) share: the instruction-set clones and a vectorisable exp.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

// On x86-64 GCC/clang each marked function is built for x86-64-v4 (AVX-512 F/BW/CD/DQ/VL on top
// of v3), x86-64-v3 (AVX2 + FMA) and the baseline, chosen at load time. Not "avx512f" alone: that
// target has neither FMA3 nor AVX512VL, so an 8-float FMA in it compiled to 8 scalar FMAs through
// memory (forced 8-float vectors ran 20-50x slower on a Zen 4). The kernels are built with
// -ffp-contract=off: the compiler fuses nothing, and a fused multiply-add happens only where the
// code asks for one (fmadd, fmadd_v), which every clone rounds once (the baseline through libm's
// fmaf, slow but exact). So every clone rounds the same operations in the same order: the same
// bits on every x86-64 machine. TWOTOWER_RT_NO_CLONES builds one version, for the compiler's
// target (tests/test_cpu_clones.py builds the baseline and x86-64-v3 ones and compares their bits
// with the clones').
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(TWOTOWER_RT_NO_CLONES)
#define TWOTOWER_RT_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TWOTOWER_RT_CLONES
#endif

// Inlined into each clone, so it compiles for the clone's instruction set.
#define TWOTOWER_RT_INLINE inline __attribute__((always_inline))

namespace twotower_rt {
namespace cpu {

// a * b + c rounded once.
TWOTOWER_RT_INLINE float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

// 16 floats and 8 floats as GCC/clang vectors: element-wise operators, kept in registers. A v16
// is one AVX-512 register; on AVX2 GCC lowers it through the stack (a broadcast as 16 scalar
// stores: the projections ran at ~2.5 GFLOP/s a core on a Zen 3, 10-25x slower than MKL), where a
// v8 is one register. The kernels compute in the width wide_vectors() picks.
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

// fmadd lane by lane: a loop the clones vectorise into their FMA instruction.
template <typename V>
TWOTOWER_RT_INLINE V fmadd_v(V a, V b, V c) {
  constexpr int L = sizeof(V) / sizeof(float);
  float fa[L], fb[L], fc[L];
  std::memcpy(fa, &a, sizeof(a));
  std::memcpy(fb, &b, sizeof(b));
  std::memcpy(fc, &c, sizeof(c));
#pragma omp simd
  for (int i = 0; i < L; ++i) fc[i] = __builtin_fmaf(fa[i], fb[i], fc[i]);
  std::memcpy(&c, fc, sizeof(c));
  return c;
}

// x in every lane, as x + 0 (a -0.0 comes out +0.0): GCC makes it a scalar add and one
// broadcast, where the forms without the add (an initializer list, a lane loop, a shuffle)
// compiled to chains of masked merges, 3-4x slower in the attention kernel.
template <typename V>
TWOTOWER_RT_INLINE V splat_v(float x) {
  return V{} + x;
}

// Whether the kernels compute in v16 (AVX-512: 32 registers of 16 floats) or in v8 (AVX2 and
// the rest: see the vector types above). Every lane computes the same chain of
// operations whichever the width, so both give the same bits (tests/test_cpu_clones.py runs both
// on any CPU: set_wide_vectors). On x86-64 the clone that runs is the x86-64-v4 one exactly when
// the CPU is x86-64-v4, which is what this asks by default.
inline std::atomic<int>& wide_vectors_forced() {  // -1: as the CPU says; 0 or 1: forced
  static std::atomic<int> forced{-1};
  return forced;
}

TWOTOWER_RT_INLINE bool wide_vectors() {
  const int forced = wide_vectors_forced().load(std::memory_order_relaxed);
  if (forced >= 0) return forced != 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool wide = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") != 0;
  }();
  return wide;
#else
  return false;
#endif
}

// lane[0] + ... + lane[L - 1] folded in halves (lane j + lane j + L / 2, then again): one order on
// every instruction set. L a power of two; lane is overwritten.
template <int L>
TWOTOWER_RT_INLINE float fold_lanes(float* lane) {
  static_assert(L > 0 && (L & (L - 1)) == 0, "L must be a power of two");
  for (int width = L / 2; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) lane[j] = lane[j] + lane[j + width];
  }
  return lane[0];
}

// The max of x[0, n) (-inf for n = 0): 16 lanes side by side, then across them (exact in any
// order, so vectorised).
TWOTOWER_RT_INLINE float max_of(const float* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lane[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] = std::max(lane[j], x[i + j]);
  }
  for (int64_t j = 0; i < n; ++i, ++j) lane[j] = std::max(lane[j], x[i]);
  float m = lane[0];
  for (int64_t j = 1; j < kLanes; ++j) m = std::max(m, lane[j]);
  return m;
}

// exp(x): Cody-Waite range reduction to r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial, 2^k
// by building the exponent bits; within ~2 ulp of expf for x in [-87, 88] (the argument is
// clamped there: below, the result is ~1e-38, 0 for the sums that use it). Written so that a
// loop over it vectorises.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // k = round(x / ln2) by the 1.5 * 2^23 trick (|x / ln2| < 2^22): no branch, so loops vectorise.
  const float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const int32_t ki = static_cast<int32_t>(kf);
  float r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e = poly * (r * r) + r + 1.0f;
  const int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

}  // namespace cpu
}  // namespace twotower_rt
