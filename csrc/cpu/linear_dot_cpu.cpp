// A dense projection with bfloat16 dot products (see twotower_rt/linear_dot_cpu.h): the tiles of
// cpu_gemm_dot.h over the kernel threads.
#include "twotower_rt/linear_dot_cpu.h"

#include <vector>

#include "twotower_rt/cpu_gemm_dot.h"
#include "twotower_rt/cpu_pool.h"

namespace twotower_rt {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows per register tile

struct Job {
  const LinearDotParams* p;
  const uint32_t* x;  // (rows, pairs): each row's inputs as bfloat16 pairs
  int64_t pairs;
  ProjectionSplit split;  // cpu_pool.h: the float32 kernel's tasks
};

#ifdef TWOTOWER_RT_HAS_DOT
template <int TB>
TWOTOWER_RT_DOT_TARGET inline __attribute__((always_inline)) void rows_at(const Job& job,
                                                                           int64_t r, int64_t c0,
                                                                           int64_t c1) {
  const LinearDotParams& p = *job.p;
  const uint32_t* in[TB];
  float* out[TB];
  for (int b = 0; b < TB; ++b) {
    in[b] = job.x + (r + b) * job.pairs;
    out[b] = p.out + (r + b) * p.out_features;
  }
  dot_cols<TB>(in, p.w, job.pairs, p.w_stride, c0, c1, p.bias, out);
}

// Rows [r0, r1) x outputs [c0, c1).
TWOTOWER_RT_DOT_TARGET void dot_part(const Job& job, int64_t r0, int64_t r1, int64_t c0,
                                     int64_t c1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows_at<kRows>(job, r, c0, c1);
  switch (r1 - r) {
    case 3: rows_at<3>(job, r, c0, c1); break;
    case 2: rows_at<2>(job, r, c0, c1); break;
    case 1: rows_at<1>(job, r, c0, c1); break;
    default: break;
  }
}

TWOTOWER_RT_DOT_TARGET void to_pairs(const LinearDotParams& p, int64_t pairs, uint32_t* x) {
  for (int64_t r = 0; r < p.rows; ++r) bf16_pairs(p.x + r * p.x_stride, p.in, x + r * pairs);
}

// The kernel threads' tasks: the float32 kernel's (cpu_pool.h: projection_split; every output
// is the same chain whoever computes it).
void dot_task(void* context, int64_t i) {
  const Job& job = *static_cast<const Job*>(context);
  const ProjectionSplit& s = job.split;
  const int64_t block = i % s.blocks, c0 = block * s.width;
  const int64_t c1 = c0 + s.width < job.p->out_features ? c0 + s.width : job.p->out_features;
  const bool second = i >= s.blocks;
  dot_part(job, second ? s.half : 0, second ? job.p->rows : s.half, c0, c1);
}
#endif

}  // namespace

bool linear_dot_supported() { return dot_supported(); }

const char* linear_dot(const LinearDotParams& p) {
  if (!dot_supported()) return "linear_dot: this CPU has no AVX512_BF16";
  if (p.x == nullptr || p.w == nullptr || p.out == nullptr) {
    return "linear_dot: a required pointer is null";
  }
  const int64_t padded = (p.out_features + 15) / 16 * 16;
  if (p.rows < 0 || p.in <= 0 || p.out_features <= 0 || p.x_stride < p.in ||
      p.w_stride < padded) {
    return "linear_dot: sizes must be positive, with x_stride >= in and w_stride >= "
           "out_features rounded up to 16";
  }
  if (p.rows == 0) return nullptr;
#ifdef TWOTOWER_RT_HAS_DOT
  Job job;
  job.p = &p;
  job.pairs = (p.in + 1) / 2;
  thread_local std::vector<uint32_t> x;  // the caller's: tasks only read it
  if (x.size() < static_cast<size_t>(p.rows * job.pairs)) x.resize(p.rows * job.pairs);
  to_pairs(p, job.pairs, x.data());
  job.x = x.data();
  job.split = projection_split(p.rows, p.out_features);
  // (The float32 kernel's measure of work, so that both split the same calls over the threads:
  // at one row a call is bound by its weights' bytes, the same either way.)
  return pool_run(job.split.tasks(p.rows), p.rows * p.in * p.out_features, dot_task, &job)
             ? nullptr
             : kPoolFailed;
#else
  return "linear_dot: not built for this CPU";
#endif
}

}  // namespace cpu
}  // namespace twotower_rt
