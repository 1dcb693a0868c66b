// The fused Mamba-2 mixer middle on the CPU (see twotower_rt/mamba_cpu.h for what it computes and
// how its numbers relate to the PyTorch path). One sequence at a time, one token at a time; the
// inner loops run over contiguous channels or state elements, so the compiler vectorises them,
// and on x86-64 GCC/clang build an AVX-512 and an AVX2 clone chosen at load time. Built with
// -ffp-contract=off, every clone rounds the same operations in the same order: the same bits on
// every x86-64 machine.
#include "twotower_rt/mamba_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "twotower_rt/cpu_common.h"

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

struct Scratch {
  std::vector<float> history, xbc, dt, dtx, y, state;
};

TWOTOWER_RT_CLONES
void mamba_chunk_row(const MambaChunkParams& p, int64_t row, Scratch& s) {
  const int64_t H = p.heads, P = p.head_dim, N = p.state_size, G = p.groups, K = p.conv_kernel;
  const int64_t n = p.n, d_inner = H * P, conv_dim = d_inner + 2 * G * N;
  const int64_t proj = d_inner + conv_dim + H, heads_per_group = H / G;
  const int64_t n_valid = p.n_valid != nullptr ? p.n_valid[row] : n;
  const float* zx = p.zxbcdt + row * n * proj;
  const bool clamp_dt = p.dt_min > 0.0f || p.dt_max != std::numeric_limits<float>::infinity();

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

  // The SSM state, per head transposed to (N, P) for the block: the update and y = state . C then
  // run over P contiguous lanes, y summing over N in order, with no horizontal reductions.
  float* state = s.state.data();
  const float* state_in = p.ssm_state + row * H * P * N;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t q = 0; q < P; ++q) {
      for (int64_t i = 0; i < N; ++i) state[(h * N + i) * P + q] = state_in[(h * P + q) * N + i];
    }
  }
  float* xbc = s.xbc.data();
  float* dt = s.dt.data();
  float* y = s.y.data();
  float* dtx = s.dtx.data();
  const int64_t tokens = p.out != nullptr ? n : n_valid;  // a state-only call stops at n_valid
  for (int64_t t = 0; t < tokens; ++t) {
    const bool valid = t < n_valid;
    // Depthwise causal conv: bias, then each tap in order; then SiLU.
    const float* window = history + (t + 1) * conv_dim;
    if (p.conv_bias != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = p.conv_bias[c] + window[c] * p.conv_taps[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = window[c] * p.conv_taps[c];
    }
    for (int64_t k = 1; k < K; ++k) {
      const float* w = window + k * conv_dim;
      const float* tap = p.conv_taps + k * conv_dim;
#pragma omp simd
      for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = xbc[c] + w[c] * tap[c];
    }
#pragma omp simd
    for (int64_t c = 0; c < conv_dim; ++c) xbc[c] = silu(xbc[c]);

    const float* dt_raw = zx + t * proj + d_inner + conv_dim;
    for (int64_t h = 0; h < H; ++h) {
      float v = softplus(dt_raw[h] + p.dt_bias[h]);
      if (clamp_dt) v = v < p.dt_min ? p.dt_min : (v > p.dt_max ? p.dt_max : v);
      dt[h] = valid ? v : 0.0f;  // padding: decay 1, no input
    }

    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / heads_per_group;
      const float* B = xbc + d_inner + g * N;
      const float* C = xbc + d_inner + G * N + g * N;
      const float* x = xbc + h * P;
      float* st = state + h * N * P;
      float* yh = y + h * P;
      // One pass over the state: update row i, then add its share to y (y sums over i in order).
      const float decay = valid ? std::exp(dt[h] * p.A[h]) : 1.0f;
#pragma omp simd
      for (int64_t q = 0; q < P; ++q) dtx[q] = dt[h] * x[q];
      for (int64_t i = 0; i < N; ++i) {
        float* row_i = st + i * P;
        const float b = B[i], c = C[i];
        if (valid) {
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) row_i[q] = row_i[q] * decay + dtx[q] * b;
        }
        if (p.out == nullptr) continue;
        if (i == 0) {
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) yh[q] = row_i[q] * c;
        } else {
#pragma omp simd
          for (int64_t q = 0; q < P; ++q) yh[q] = yh[q] + row_i[q] * c;
        }
      }
      if (p.out == nullptr) continue;
#pragma omp simd
      for (int64_t q = 0; q < P; ++q) yh[q] = yh[q] + p.D[h] * x[q];
    }
    if (p.out == nullptr) continue;

    // Gated RMSNorm: y * silu(z), normalised per group of norm_group channels, times the weight.
    const float* z = zx + t * proj;
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
  if (p.ssm_state_out != nullptr) {
    float* state_out = p.ssm_state_out + row * H * P * N;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t q = 0; q < P; ++q) {
        for (int64_t i = 0; i < N; ++i) state_out[(h * P + q) * N + i] = state[(h * N + i) * P + q];
      }
    }
  }
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
  const int64_t conv_dim = d_inner + 2 * p.groups * p.state_size;
  thread_local Scratch scratch;
  scratch.history.resize((p.conv_kernel + p.n) * conv_dim);
  scratch.xbc.resize(conv_dim);
  scratch.dt.resize(p.heads);
  scratch.y.resize(d_inner);
  scratch.dtx.resize(p.head_dim);
  scratch.state.resize(d_inner * p.state_size);
  for (int64_t row = 0; row < p.batch; ++row) mamba_chunk_row(p, row, scratch);
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
