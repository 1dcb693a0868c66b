// The fused Mamba-2 mixer middle on the CPU (see twotower_rt/mamba_cpu.h for what it computes and
// how its numbers relate to the PyTorch path). One sequence at a time, one token at a time; the
// inner loops run over contiguous channels or state elements, so the compiler vectorises them into
// each instruction-set clone (cpu_common.h: the conv, the state update and y = state . C as fused
// multiply-adds; every clone rounds the same operations in the same order: the same bits on every
// x86-64 machine).
#include "twotower_rt/mamba_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_pool.h"

namespace twotower_rt {
namespace cpu {
namespace {

inline float silu(float v) { return v / (1.0f + exp_approx(-v)); }

// torch.nn.functional.softplus (beta 1, threshold 20).
inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

// sum_i a[i] * b[i] over 8 fixed lanes, then the lanes pairwise: the same order whatever the
// vector width the clone runs with.
inline float dot8(const float* a, const float* b, int64_t len) {
  float lane[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] = lane[j] + a[i + j] * b[i + j];
  }
  for (int j = 0; i < len; ++i, ++j) lane[j] = lane[j] + a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// One token of one head's scan with head_dim P known at compile time: each state row i (P
// lanes) updated as row * decay + dtx * B[i] (skipped for a padding token), and y = sum_i row *
// C[i] in i order kept in registers, then y + D * x, in vectors V (cpu_common.h: wide_vectors).
// The same operations, in the same order, as the generic loops in mamba_row_head, so the same
// bits.
template <int P, typename V>
TWOTOWER_RT_INLINE void scan_token_v(float* st, const float* dtx, const float* x, const float* B,
                                     const float* C, float decay, float D, bool valid, float* yh,
                                     int64_t N) {
  constexpr int L = sizeof(V) / sizeof(float), PV = P / L;
  V d[PV], y[PV];
  for (int q = 0; q < PV; ++q) std::memcpy(&d[q], dtx + L * q, sizeof(V));
  const V vdecay = splat_v<V>(decay);
  for (int64_t i = 0; i < N; ++i) {
    float* row = st + i * P;
    const V vb = splat_v<V>(B[i]), vc = splat_v<V>(C[i]);
    for (int q = 0; q < PV; ++q) {
      V r;
      std::memcpy(&r, row + L * q, sizeof(V));
      if (valid) {
        r = fmadd_v(r, vdecay, d[q] * vb);
        std::memcpy(row + L * q, &r, sizeof(V));
      }
      y[q] = i == 0 ? r * vc : fmadd_v(r, vc, y[q]);
    }
  }
  const V vD = splat_v<V>(D);
  for (int q = 0; q < PV; ++q) {
    V xq;
    std::memcpy(&xq, x + L * q, sizeof(V));
    y[q] = fmadd_v(vD, xq, y[q]);
    std::memcpy(yh + L * q, &y[q], sizeof(V));
  }
}

template <int P>
TWOTOWER_RT_INLINE void scan_token(float* st, const float* dtx, const float* x, const float* B,
                                   const float* C, float decay, float D, bool valid, float* yh,
                                   int64_t N) {
  if (wide_vectors()) {
    scan_token_v<P, v16>(st, dtx, x, B, C, decay, D, valid, yh, N);
  } else {
    scan_token_v<P, v8>(st, dtx, x, B, C, decay, D, valid, yh, N);
  }
}

// dst (cols, rows) = the transpose of src (rows, cols), both row-major: 8 x 8 tiles through
// registers (three rounds of shuffles), the edges one element at a time. Moves bits only.
TWOTOWER_RT_INLINE void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef int32_t i8 __attribute__((vector_size(32)));
#if defined(__clang__)
#define TWOTOWER_RT_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TWOTOWER_RT_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif
  const int64_t r8 = rows - rows % 8, c8 = cols - cols % 8;
  for (int64_t r0 = 0; r0 < r8; r0 += 8) {
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      v8 a[8], t[8], u[8];
      for (int k = 0; k < 8; ++k) std::memcpy(&a[k], src + (r0 + k) * cols + c0, sizeof(v8));
      for (int k = 0; k < 8; k += 2) {  // interleave row pairs
        t[k] = TWOTOWER_RT_SHUFFLE(a[k], a[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[k + 1] = TWOTOWER_RT_SHUFFLE(a[k], a[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int k = 0; k < 8; k += 4) {  // then pairs of pairs
        u[k] = TWOTOWER_RT_SHUFFLE(t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[k + 1] = TWOTOWER_RT_SHUFFLE(t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[k + 2] = TWOTOWER_RT_SHUFFLE(t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[k + 3] = TWOTOWER_RT_SHUFFLE(t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
      for (int k = 0; k < 4; ++k) {  // then the 128-bit halves
        const v8 lo = TWOTOWER_RT_SHUFFLE(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        const v8 hi = TWOTOWER_RT_SHUFFLE(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        std::memcpy(dst + (c0 + k) * rows + r0, &lo, sizeof(v8));
        std::memcpy(dst + (c0 + k + 4) * rows + r0, &hi, sizeof(v8));
      }
    }
  }
#undef TWOTOWER_RT_SHUFFLE
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
  }
}

struct Scratch {
  std::vector<float> history, xbc, dt, y, state;
};

// A row's sizes and its in_proj output, as every part of the row names them.
struct Sizes {
  int64_t H, P, N, G, K, n, d_inner, conv_dim, proj, n_valid;
  const float* zx;
};

TWOTOWER_RT_INLINE Sizes sizes_of(const MambaChunkParams& p, int64_t row) {
  Sizes z;
  z.H = p.heads, z.P = p.head_dim, z.N = p.state_size, z.G = p.groups, z.K = p.conv_kernel;
  z.n = p.n, z.d_inner = z.H * z.P, z.conv_dim = z.d_inner + 2 * z.G * z.N;
  z.proj = z.d_inner + z.conv_dim + z.H;
  z.n_valid = p.n_valid != nullptr ? p.n_valid[row] : z.n;
  z.zx = p.zxbcdt + row * z.n * z.proj;
  return z;
}

// One row in three parts, so that its heads can run on the kernel threads (cpu_pool.h): the
// conv and dt (every head's inputs), each head's scan, the norm.
TWOTOWER_RT_CLONES
void mamba_row_inputs(const MambaChunkParams& p, int64_t row, Scratch& s) {
  const auto [H, P, N, G, K, n, d_inner, conv_dim, proj, n_valid, zx] = sizes_of(p, row);
  const bool clamp_dt = p.dt_min > 0.0f || p.dt_max != std::numeric_limits<float>::infinity();
  const int64_t tokens = p.out != nullptr ? n : n_valid;  // a state-only call stops at n_valid

  // The raw (pre-conv) columns, time-major: the state's K, then the new ones (zero past n_valid).
  float* history = s.history.data();
  const float* conv_state = p.conv_state + row * conv_dim * K;
  for (int64_t c = 0; c < conv_dim; ++c) {
    for (int64_t k = 0; k < K; ++k) history[k * conv_dim + c] = conv_state[c * K + k];
  }
  for (int64_t t = 0; t < n; ++t) {
    float* col = history + (K + t) * conv_dim;
    if (t < n_valid) {
      std::memcpy(col, zx + t * proj + d_inner, conv_dim * sizeof(float));
    } else {
      std::memset(col, 0, conv_dim * sizeof(float));
    }
  }

  // 1. Per token: the depthwise causal conv (bias, then each tap in order) and SiLU; dt per head.
  for (int64_t t = 0; t < tokens; ++t) {
    const bool valid = t < n_valid;
    const float* window = history + (t + 1) * conv_dim;
    float* xbc = s.xbc.data() + t * conv_dim;
    if (p.conv_bias != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < conv_dim; ++c) {
        xbc[c] = fmadd(window[c], p.conv_taps[c], p.conv_bias[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = window[c] * p.conv_taps[c];
    }
    for (int64_t k = 1; k < K; ++k) {
      const float* w = window + k * conv_dim;
      const float* tap = p.conv_taps + k * conv_dim;
#pragma omp simd
      for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = fmadd(w[c], tap[c], xbc[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = silu(xbc[c]);

    const float* dt_raw = zx + t * proj + d_inner + conv_dim;
    float* dt = s.dt.data() + t * H;
    for (int64_t h = 0; h < H; ++h) {
      float v = softplus(dt_raw[h] + p.dt_bias[h]);
      if (clamp_dt) v = v < p.dt_min ? p.dt_min : (v > p.dt_max ? p.dt_max : v);
      dt[h] = valid ? v : 0.0f;  // padding: decay 1, no input
    }
  }

}

// Head h: its SSM state transposed to (N, P) for the block (the update and y = state . C then run
// over P contiguous lanes, y summing over N in order, with no horizontal reductions), the scan
// over the tokens with that state in L1, the state back. dtx: P floats of the calling thread.
TWOTOWER_RT_CLONES
void mamba_row_head(const MambaChunkParams& p, int64_t row, int64_t h, Scratch& s, float* dtx) {
  const auto [H, P, N, G, K, n, d_inner, conv_dim, proj, n_valid, zx] = sizes_of(p, row);
  const int64_t heads_per_group = H / G;
  const int64_t tokens = p.out != nullptr ? n : n_valid;
  float* st = s.state.data() + h * N * P;
  transpose(p.ssm_state + (row * H + h) * P * N, P, N, st);
  const int64_t g = h / heads_per_group;
  for (int64_t t = 0; t < tokens; ++t) {
    const bool valid = t < n_valid;
    const float* xbc = s.xbc.data() + t * conv_dim;
    const float* B = xbc + d_inner + g * N;
    const float* C = xbc + d_inner + G * N + g * N;
    const float* x = xbc + h * P;
    const float dt = s.dt[t * H + h];
    float* yh = s.y.data() + t * d_inner + h * P;
    // One pass over the state: update row i, then add its share to y (y sums over i in order).
    const float decay = valid ? std::exp(dt * p.A[h]) : 1.0f;
#pragma omp simd
    for (int64_t q = 0; q < P; ++q) dtx[q] = dt * x[q];
    if (p.out != nullptr && (P == 32 || P == 64 || P == 128)) {  // the common head sizes
      if (P == 64) scan_token<64>(st, dtx, x, B, C, decay, p.D[h], valid, yh, N);
      if (P == 32) scan_token<32>(st, dtx, x, B, C, decay, p.D[h], valid, yh, N);
      if (P == 128) scan_token<128>(st, dtx, x, B, C, decay, p.D[h], valid, yh, N);
      continue;
    }
    for (int64_t i = 0; i < N; ++i) {
      float* row_i = st + i * P;
      const float b = B[i], c = C[i];
      if (valid) {
#pragma omp simd
        for (int64_t q = 0; q < P; ++q) row_i[q] = fmadd(row_i[q], decay, dtx[q] * b);
      }
      if (p.out == nullptr) continue;
      if (i == 0) {
#pragma omp simd
        for (int64_t q = 0; q < P; ++q) yh[q] = row_i[q] * c;
      } else {
#pragma omp simd
        for (int64_t q = 0; q < P; ++q) yh[q] = fmadd(row_i[q], c, yh[q]);
      }
    }
    if (p.out == nullptr) continue;
#pragma omp simd
    for (int64_t q = 0; q < P; ++q) yh[q] = fmadd(p.D[h], x[q], yh[q]);
  }
  if (p.ssm_state_out != nullptr) {
    transpose(st, N, P, p.ssm_state_out + (row * H + h) * P * N);
  }
}

TWOTOWER_RT_CLONES
void mamba_row_output(const MambaChunkParams& p, int64_t row, Scratch& s) {
  const auto [H, P, N, G, K, n, d_inner, conv_dim, proj, n_valid, zx] = sizes_of(p, row);
  const float* history = s.history.data();

  // 3. Per token: gated RMSNorm, y * silu(z) normalised per group of norm_group channels, times
  // the weight.
  for (int64_t t = 0; p.out != nullptr && t < n; ++t) {
    const float* z = zx + t * proj;
    float* y = s.y.data() + t * d_inner;
#pragma omp simd
    for (int64_t c = 0; c < d_inner; ++c) y[c] = y[c] * silu(z[c]);
    float* out = p.out + (row * n + t) * d_inner;
    for (int64_t start = 0; start < d_inner; start += p.norm_group) {
      const float* yg = y + start;
      const float mean = dot8(yg, yg, p.norm_group) / static_cast<float>(p.norm_group);
      const float inv = 1.0f / std::sqrt(mean + p.eps);
#pragma omp simd
      for (int64_t c = 0; c < p.norm_group; ++c) {
        out[start + c] = (yg[c] * inv) * p.norm_weight[start + c];
      }
    }
  }

  if (p.conv_state_out != nullptr) {  // the K raw columns that end at the last real token
    float* conv_out = p.conv_state_out + row * conv_dim * K;
    for (int64_t c = 0; c < conv_dim; ++c) {
      for (int64_t k = 0; k < K; ++k) conv_out[c * K + k] = history[(n_valid + k) * conv_dim + c];
    }
  }
}

// The kernel threads' tasks (cpu_pool.h). One row: its heads; several: the rows, each on the
// thread's own scratch.
struct Job {
  const MambaChunkParams* p;
  Scratch* s;  // one row: the caller's
  int64_t row;
};

void size_scratch(const MambaChunkParams& p, Scratch& s) {
  const int64_t d_inner = p.heads * p.head_dim, conv_dim = d_inner + 2 * p.groups * p.state_size;
  s.history.resize((p.conv_kernel + p.n) * conv_dim);
  s.xbc.resize(p.n * conv_dim);
  s.dt.resize(p.n * p.heads);
  s.y.resize(p.n * d_inner);
  s.state.resize(d_inner * p.state_size);
}

float* head_buffer(int64_t P) {
  thread_local std::vector<float> dtx;
  if (static_cast<int64_t>(dtx.size()) < P) dtx.resize(P);
  return dtx.data();
}

TWOTOWER_RT_CLONES
void head_task(void* job, int64_t h) {
  const Job& j = *static_cast<const Job*>(job);
  mamba_row_head(*j.p, j.row, h, *j.s, head_buffer(j.p->head_dim));
}

TWOTOWER_RT_CLONES
void row_task(void* job, int64_t row) {
  const MambaChunkParams& p = *static_cast<const Job*>(job)->p;
  thread_local Scratch s;
  size_scratch(p, s);
  float* dtx = head_buffer(p.head_dim);
  mamba_row_inputs(p, row, s);
  for (int64_t h = 0; h < p.heads; ++h) mamba_row_head(p, row, h, s, dtx);
  mamba_row_output(p, row, s);
}

}  // namespace

const char* mamba_chunk(const MambaChunkParams& p) {
  if (p.zxbcdt == nullptr || p.conv_state == nullptr || p.ssm_state == nullptr ||
      p.conv_taps == nullptr || p.dt_bias == nullptr || p.A == nullptr || p.D == nullptr ||
      p.norm_weight == nullptr) {
    return "mamba_chunk: a required input pointer is null";
  }
  if (p.batch < 0 || p.n < 0 || p.heads <= 0 || p.head_dim <= 0 || p.state_size <= 0 ||
      p.groups <= 0 || p.conv_kernel <= 0) {
    return "mamba_chunk: sizes must be positive (batch and n non-negative)";
  }
  if (p.heads % p.groups != 0) return "mamba_chunk: heads must be a multiple of groups";
  const int64_t d_inner = p.heads * p.head_dim;
  if (p.norm_group <= 0 || d_inner % p.norm_group != 0) {
    return "mamba_chunk: norm_group must divide heads * head_dim";
  }
  if (p.n_valid != nullptr) {
    for (int64_t r = 0; r < p.batch; ++r) {
      if (p.n_valid[r] < 0 || p.n_valid[r] > p.n) return "mamba_chunk: n_valid outside [0, n]";
    }
  }
  // The scan's multiply-adds: what the threads share.
  const int64_t work = p.batch * p.n * d_inner * p.state_size * 2;
  if (p.batch == 1) {
    thread_local Scratch scratch;
    size_scratch(p, scratch);
    Job job{&p, &scratch, 0};
    mamba_row_inputs(p, 0, scratch);
    if (!pool_run(p.heads, work, head_task, &job)) return kPoolFailed;
    mamba_row_output(p, 0, scratch);
  } else {
    Job job{&p, nullptr, 0};
    if (!pool_run(p.batch, work, row_task, &job)) return kPoolFailed;
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
