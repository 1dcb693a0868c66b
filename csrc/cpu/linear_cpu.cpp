// A dense projection on the CPU (see twotower_rt/linear_cpu.h): tiles of cpu_gemm.h.
#include "twotower_rt/linear_cpu.h"

#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_gemm.h"
#include "twotower_rt/cpu_pool.h"

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

// Outputs [c, c + 64) of rows [r, r + TB): one tile of v16 with AVX-512, else narrow tiles of
// v8 side by side (cpu_common.h: wide_vectors).
template <int TB, typename W>
TWOTOWER_RT_INLINE void tile_at(const LinearParams& p, const W* w, int64_t r, int64_t c) {
  const float* in[TB];
  float* out[TB];
  rows_at<TB>(p, r, in, out);
  if (wide_vectors()) {
    gemm_tile<TB, 4>(in, w, p.in, p.w_stride, c, p.bias, out);
    return;
  }
  constexpr int Q = kNarrowVectors<TB>;
  for (int q = 0; q < 8; q += Q) {
    gemm_tile<TB, Q, W, v8>(in, w, p.in, p.w_stride, c + q * 8, p.bias, out);
  }
}

template <int TB, typename W>
TWOTOWER_RT_INLINE void cols_at(const LinearParams& p, const W* w, int64_t r, int64_t c,
                                int64_t end) {
  const float* in[TB];
  float* out[TB];
  rows_at<TB>(p, r, in, out);
  gemm_cols<TB>(in, w, p.in, end, p.w_stride, c, p.bias, out);
}

// Rows [r, r + rows) with rows < kRows, outputs [c, end).
template <typename W>
TWOTOWER_RT_INLINE void few_rows(const LinearParams& p, const W* w, int64_t r, int64_t rows,
                                 int64_t c, int64_t end) {
  switch (rows) {
    case 3: cols_at<3>(p, w, r, c, end); break;
    case 2: cols_at<2>(p, w, r, c, end); break;
    case 1: cols_at<1>(p, w, r, c, end); break;
    default: break;
  }
}

// Rows [r0, r1) x outputs [c0, c1): r0 a multiple of kRows, c0 of the task width, c1 and r1 too
// or the last output / row.
template <typename W>
TWOTOWER_RT_INLINE void linear_part(const LinearParams& p, const W* w, int64_t r0, int64_t r1,
                                    int64_t c0, int64_t c1) {
  const int64_t full = r0 + (r1 - r0) / kRows * kRows, rest = r1 - full;
  if (full == r0) {  // one to three rows: each tile reads every weight once anyway
    few_rows(p, w, r0, rest, c0, c1);
    return;
  }
  // Blocks of 64 outputs outermost, so that each block's weights (K x 64) stay in L1/L2 while
  // every row tile reads them (the weights stream once); the last N % 64 outputs next.
  const int64_t wide = c0 + (c1 - c0) / (4 * kGemmVec) * (4 * kGemmVec);
  for (int64_t c = c0; c < wide; c += 4 * kGemmVec) {
    for (int64_t r = r0; r < full; r += kRows) tile_at<kRows>(p, w, r, c);
    switch (rest) {
      case 3: tile_at<3>(p, w, full, c); break;
      case 2: tile_at<2>(p, w, full, c); break;
      case 1: tile_at<1>(p, w, full, c); break;
      default: break;
    }
  }
  if (wide == c1) return;
  for (int64_t r = r0; r < full; r += kRows) cols_at<kRows>(p, w, r, wide, c1);
  few_rows(p, w, full, rest, wide, c1);
}

// The tasks of the kernel threads: cpu_pool.h's projection_split (tiles of 4 rows x 64 outputs,
// or 1-3 rows x 128).
static_assert(kRows == 4 && 4 * kGemmVec == 64, "projection_split assumes these tiles");

template <typename W>
TWOTOWER_RT_INLINE void linear_task(const LinearParams& p, const W* w, int64_t i) {
  const ProjectionSplit s = projection_split(p.rows, p.out_features);
  const int64_t block = i % s.blocks, c0 = block * s.width, c1 = c0 + s.width;
  const bool second = i >= s.blocks;
  linear_part(p, w, second ? s.half : 0, second ? p.rows : s.half, c0,
              c1 < p.out_features ? c1 : p.out_features);
}

// The tasks are the clones (one set per weight type: target_clones does not take templates), so
// that each worker runs the instruction set's code; a pointer to one is resolved like a call.
TWOTOWER_RT_CLONES
void linear_f32_task(void* p, int64_t i) {
  const auto& q = *static_cast<const LinearParams*>(p);
  linear_task(q, q.w, i);
}

TWOTOWER_RT_CLONES
void linear_bf16_task(void* p, int64_t i) {
  const auto& q = *static_cast<const LinearParams*>(p);
  linear_task(q, q.w_bf16, i);
}

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
  const ProjectionSplit s = projection_split(p.rows, p.out_features);
  const bool done = pool_run(s.tasks(p.rows), p.rows * p.in * p.out_features,
                             p.w != nullptr ? linear_f32_task : linear_bf16_task,
                             const_cast<LinearParams*>(&p));
  return done ? nullptr : kPoolFailed;
}

}  // namespace cpu
}  // namespace twotower_rt
