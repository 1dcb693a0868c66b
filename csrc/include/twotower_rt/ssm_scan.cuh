// Mamba-2 selective scan over a few tokens from a given state, in fp32 (TWOTOWER.md section 3):
//
//   for each token i (i < n_valid[b]; later tokens leave the state as it is, dt = 0):
//     state[p, :] = state[p, :] * exp(dt_i * A) + dt_i * x_i[p] * B_i[:]
//     y_i[p]      = state[p, :] . C_i[:] + D * x_i[p]
//
// per (sequence b, head h), with B and C shared by the H / G heads of a group. It serves the
// one-token decode step (n = 1, the new state written) and the denoiser's context-seeded block scan
// (n = 16, the state read once and never written: `state_out` null). Reference:
// python/twotower_rt/ops/ssm_scan.py (ssm_scan_ref, the token-by-token recurrence).
//
// Floor (real model: H = 64, P = 64, N = 128, G = 8): the state is 2 MB per sequence and layer in
// fp32, read once (and written once for decode): 0.5 us (1 us) at 4 TB/s per sequence; x, B, C, y
// are under 1% of that at n = 16. 4 FLOPs per state element and token (~0.5 MFLOP per token and
// head): far below the tensor-free fp32 rate, so the scan is bound by the state's bytes.
//
// Mapping: one CTA of 4 warps per (row tile of P, head, sequence); a row of the state (N values) is
// spread over min(32, N) lanes, kNPerLane = N / lanes values each, and each thread keeps kRowIters
// rows in registers for the whole scan, so the state crosses memory once. y is a segmented warp
// sum (shuffles within a row's lanes). B_i, C_i are read by every warp of the CTA (L1 hits).
//
// Measured on an H200 (bench/results/2026-11-27-nvidia-h200.json, real shapes, bf16 x/B/C): the
// decode step at batch 64 in 69 us (92% of copy bandwidth, 5x the PyTorch recurrence); the
// 16-token block at batch 64 in 263 us, 15% of copy: the per-token loop dominates (one row per
// warp step makes the x loads and y stores 4-byte scalar sector accesses). Next: lanes over rows
// of P with N split over few lanes, so x and y move coalesced and y needs fewer shuffles.
//
// Resources (nvcc 13.0.88, sm_90a): 38-56 registers, no stack, no spills.
#pragma once

#include <cstdint>

#include "twotower_rt/common.cuh"

namespace twotower_rt {

struct SsmScanParams {
  const void* x;  // [batch, n, heads, P], unit stride over P
  int64_t x_batch_stride, x_token_stride, x_head_stride;
  const float* dt;  // [batch, n, heads], unit stride over heads (already softplus'ed, clamped)
  int64_t dt_batch_stride, dt_token_stride;
  const float* A;  // [heads], negative
  const float* D;  // [heads]
  const void* B;   // [batch, n, groups, N], unit stride over N; x's dtype
  const void* C;
  int64_t b_batch_stride, b_token_stride, b_group_stride;
  int64_t c_batch_stride, c_token_stride, c_group_stride;
  const int64_t* n_valid;  // [batch] or null (all n tokens valid)
  const float* state;      // [batch, heads, P, N] contiguous, read
  float* state_out;        // same layout, or null; may be `state` (in place)
  float* y;                // [batch, n, heads, P] contiguous
  int batch, n, heads, groups, head_dim, state_size;
  DType dtype;  // of x, B, C
};

namespace ssm_scan {

constexpr int kWarps = 4;
constexpr int kRowIters = 4;

template <int kN>
struct Layout {
  static constexpr int kLanesPerRow = kN < 32 ? kN : 32;
  static constexpr int kNPerLane = kN / kLanesPerRow;
  static constexpr int kRowsPerWarpStep = 32 / kLanesPerRow;
  static constexpr int kRowsPerCta = kWarps * kRowIters * kRowsPerWarpStep;
};

template <typename T, int kN>
__global__ void __launch_bounds__(32 * kWarps) SsmScanKernel(const SsmScanParams p) {
  using L = Layout<kN>;
  constexpr int kNPerLane = L::kNPerLane;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int group = head / (p.heads / p.groups);
  const int n0 = (lane % L::kLanesPerRow) * kNPerLane;
  const bool row_leader = lane % L::kLanesPerRow == 0;

  int rows[kRowIters];
  float state[kRowIters][kNPerLane];
  const float* state_in = p.state + (static_cast<int64_t>(b) * p.heads + head) * p.head_dim * kN;
#pragma unroll
  for (int r = 0; r < kRowIters; ++r) {
    rows[r] = blockIdx.x * L::kRowsPerCta + (warp * kRowIters + r) * L::kRowsPerWarpStep +
              lane / L::kLanesPerRow;
    if (rows[r] < p.head_dim) {
      LoadAsFloat<float, kNPerLane>(state_in + rows[r] * kN + n0, state[r]);
    } else {
#pragma unroll
      for (int k = 0; k < kNPerLane; ++k) state[r][k] = 0.f;
    }
  }

  const float A = p.A[head];
  const float D = p.D[head];
  const int valid_tokens = p.n_valid != nullptr ? static_cast<int>(p.n_valid[b]) : p.n;
  const T* x_seq = static_cast<const T*>(p.x) + b * p.x_batch_stride + head * p.x_head_stride;
  const T* B_seq = static_cast<const T*>(p.B) + b * p.b_batch_stride + group * p.b_group_stride;
  const T* C_seq = static_cast<const T*>(p.C) + b * p.c_batch_stride + group * p.c_group_stride;
  float* y_seq = p.y + static_cast<int64_t>(b) * p.n * p.heads * p.head_dim +
                 static_cast<int64_t>(head) * p.head_dim;
  for (int i = 0; i < p.n; ++i) {
    const float dt = i < valid_tokens ? p.dt[b * p.dt_batch_stride + i * p.dt_token_stride + head]
                                      : 0.f;
    const float decay = expf(dt * A);
    float Bv[kNPerLane], Cv[kNPerLane];
    LoadAsFloat<T, kNPerLane>(B_seq + i * p.b_token_stride + n0, Bv);
    LoadAsFloat<T, kNPerLane>(C_seq + i * p.c_token_stride + n0, Cv);
    const T* x_tok = x_seq + i * p.x_token_stride;
#pragma unroll
    for (int r = 0; r < kRowIters; ++r) {
      const float x = rows[r] < p.head_dim ? ToFloat(x_tok[rows[r]]) : 0.f;
      const float dtx = dt * x;
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kNPerLane; ++k) {
        state[r][k] = state[r][k] * decay + dtx * Bv[k];
        acc += state[r][k] * Cv[k];
      }
#pragma unroll
      for (int offset = L::kLanesPerRow / 2; offset > 0; offset >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      }
      if (row_leader && rows[r] < p.head_dim) {
        y_seq[static_cast<int64_t>(i) * p.heads * p.head_dim + rows[r]] = acc + D * x;
      }
    }
  }

  if (p.state_out != nullptr) {
    float* out = p.state_out + (static_cast<int64_t>(b) * p.heads + head) * p.head_dim * kN;
#pragma unroll
    for (int r = 0; r < kRowIters; ++r) {
      if (rows[r] < p.head_dim) StoreFromFloat<float, kNPerLane>(out + rows[r] * kN + n0, state[r]);
    }
  }
}

template <typename T, int kN>
cudaError_t Launch(const SsmScanParams& p, cudaStream_t stream) {
  const dim3 grid((p.head_dim + Layout<kN>::kRowsPerCta - 1) / Layout<kN>::kRowsPerCta, p.heads,
                  p.batch);
  SsmScanKernel<T, kN><<<grid, 32 * kWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ssm_scan

inline bool SsmScanSupportsStateSize(int n) { return n == 16 || n == 32 || n == 64 || n == 128; }

// Host launcher; the caller checked the arguments (csrc/ssm_scan.cu).
inline cudaError_t SsmScan(const SsmScanParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.head_dim == 0) return cudaSuccess;
  return TWOTOWER_RT_DTYPE_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    switch (p.state_size) {
      case 16:
        return ssm_scan::Launch<T, 16>(p, stream);
      case 32:
        return ssm_scan::Launch<T, 32>(p, stream);
      case 64:
        return ssm_scan::Launch<T, 64>(p, stream);
      case 128:
        return ssm_scan::Launch<T, 128>(p, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace twotower_rt
