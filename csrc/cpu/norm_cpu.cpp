// The denoiser's time-modulated RMSNorm on the CPU (see twotower_rt/norm_cpu.h): one row at a
// time, vectorised over the hidden dimension; the sum of squares in 16 fixed lanes.
#include "twotower_rt/norm_cpu.h"

#include <cmath>
#include <vector>

#include "twotower_rt/cpu_common.h"

namespace twotower_rt {
namespace cpu {
namespace {

constexpr int kLanes = 16;

TWOTOWER_RT_CLONES
void norm_rows(const ModNormParams& p, float* y) {
  const int64_t H = p.hidden;
  const bool plain = p.scale == nullptr;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * H;
    const float* scale = plain ? nullptr : p.scale + (r / p.rows_per_seq) * H;
    const float* shift = plain ? nullptr : p.shift + (r / p.rows_per_seq) * H;
    float* out = p.out + r * H;
    if (!plain && !p.post) {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) y[c] = fmadd(x[c], scale[c], shift[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) y[c] = x[c];
    }
    float lane[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= H; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) lane[j] = fmadd(y[c + j], y[c + j], lane[j]);
    }
    for (int j = 0; c < H; ++c, ++j) lane[j] = fmadd(y[c], y[c], lane[j]);
    const float inv = 1.0f / std::sqrt(fold_lanes<kLanes>(lane) / static_cast<float>(H) + p.eps);
    if (plain || !p.post) {
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) out[k] = (y[k] * inv) * p.weight[k];
    } else {
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        out[k] = fmadd((y[k] * inv) * p.weight[k], scale[k], shift[k]);
      }
    }
  }
}

TWOTOWER_RT_CLONES
void residual_rows(const ResidualParams& p) {
  const int64_t H = p.hidden;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* x = p.x + r * H;
    const float* y = p.y + r * H;
    float* out = p.out + r * H;
    if (p.gate == nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) out[c] = x[c] + y[c];
    } else {
      const float* gate = p.gate + (r / p.rows_per_seq) * p.gate_stride;
#pragma omp simd
      for (int64_t c = 0; c < H; ++c) out[c] = fmadd(gate[c], y[c], x[c]);
    }
  }
}

}  // namespace

const char* residual_add(const ResidualParams& p) {
  if (p.rows < 0 || p.hidden <= 0 || p.rows_per_seq <= 0 || p.rows % p.rows_per_seq != 0) {
    return "residual_add: rows must be a multiple of rows_per_seq > 0, hidden > 0";
  }
  if (p.rows == 0) return nullptr;
  if (p.x == nullptr || p.y == nullptr || p.out == nullptr) return "residual_add: null pointer";
  if (p.gate != nullptr && p.gate_stride < p.hidden) {
    return "residual_add: gate rows may not overlap (gate_stride >= hidden)";
  }
  residual_rows(p);
  return nullptr;
}

const char* modulated_rms_norm(const ModNormParams& p) {
  if (p.rows < 0 || p.hidden <= 0 || p.rows_per_seq <= 0 || p.rows % p.rows_per_seq != 0) {
    return "modulated_rms_norm: rows must be a multiple of rows_per_seq > 0, hidden > 0";
  }
  if (p.rows == 0) return nullptr;
  if (p.x == nullptr || p.weight == nullptr || p.out == nullptr) {
    return "modulated_rms_norm: null pointer";
  }
  if ((p.scale == nullptr) != (p.shift == nullptr)) {
    return "modulated_rms_norm: scale and shift go together (both null: a plain RMSNorm)";
  }
  if (p.out == p.x) return "modulated_rms_norm: out may not alias x";
  thread_local std::vector<float> scratch;
  scratch.resize(p.hidden);
  norm_rows(p, scratch.data());
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
