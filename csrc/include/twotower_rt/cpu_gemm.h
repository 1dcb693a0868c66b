// The projections of the CPU kernels (csrc/cpu/*.cpp): rows of out = init + in . w, w K-major
// (in, out; its rows ldw >= out apart; float or bfloat16), for the few rows of a step.
//
// Every output is one chain of fused multiply-adds over the inputs in order:
//
//   acc = init[c];  for j in 0 .. K - 1:  acc = fmadd(in[j], w[j, c], acc)
//
// with init the bias, or -0.0 without one (so the first step is the plain product x[0] * w[0, c],
// rounded once). Tiles of TB rows x Q vectors of 16 outputs keep their accumulators in registers
// across the inputs and load each weight row once for the TB rows; tiles of every shape, and the
// one-at-a-time tail, compute each output in that same order, so a row's result never depends on
// the rows that share its call or on how they are tiled, and every instruction-set clone rounds
// the same operations (cpu_common.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "twotower_rt/cpu_common.h"

namespace twotower_rt {
namespace cpu {

constexpr int64_t kGemmVec = 16;
constexpr int64_t kAhead = 16;  // weight rows prefetched ahead in a tile

// Weights are stored as float, or as bfloat16 bits (uint16_t): a bfloat16 is the top half of a
// float, so widening one is exact and the arithmetic is that of the float weights, bit for bit,
// from half the bytes (a checkpoint's bf16 weights loaded as fp32 are exactly bf16 values).
TWOTOWER_RT_INLINE v16 load16(const float* p) {
  v16 r;
  std::memcpy(&r, p, sizeof(v16));
  return r;
}

TWOTOWER_RT_INLINE v16 load16(const uint16_t* p) {
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u16x16 half;
  std::memcpy(&half, p, sizeof(half));
  const u32x16 wide = __builtin_convertvector(half, u32x16) << 16;
  v16 r;
  std::memcpy(&r, &wide, sizeof(v16));
  return r;
}

TWOTOWER_RT_INLINE float load1(const float* p) { return *p; }

TWOTOWER_RT_INLINE float load1(const uint16_t* p) {
  const uint32_t wide = static_cast<uint32_t>(*p) << 16;
  float r;
  std::memcpy(&r, &wide, sizeof(r));
  return r;
}


// Outputs [c0, c0 + 16 Q) of TB rows (w's rows ldw apart).
template <int TB, int Q, typename W>
TWOTOWER_RT_INLINE void gemm_tile(const float* const* in, const W* w, int64_t K, int64_t ldw,
                                  int64_t c0, const float* bias, float* const* out) {
  v16 acc[TB][Q];
  for (int q = 0; q < Q; ++q) {
    v16 init = v16{} - 0.0f;
    if (bias != nullptr) std::memcpy(&init, bias + c0 + q * kGemmVec, sizeof(v16));
    for (int b = 0; b < TB; ++b) acc[b][q] = init;
  }
  // The weight rows of a tile are ldw apart: fetch the one kAhead rows ahead before it is read
  // (the hardware prefetchers follow these strided streams poorly).
  constexpr int64_t kLines = (Q * kGemmVec * static_cast<int64_t>(sizeof(W)) + 63) / 64;
  for (int64_t j = 0; j < K; ++j) {
    const W* row = w + j * ldw + c0;
    if (j + kAhead < K) {
      const char* next = reinterpret_cast<const char*>(row + kAhead * ldw);
      for (int64_t l = 0; l < kLines; ++l) __builtin_prefetch(next + 64 * l);
    }
    v16 r[Q];
    for (int q = 0; q < Q; ++q) r[q] = load16(row + q * kGemmVec);
    for (int b = 0; b < TB; ++b) {
      const v16 v = splat16(in[b][j]);
      for (int q = 0; q < Q; ++q) acc[b][q] = fmadd16(v, r[q], acc[b][q]);
    }
  }
  for (int b = 0; b < TB; ++b) {
    for (int q = 0; q < Q; ++q) {
      std::memcpy(out[b] + c0 + q * kGemmVec, &acc[b][q], sizeof(v16));
    }
  }
}

// The last width < 16 outputs [c0, c0 + width) of TB rows as one vector, from weight rows padded
// to c0 + 16 (the padding's lanes are computed and dropped).
template <int TB, typename W>
TWOTOWER_RT_INLINE void gemm_tile_part(const float* const* in, const W* w, int64_t K,
                                       int64_t ldw, int64_t c0, int64_t width, const float* bias,
                                       float* const* out) {
  float init[kGemmVec];
  for (int64_t k = 0; k < kGemmVec; ++k) {
    init[k] = bias != nullptr && k < width ? bias[c0 + k] : -0.0f;
  }
  v16 acc[TB];
  for (int b = 0; b < TB; ++b) std::memcpy(&acc[b], init, sizeof(v16));
  for (int64_t j = 0; j < K; ++j) {
    const v16 r = load16(w + j * ldw + c0);
    for (int b = 0; b < TB; ++b) acc[b] = fmadd16(splat16(in[b][j]), r, acc[b]);
  }
  for (int b = 0; b < TB; ++b) std::memcpy(out[b] + c0, &acc[b], width * sizeof(float));
}

// Outputs [c0, N) of TB rows, widest tiles first (8 vectors only for up to 2 rows: more would
// not fit the registers), then the last N % 16 as one vector where w's rows are padded to a
// multiple of 16 (ldw), else one output at a time.
template <int TB, typename W>
TWOTOWER_RT_INLINE void gemm_cols(const float* const* in, const W* w, int64_t K, int64_t N,
                                  int64_t ldw, int64_t c0, const float* bias, float* const* out) {
  constexpr int64_t V = kGemmVec;
  int64_t c = c0;
  if constexpr (TB <= 2) {
    for (; c + 8 * V <= N; c += 8 * V) gemm_tile<TB, 8, W>(in, w, K, ldw, c, bias, out);
  }
  for (; c + 4 * V <= N; c += 4 * V) gemm_tile<TB, 4, W>(in, w, K, ldw, c, bias, out);
  for (; c + V <= N; c += V) gemm_tile<TB, 1, W>(in, w, K, ldw, c, bias, out);
  if (c == N) return;
  if (c + V <= ldw) {
    gemm_tile_part<TB, W>(in, w, K, ldw, c, N - c, bias, out);
    return;
  }
  for (int b = 0; b < TB; ++b) {
    float* o = out[b];
    for (int64_t k = c; k < N; ++k) o[k] = bias != nullptr ? bias[k] : -0.0f;
    for (int64_t j = 0; j < K; ++j) {
      const float v = in[b][j];
      const W* row = w + j * ldw;
#pragma omp simd
      for (int64_t k = c; k < N; ++k) o[k] = fmadd(v, load1(row + k), o[k]);
    }
  }
}

// Every output of TB rows.
template <int TB, typename W>
TWOTOWER_RT_INLINE void gemm_rows(const float* const* in, const W* w, int64_t K, int64_t N,
                                  int64_t ldw, const float* bias, float* const* out) {
  gemm_cols<TB, W>(in, w, K, N, ldw, 0, bias, out);
}

}  // namespace cpu
}  // namespace twotower_rt
