// Projections by bfloat16 dot products (AVX512_BF16's VDPBF16PS), for linear_dot_cpu.h and the
// MoE kernel's experts: rows of out = init + in . w with the inputs as bfloat16 pairs and w in
// pair layout, (ceil(K / 2), ldw) 32-bit words, word [j, c] = w[2j, c] | w[2j + 1, c] << 16 (the
// bfloat16 bits).
//
// Every output is one chain over the pairs in order (linear_dot_cpu.h has the numbers):
//
//   acc = init[c];  for j:  acc = fma(x[2j+1], w[2j+1, c], acc);  acc = fma(x[2j], w[2j, c], acc)
//
// which is what one VDPBF16PS lane does on a Zen 4 (bit for bit; subnormals flushed). Tiles of TB
// rows x Q vectors of 16 outputs, then 16 at a time, the last vector's extra lanes computed from
// the padding of w's rows and not stored: a row's result never depends on the other rows.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TWOTOWER_RT_HAS_DOT 1
// The instruction sets of every function that runs the dot products (a caller inlines them).
#define TWOTOWER_RT_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace twotower_rt {
namespace cpu {

// Whether this CPU has AVX512_BF16 with AVX-512 F/BW/VL.
inline bool dot_supported() {
#ifdef TWOTOWER_RT_HAS_DOT
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef TWOTOWER_RT_HAS_DOT
constexpr int64_t kDotLanes = 16;

// x[0, K) as ceil(K / 2) bfloat16 pairs, i.e. the inputs as bfloat16 in order (an odd last one
// paired with a zero), by VCVTNE2PS2BF16, 32 at a time: to nearest with ties to even as torch's
// .bfloat16(), NaN kept a NaN, a subnormal input made a zero of its sign (on a Zen 4, checked on
// 6.4 M random inputs), which the dot products would read as zero anyway.
TWOTOWER_RT_DOT_TARGET inline __attribute__((always_inline)) void bf16_pairs(const float* x,
                                                                                int64_t K,
                                                                                uint32_t* out) {
  int64_t j = 0;
  for (; j + 32 <= K; j += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(x + j));
    _mm512_storeu_si512(out + j / 2, (__m512i)v);
  }
  if (j < K) {  // the last K - j inputs, then a zero to pair an odd one with
    const int64_t n = K - j;
    const __mmask16 lo = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1u);
    const __mmask16 hi = n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1u);
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + j + 16),
                                           _mm512_maskz_loadu_ps(lo, x + j));
    const __mmask16 words = static_cast<__mmask16>((1u << ((n + 1) / 2)) - 1u);
    _mm512_mask_storeu_epi32(out + j / 2, words, (__m512i)v);
  }
}

// Outputs [c0, c0 + 16 Q) of TB rows, stored up to `last` (exclusive).
template <int TB, int Q>
TWOTOWER_RT_DOT_TARGET inline __attribute__((always_inline)) void dot_tile(
    const uint32_t* const* in, const uint32_t* w, int64_t pairs, int64_t ldw, int64_t c0,
    int64_t last, const float* bias, float* const* out) {
  __m512 acc[TB][Q];
  for (int q = 0; q < Q; ++q) {
    float init[kDotLanes];
    for (int64_t i = 0; i < kDotLanes; ++i) {
      const int64_t c = c0 + q * kDotLanes + i;
      init[i] = bias != nullptr && c < last ? bias[c] : -0.0f;
    }
    for (int b = 0; b < TB; ++b) acc[b][q] = _mm512_loadu_ps(init);
  }
  for (int64_t j = 0; j < pairs; ++j) {
    const uint32_t* row = w + j * ldw + c0;
    __m512bh wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = (__m512bh)_mm512_loadu_si512(row + q * kDotLanes);
    for (int b = 0; b < TB; ++b) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(in[b][j]));
      for (int q = 0; q < Q; ++q) acc[b][q] = _mm512_dpbf16_ps(acc[b][q], xv, wv[q]);
    }
  }
  for (int b = 0; b < TB; ++b) {
    for (int q = 0; q < Q; ++q) {
      const int64_t c = c0 + q * kDotLanes, n = last - c < kDotLanes ? last - c : kDotLanes;
      const __mmask16 keep = n >= kDotLanes ? 0xffff : static_cast<__mmask16>((1u << n) - 1u);
      _mm512_mask_storeu_ps(out[b] + c, keep, acc[b][q]);
    }
  }
}

// Outputs [c0, c1) of TB rows: tiles of 64, then 16 at a time (w's rows padded to a multiple of
// 16 words past c1's vector).
template <int TB>
TWOTOWER_RT_DOT_TARGET inline __attribute__((always_inline)) void dot_cols(
    const uint32_t* const* in, const uint32_t* w, int64_t pairs, int64_t ldw, int64_t c0,
    int64_t c1, const float* bias, float* const* out) {
  int64_t c = c0;
  for (; c + 4 * kDotLanes <= c1; c += 4 * kDotLanes) {
    dot_tile<TB, 4>(in, w, pairs, ldw, c, c1, bias, out);
  }
  for (; c < c1; c += kDotLanes) dot_tile<TB, 1>(in, w, pairs, ldw, c, c1, bias, out);
}
#endif

}  // namespace cpu
}  // namespace twotower_rt
