// The projections of the CPU kernels (csrc/cpu/*.cpp): rows of out = init + in . w, w K-major
// (in, out; its rows ldw >= out apart), for the few rows of a step.
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

// Outputs [c0, c0 + 16 Q) of TB rows (w's rows ldw apart).
template <int TB, int Q>
TWOTOWER_RT_INLINE void gemm_tile(const float* const* in, const float* w, int64_t K, int64_t ldw,
                                  int64_t c0, const float* bias, float* const* out) {
  v16 acc[TB][Q];
  for (int q = 0; q < Q; ++q) {
    v16 init = v16{} - 0.0f;
    if (bias != nullptr) std::memcpy(&init, bias + c0 + q * kGemmVec, sizeof(v16));
    for (int b = 0; b < TB; ++b) acc[b][q] = init;
  }
  for (int64_t j = 0; j < K; ++j) {
    const float* row = w + j * ldw + c0;
    v16 r[Q];
    for (int q = 0; q < Q; ++q) std::memcpy(&r[q], row + q * kGemmVec, sizeof(v16));
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
template <int TB>
TWOTOWER_RT_INLINE void gemm_tile_part(const float* const* in, const float* w, int64_t K,
                                       int64_t ldw, int64_t c0, int64_t width, const float* bias,
                                       float* const* out) {
  float init[kGemmVec];
  for (int64_t k = 0; k < kGemmVec; ++k) init[k] = bias != nullptr && k < width ? bias[c0 + k] : -0.0f;
  v16 acc[TB];
  for (int b = 0; b < TB; ++b) std::memcpy(&acc[b], init, sizeof(v16));
  for (int64_t j = 0; j < K; ++j) {
    v16 r;
    std::memcpy(&r, w + j * ldw + c0, sizeof(v16));
    for (int b = 0; b < TB; ++b) acc[b] = fmadd16(splat16(in[b][j]), r, acc[b]);
  }
  for (int b = 0; b < TB; ++b) std::memcpy(out[b] + c0, &acc[b], width * sizeof(float));
}

// Outputs [c0, N) of TB rows, widest tiles first (8 vectors only for up to 2 rows: more would
// not fit the registers), then the last N % 16 as one vector where w's rows are padded to a
// multiple of 16 (ldw), else one output at a time.
template <int TB>
TWOTOWER_RT_INLINE void gemm_cols(const float* const* in, const float* w, int64_t K, int64_t N,
                                  int64_t ldw, int64_t c0, const float* bias, float* const* out) {
  constexpr int64_t V = kGemmVec;
  int64_t c = c0;
  if constexpr (TB <= 2) {
    for (; c + 8 * V <= N; c += 8 * V) gemm_tile<TB, 8>(in, w, K, ldw, c, bias, out);
  }
  for (; c + 4 * V <= N; c += 4 * V) gemm_tile<TB, 4>(in, w, K, ldw, c, bias, out);
  for (; c + V <= N; c += V) gemm_tile<TB, 1>(in, w, K, ldw, c, bias, out);
  if (c == N) return;
  if (c + V <= ldw) {
    gemm_tile_part<TB>(in, w, K, ldw, c, N - c, bias, out);
    return;
  }
  for (int b = 0; b < TB; ++b) {
    float* o = out[b];
    for (int64_t k = c; k < N; ++k) o[k] = bias != nullptr ? bias[k] : -0.0f;
    for (int64_t j = 0; j < K; ++j) {
      const float v = in[b][j];
      const float* row = w + j * ldw;
#pragma omp simd
      for (int64_t k = c; k < N; ++k) o[k] = fmadd(v, row[k], o[k]);
    }
  }
}

// Every output of TB rows.
template <int TB>
TWOTOWER_RT_INLINE void gemm_rows(const float* const* in, const float* w, int64_t K, int64_t N,
                                  int64_t ldw, const float* bias, float* const* out) {
  gemm_cols<TB>(in, w, K, N, ldw, 0, bias, out);
}

}  // namespace cpu
}  // namespace twotower_rt
