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

template <int TB, typename W>
TWOTOWER_RT_INLINE void tile_at(const LinearParams& p, const W* w, int64_t r, int64_t c) {
  const float* in[TB];
  float* out[TB];
  rows_at<TB>(p, r, in, out);
  gemm_tile<TB, 4>(in, w, p.in, p.w_stride, c, p.bias, out);
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

// Every row, outputs [begin, end): begin a multiple of kBlock, end too or the last output.
template <typename W>
TWOTOWER_RT_INLINE void linear_cols(const LinearParams& p, const W* w, int64_t begin,
                                    int64_t end) {
  const int64_t full = p.rows / kRows * kRows, rest = p.rows - full;
  if (full == 0) {  // one to three rows: each tile reads every weight once anyway
    few_rows(p, w, 0, rest, begin, end);
    return;
  }
  // Blocks of 64 outputs outermost, so that each block's weights (K x 64) stay in L1/L2 while
  // every row tile reads them (the weights stream once); the last N % 64 outputs next.
  const int64_t wide = begin + (end - begin) / (4 * kGemmVec) * (4 * kGemmVec);
  for (int64_t c = begin; c < wide; c += 4 * kGemmVec) {
    for (int64_t r = 0; r < full; r += kRows) tile_at<kRows>(p, w, r, c);
    switch (rest) {
      case 3: tile_at<3>(p, w, full, c); break;
      case 2: tile_at<2>(p, w, full, c); break;
      case 1: tile_at<1>(p, w, full, c); break;
      default: break;
    }
  }
  if (wide == end) return;
  for (int64_t r = 0; r < full; r += kRows) cols_at<kRows>(p, w, r, wide, end);
  few_rows(p, w, full, rest, wide, end);
}

// Outputs per task of the kernel threads (cpu_pool.h): a multiple of every tile's width, so that
// a task's outputs are tiled as one thread would tile them.
constexpr int64_t kBlock = 8 * kGemmVec;

template <typename W>
TWOTOWER_RT_INLINE void linear_task(const LinearParams& p, const W* w, int64_t i) {
  const int64_t end = (i + 1) * kBlock;
  linear_cols(p, w, i * kBlock, end < p.out_features ? end : p.out_features);
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
  const int64_t tasks = (p.out_features + kBlock - 1) / kBlock;
  pool_run(tasks, p.rows * p.in * p.out_features,
           p.w != nullptr ? linear_f32_task : linear_bf16_task,
           const_cast<LinearParams*>(&p));
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
