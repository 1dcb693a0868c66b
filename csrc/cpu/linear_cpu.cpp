// A dense projection on the CPU (see twotower_rt/linear_cpu.h): tiles of cpu_gemm.h.
#include "twotower_rt/linear_cpu.h"

#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_gemm.h"

namespace twotower_rt {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows per register tile when there are several

template <int TB>
TWOTOWER_RT_INLINE void rows_at(const LinearParams& p, int64_t r, const float** in, float** out) {
  for (int b = 0; b < TB; ++b) {
    in[b] = p.x + (r + b) * p.x_stride;
    out[b] = p.out + (r + b) * p.out_features;
  }
}

template <typename W>
TWOTOWER_RT_INLINE void linear_all(const LinearParams& p, const W* w) {
  const int64_t K = p.in, N = p.out_features, full = p.rows / kRows * kRows;
  const float* in[kRows];
  float* out[kRows];
  // Blocks of 64 outputs outermost, so that each block's weights (K x 64) stay in L1/L2 while
  // every 4-row tile reads them; the last N % 64 outputs of those rows next.
  const int64_t wide = N / (4 * kGemmVec) * (4 * kGemmVec);
  for (int64_t c = 0; c < wide; c += 4 * kGemmVec) {
    for (int64_t r = 0; r < full; r += kRows) {
      rows_at<kRows>(p, r, in, out);
      gemm_tile<kRows, 4>(in, w, K, p.w_stride, c, p.bias, out);
    }
  }
  for (int64_t r = 0; wide < N && r < full; r += kRows) {
    rows_at<kRows>(p, r, in, out);
    gemm_cols<kRows>(in, w, K, N, p.w_stride, wide, p.bias, out);
  }
  // The last rows % 4 rows: two at a time, then one (wider tiles: enough independent chains).
  int64_t r = full;
  for (; r + 2 <= p.rows; r += 2) {
    rows_at<2>(p, r, in, out);
    gemm_rows<2>(in, w, K, N, p.w_stride, p.bias, out);
  }
  if (r < p.rows) {
    rows_at<1>(p, r, in, out);
    gemm_rows<1>(in, w, K, N, p.w_stride, p.bias, out);
  }
}

// One clone set per weight type (target_clones does not take templates).
TWOTOWER_RT_CLONES
void linear_f32(const LinearParams& p) { linear_all(p, p.w); }

TWOTOWER_RT_CLONES
void linear_bf16(const LinearParams& p) { linear_all(p, p.w_bf16); }

}  // namespace

const char* linear(const LinearParams& p) {
  if (p.x == nullptr || p.out == nullptr || (p.w == nullptr) == (p.w_bf16 == nullptr)) {
    return "linear: a required pointer is null (or both weights are given)";
  }
  if (p.rows < 0 || p.in <= 0 || p.out_features <= 0 || p.x_stride < p.in ||
      p.w_stride < p.out_features) {
    return "linear: sizes must be positive, with x_stride >= in and w_stride >= out_features";
  }
  if (p.rows == 0) return nullptr;
  if (p.w != nullptr) {
    linear_f32(p);
  } else {
    linear_bf16(p);
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
