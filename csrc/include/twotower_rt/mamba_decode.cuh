// The Mamba-2 mixer's one-token decode step between its two projections, fused (TWOTOWER.md
// section 2, Mamba-2): from the in_proj output row [z | xBC | dt] of each sequence,
//
//   window = [conv_state[:, 1:] ; xBC]       (the new conv state, raw, in the model dtype)
//   xBC'   = round(silu(window . conv_w + conv_b))        (fp32, rounded to the model dtype)
//   dt'    = softplus(dt + dt_bias) (clamped);  A = -exp(A_log)
//   state  = state * exp(dt' A) + dt' x outer B;  y = state . C + D x   (fp32, per head)
//   out    = rmsnorm(round(y) * silu(z)) * norm_w per group of d_inner / n_groups channels
//
// exactly the mixer's arithmetic for n = 1 (python/twotower_rt/ops/mamba_decode.py,
// mamba_decode_step_ref, is checked against the mixer itself). One CTA per (Mamba group,
// sequence): the group's channels of x, B and C, its H / G heads' states and its norm group are all
// its own, so nothing crosses CTAs. The states may be updated in place.
//
// Floor (real model: 64 heads x 64 x 128, 8 groups, d_inner 4096): the SSM state is read and written
// once, 2 x 2 MB per sequence and layer (1 us at 4 TB/s); conv state, weights and rows are ~0.2 MB.
// With one CTA per group, batch 1 runs 8 CTAs, which bounds it by per-SM bandwidth (~3 us).
//
// Status: compiled; never yet run on a GPU (tests/test_mamba_decode.py's GPU tests).
#pragma once

#include <cmath>
#include <cstdint>

#include "twotower_rt/common.cuh"

namespace twotower_rt {

struct MambaDecodeParams {
  const void* zxbcdt;  // [batch, d_inner + conv_dim + heads], row stride zxbcdt_stride; dtype
  int64_t zxbcdt_stride;
  const void* conv_state;  // [batch, conv_dim, kernel] contiguous, dtype
  void* conv_state_out;    // same layout; may be conv_state
  const void* conv_weight;  // [conv_dim, kernel] contiguous, dtype
  const void* conv_bias;    // [conv_dim] or null
  const void* dt_bias;      // [heads], dtype
  const void* A_log;        // [heads], dtype
  const void* D;            // [heads], dtype
  const float* ssm_state;   // [batch, heads, head_dim, state_size] contiguous fp32
  float* ssm_state_out;     // same layout; may be ssm_state
  const void* norm_weight;  // [d_inner], dtype
  void* out;                // [batch, d_inner] contiguous, dtype
  float eps, dt_min, dt_max;
  int batch, heads, head_dim, state_size, groups, kernel;
  DType dtype;
};

namespace mamba_decode {

constexpr int kThreads = 256;
constexpr int kNPerThread = 8;

__device__ __forceinline__ float Silu(float x) { return x / (1.f + expf(-x)); }

// torch.nn.functional.softplus (beta 1, threshold 20).
__device__ __forceinline__ float Softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

template <typename T>
__device__ __forceinline__ float Round(float v) {
  return ToFloat(FromFloat<T>(v));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) MambaDecodeKernel(const MambaDecodeParams p) {
  extern __shared__ float smem[];
  const int g = blockIdx.x;
  const int b = blockIdx.y;
  const int heads_per_group = p.heads / p.groups;
  const int group_size = heads_per_group * p.head_dim;  // channels of x (and of the norm group)
  const int d_inner = p.heads * p.head_dim;
  const int N = p.state_size;
  const int conv_dim = d_inner + 2 * p.groups * N;
  float* xs = smem;                   // [group_size]
  float* Bs = xs + group_size;        // [N]
  float* Cs = Bs + N;                 // [N]
  float* ys = Cs + N;                 // [group_size]
  float* dts = ys + group_size;       // [heads_per_group]
  float* As = dts + heads_per_group;  // [heads_per_group]
  __shared__ float scratch[32];

  const T* row = static_cast<const T*>(p.zxbcdt) + b * p.zxbcdt_stride;
  const int64_t conv_offset = static_cast<int64_t>(b) * conv_dim * p.kernel;
  const T* conv_in = static_cast<const T*>(p.conv_state) + conv_offset;
  T* conv_out = static_cast<T*>(p.conv_state_out) + conv_offset;
  const T* conv_w = static_cast<const T*>(p.conv_weight);
  const T* conv_b = static_cast<const T*>(p.conv_bias);

  // 1. The conv over this group's x, B and C channels; the shifted window is the new conv state.
  const int local_channels = group_size + 2 * N;
  for (int i = threadIdx.x; i < local_channels; i += kThreads) {
    int c;
    float* dst;
    if (i < group_size) {
      c = g * group_size + i;
      dst = xs + i;
    } else if (i < group_size + N) {
      c = d_inner + g * N + (i - group_size);
      dst = Bs + (i - group_size);
    } else {
      c = d_inner + p.groups * N + g * N + (i - group_size - N);
      dst = Cs + (i - group_size - N);
    }
    const T raw = row[d_inner + c];
    float acc = 0.f;
    for (int k = 0; k < p.kernel; ++k) {
      const T v = k + 1 < p.kernel ? conv_in[c * p.kernel + k + 1] : raw;
      acc = fmaf(ToFloat(conv_w[c * p.kernel + k]), ToFloat(v), acc);
    }
    // All K window values are read before any is written, so in-place updates are safe.
    for (int k = 0; k < p.kernel; ++k) {
      conv_out[c * p.kernel + k] = k + 1 < p.kernel ? conv_in[c * p.kernel + k + 1] : raw;
    }
    if (conv_b != nullptr) acc += ToFloat(conv_b[c]);
    *dst = Round<T>(Silu(acc));
  }
  for (int j = threadIdx.x; j < heads_per_group; j += kThreads) {
    const int h = g * heads_per_group + j;
    const float raw_dt = ToFloat(row[d_inner + conv_dim + h]);
    const float dt_bias = ToFloat(static_cast<const T*>(p.dt_bias)[h]);
    dts[j] = fminf(fmaxf(Softplus(raw_dt + dt_bias), p.dt_min), p.dt_max);
    As[j] = -expf(ToFloat(static_cast<const T*>(p.A_log)[h]));
  }
  __syncthreads();

  // 2. Each head's scan step: threads_per_row threads share a row p, kNPerThread states each.
  const int threads_per_row = N / kNPerThread;
  const int rows_per_pass = kThreads / threads_per_row;
  const int lane_in_row = threadIdx.x % threads_per_row;
  const int n0 = lane_in_row * kNPerThread;
  for (int j = 0; j < heads_per_group; ++j) {
    const int h = g * heads_per_group + j;
    const float decay = expf(dts[j] * As[j]);
    const float D = ToFloat(static_cast<const T*>(p.D)[h]);
    const int64_t head_offset = (static_cast<int64_t>(b) * p.heads + h) * p.head_dim * N;
    for (int base = 0; base < p.head_dim; base += rows_per_pass) {
      const int prow = base + threadIdx.x / threads_per_row;
      const bool valid = prow < p.head_dim;
      float acc = 0.f;
      float x = 0.f;
      if (valid) {
        x = xs[j * p.head_dim + prow];
        const float dtx = dts[j] * x;
        float s[kNPerThread];
        LoadAsFloat<float, kNPerThread>(p.ssm_state + head_offset + prow * N + n0, s);
#pragma unroll
        for (int k = 0; k < kNPerThread; ++k) {
          s[k] = s[k] * decay + dtx * Bs[n0 + k];
          acc += s[k] * Cs[n0 + k];
        }
        StoreFromFloat<float, kNPerThread>(p.ssm_state_out + head_offset + prow * N + n0, s);
      }
      // Sum over the row's lanes (a power of two in [2, 32], aligned within the warp).
      for (int offset = threads_per_row / 2; offset > 0; offset >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      }
      if (valid && lane_in_row == 0) ys[j * p.head_dim + prow] = Round<T>(acc + D * x);
    }
  }
  __syncthreads();

  // 3. Gated RMSNorm over the group.
  const T* z = row + g * group_size;
  const T* norm_w = static_cast<const T*>(p.norm_weight) + g * group_size;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < group_size; i += kThreads) {
    const float v = ys[i] * Silu(ToFloat(z[i]));
    ys[i] = v;
    sum_sq += v * v;
  }
  const float rstd = rsqrtf(BlockReduceSum(sum_sq, scratch) / group_size + p.eps);
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(b) * d_inner + g * group_size;
  for (int i = threadIdx.x; i < group_size; i += kThreads) {
    out[i] = FromFloat<T>(ys[i] * rstd * ToFloat(norm_w[i]));
  }
}

}  // namespace mamba_decode

inline bool MambaDecodeSupportsStateSize(int n) {
  return n == 16 || n == 32 || n == 64 || n == 128 || n == 256;
}

inline int64_t MambaDecodeSmemBytes(int heads, int head_dim, int groups, int state_size) {
  const int64_t group_size = static_cast<int64_t>(heads / groups) * head_dim;
  return (2 * group_size + 2 * state_size + 2 * (heads / groups)) * 4;
}

// Host launcher; the caller checked the arguments (csrc/mamba_decode.cu).
inline cudaError_t MambaDecode(const MambaDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  const int64_t smem = MambaDecodeSmemBytes(p.heads, p.head_dim, p.groups, p.state_size);
  return TWOTOWER_RT_DTYPE_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    auto kernel = mamba_decode::MambaDecodeKernel<T>;
    if (smem > 48 * 1024) {
      cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return err;
    }
    kernel<<<dim3(p.groups, p.batch), mamba_decode::kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace twotower_rt
