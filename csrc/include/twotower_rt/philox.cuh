// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123),
// and the Gumbel draw the samplers build from it. Counter-based: a draw is a pure function of
// (key, counter), so a kernel needs no RNG state, any thread can draw any element, and a CUDA graph
// replays fresh noise when the caller bumps the counter words it reads from device memory.
//
// The twotower_rt convention (python/twotower_rt/ops/philox.py implements the same in torch
// integer ops; tests/test_mask_sampling.py checks both against Random123's known-answer vectors):
//   key     = (seed & 0xffffffff, seed >> 32)                       per sequence
//   counter = (vocab index / 4, position, offset & 0xffffffff, offset >> 32)
//   vocab element v uses word v % 4 of the result;
//   u = ((word >> 9) * 2 + 1) * 2^-24, exactly representable, in (0, 1);   g = -log(-log(u)).
// No batch-row index enters: a sequence draws the same noise whatever batch it sits in.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace twotower_rt {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

// The largest Gumbel draw u can produce: u <= 1 - 2^-24 gives -log(-log(u)) < 16.64. Samplers skip
// the RNG for a vector whose best possible score x/T + kGumbelMax cannot beat the running best.
constexpr float kGumbelMax = 17.f;

__device__ __forceinline__ uint4 Philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.x += kPhiloxW0;
      key.y += kPhiloxW1;
    }
    const uint32_t lo0 = kPhiloxM0 * ctr.x;
    const uint32_t hi0 = __umulhi(kPhiloxM0, ctr.x);
    const uint32_t lo1 = kPhiloxM1 * ctr.z;
    const uint32_t hi1 = __umulhi(kPhiloxM1, ctr.z);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
  }
  return ctr;
}

__device__ __forceinline__ uint2 PhiloxKey(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return make_uint2(static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// Counter of vocabulary quad `quad` (elements 4*quad .. 4*quad+3) at block position `position`.
__device__ __forceinline__ uint4 PhiloxCounter(uint32_t quad, uint32_t position, int64_t offset) {
  const uint64_t o = static_cast<uint64_t>(offset);
  return make_uint4(quad, position, static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32));
}

// Standard Gumbel from 23 random bits. logf, not __logf: the CPU reference must land on the same
// value up to an ulp (u itself is bit-identical), and __logf's absolute error near u = 1 is
// larger than -log(u) there.
__device__ __forceinline__ float GumbelFromBits(uint32_t bits) {
  const float u = __uint2float_rn((bits >> 9) * 2u + 1u) * 0x1p-24f;
  return -logf(-logf(u));
}

__device__ __forceinline__ uint32_t Word(const uint4& r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

}  // namespace twotower_rt
