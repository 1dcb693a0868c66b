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
#include <type_traits>

#include "twotower_rt/cpu_common.h"

namespace twotower_rt {
namespace cpu {

constexpr int64_t kGemmVec = 16;
constexpr int64_t kAhead = 16;  // weight rows prefetched ahead in a tile

// Tiles keep their accumulators in registers: in v16 (cpu_common.h: wide_vectors; 32 registers)
// 4 rows x 4 vectors or up to 2 x 8, in v8 (16 registers) 8 of them: kNarrowVectors<TB> v8 per
// row of a TB-row tile.
template <int TB>
inline constexpr int kNarrowVectors = TB == 1 ? 8 : TB == 2 ? 4 : 2;

// Weights are stored as float, or as bfloat16 bits (uint16_t): a bfloat16 is the top half of a
// float, so widening one is exact and the arithmetic is that of the float weights, bit for bit,
// from half the bytes (a checkpoint's bf16 weights loaded as fp32 are exactly bf16 values).
template <typename V>
TWOTOWER_RT_INLINE V load_v(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof(V));
  return r;
}

// bfloat16 bits widened to L floats (the vector types spelled out: GCC takes no vector_size that
// depends on a template parameter).
template <typename V>
struct Bf16Lanes;
template <>
struct Bf16Lanes<v16> {
  typedef uint16_t half_t __attribute__((vector_size(32)));
  typedef uint32_t wide_t __attribute__((vector_size(64)));
};
template <>
struct Bf16Lanes<v8> {
  typedef uint16_t half_t __attribute__((vector_size(16)));
  typedef uint32_t wide_t __attribute__((vector_size(32)));
};

template <typename V>
TWOTOWER_RT_INLINE V load_v(const uint16_t* p) {
  typedef typename Bf16Lanes<V>::half_t half_t;
  typedef typename Bf16Lanes<V>::wide_t wide_t;
  half_t half;
  std::memcpy(&half, p, sizeof(half));
  const wide_t wide = __builtin_convertvector(half, wide_t) << 16;
  V r;
  std::memcpy(&r, &wide, sizeof(V));
  return r;
}

TWOTOWER_RT_INLINE float load1(const float* p) { return *p; }

TWOTOWER_RT_INLINE float load1(const uint16_t* p) {
  const uint32_t wide = static_cast<uint32_t>(*p) << 16;
  float r;
  std::memcpy(&r, &wide, sizeof(r));
  return r;
}


// 2 L bfloat16 weights as two vectors of L floats, the even outputs and the odd ones: loaded as
// L 32-bit words, each holds an even output's bits in its low half and the next output's in its
// high half (little-endian), so one shift and one mask widen all of them, where widening 16
// halves into 16 words (load_v) took GCC four to five instructions (two half-width widenings
// and the insert that joins them, then the shift) on the pipes the multiply-adds need
// (bench/kernels_ab.py: 16 rows x 192 x 902 on one Zen 4 core, 77 us that way, 59 this way).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "load_pair reads halves as words");

template <typename V>
TWOTOWER_RT_INLINE void load_pair(const uint16_t* p, V& even, V& odd) {
  typedef typename Bf16Lanes<V>::wide_t wide_t;  // L 32-bit words: 2 L halves
  wide_t words;
  std::memcpy(&words, p, sizeof(words));
  const wide_t lo = words << 16, hi = words & 0xffff0000u;
  std::memcpy(&even, &lo, sizeof(V));
  std::memcpy(&odd, &hi, sizeof(V));
}

// Outputs [c0, c0 + Q L) of TB rows (w's rows ldw apart), in Q vectors V of L floats. With
// bfloat16 weights and an even Q the vectors come in pairs from load_pair: vector 2p holds the
// even outputs of [c0 + 2pL, c0 + 2(p + 1)L) and vector 2p + 1 the odd ones, set up from the
// bias that way and interleaved into the outputs once, after the inputs. Each output is the same
// chain either way (only the lane that computes it differs), so the bits are the same.
template <int TB, int Q, typename W, typename V = v16>
TWOTOWER_RT_INLINE void gemm_tile(const float* const* in, const W* w, int64_t K, int64_t ldw,
                                  int64_t c0, const float* bias, float* const* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  constexpr bool kPairs = std::is_same_v<W, uint16_t> && Q % 2 == 0;
  // The output (from c0) that lane i of vector q computes.
  const auto column = [](int q, int64_t i) -> int64_t {
    return kPairs ? (q / 2) * 2 * L + 2 * i + q % 2 : q * L + i;
  };
  V acc[TB][Q];
  for (int q = 0; q < Q; ++q) {
    float init[L];
    for (int64_t i = 0; i < L; ++i) init[i] = bias != nullptr ? bias[c0 + column(q, i)] : -0.0f;
    for (int b = 0; b < TB; ++b) std::memcpy(&acc[b][q], init, sizeof(V));
  }
  // The weight rows of a tile are ldw apart: fetch the one kAhead rows ahead before it is read
  // (the hardware prefetchers follow these strided streams poorly).
  constexpr int64_t kLines = (Q * L * static_cast<int64_t>(sizeof(W)) + 63) / 64;
  for (int64_t j = 0; j < K; ++j) {
    const W* row = w + j * ldw + c0;
    if (j + kAhead < K) {
      const char* next = reinterpret_cast<const char*>(row + kAhead * ldw);
      for (int64_t l = 0; l < kLines; ++l) __builtin_prefetch(next + 64 * l);
    }
    V r[Q];
    if constexpr (kPairs) {
      for (int q = 0; q < Q; q += 2) load_pair<V>(row + q * L, r[q], r[q + 1]);
    } else {
      for (int q = 0; q < Q; ++q) r[q] = load_v<V>(row + q * L);
    }
    for (int b = 0; b < TB; ++b) {
      const V v = splat_v<V>(in[b][j]);
      for (int q = 0; q < Q; ++q) acc[b][q] = fmadd_v(v, r[q], acc[b][q]);
    }
  }
  for (int b = 0; b < TB; ++b) {
    for (int q = 0; q < Q; ++q) {
      if constexpr (kPairs) {
        float lanes[L];
        std::memcpy(lanes, &acc[b][q], sizeof(V));
        for (int64_t i = 0; i < L; ++i) out[b][c0 + column(q, i)] = lanes[i];
      } else {
        std::memcpy(out[b] + c0 + q * L, &acc[b][q], sizeof(V));
      }
    }
  }
}

// The last width < 16 outputs [c0, c0 + width) of TB rows as 16 lanes (one v16 or two v8), from
// weight rows padded to c0 + 16 (the padding's lanes are computed and dropped).
template <int TB, typename W, typename V = v16>
TWOTOWER_RT_INLINE void gemm_tile_part(const float* const* in, const W* w, int64_t K,
                                       int64_t ldw, int64_t c0, int64_t width, const float* bias,
                                       float* const* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float), Q = kGemmVec / L;
  float init[kGemmVec];
  for (int64_t k = 0; k < kGemmVec; ++k) {
    init[k] = bias != nullptr && k < width ? bias[c0 + k] : -0.0f;
  }
  V acc[TB][Q];
  for (int b = 0; b < TB; ++b) std::memcpy(&acc[b][0], init, sizeof(init));
  for (int64_t j = 0; j < K; ++j) {
    V r[Q];
    for (int q = 0; q < Q; ++q) r[q] = load_v<V>(w + j * ldw + c0 + q * L);
    for (int b = 0; b < TB; ++b) {
      const V v = splat_v<V>(in[b][j]);
      for (int q = 0; q < Q; ++q) acc[b][q] = fmadd_v(v, r[q], acc[b][q]);
    }
  }
  for (int b = 0; b < TB; ++b) std::memcpy(out[b] + c0, &acc[b][0], width * sizeof(float));
}

// Outputs [c0, N) of TB rows in vectors V: the widest tiles first, then 16 at a time, then the
// last N % 16 as 16 lanes where w's rows are padded to a multiple of 16 (ldw), else one output at
// a time.
template <int TB, typename W, typename V>
TWOTOWER_RT_INLINE void gemm_cols_v(const float* const* in, const W* w, int64_t K, int64_t N,
                                    int64_t ldw, int64_t c0, const float* bias,
                                    float* const* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float), V16 = kGemmVec / L;
  int64_t c = c0;
  if constexpr (L == kGemmVec) {  // v16: 8 vectors only for up to 2 rows (registers)
    if constexpr (TB <= 2) {
      for (; c + 8 * L <= N; c += 8 * L) gemm_tile<TB, 8, W, V>(in, w, K, ldw, c, bias, out);
    }
    for (; c + 4 * L <= N; c += 4 * L) gemm_tile<TB, 4, W, V>(in, w, K, ldw, c, bias, out);
  } else {
    constexpr int Q = kNarrowVectors<TB>;
    for (; c + Q * L <= N; c += Q * L) gemm_tile<TB, Q, W, V>(in, w, K, ldw, c, bias, out);
  }
  for (; c + kGemmVec <= N; c += kGemmVec) {
    gemm_tile<TB, V16, W, V>(in, w, K, ldw, c, bias, out);
  }
  if (c == N) return;
  if (c + kGemmVec <= ldw) {
    gemm_tile_part<TB, W, V>(in, w, K, ldw, c, N - c, bias, out);
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

// Outputs [c0, N) of TB rows, in the vectors of this CPU's clone (wide_vectors).
template <int TB, typename W>
TWOTOWER_RT_INLINE void gemm_cols(const float* const* in, const W* w, int64_t K, int64_t N,
                                  int64_t ldw, int64_t c0, const float* bias, float* const* out) {
  if (wide_vectors()) {
    gemm_cols_v<TB, W, v16>(in, w, K, N, ldw, c0, bias, out);
  } else {
    gemm_cols_v<TB, W, v8>(in, w, K, N, ldw, c0, bias, out);
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
