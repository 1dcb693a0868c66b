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
// warp step makes the x loads and y stores 4-byte scalar sector accesses). SsmScanRowsKernel
// (variant 1, below) puts threads over rows of P instead, with N split over 1-4 threads; it has
// not run on a GPU yet, so variant 0 stays the default.
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
  int variant;  // 0: SsmScanKernel (measured), 1: SsmScanRowsKernel (not yet run on a GPU)
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

// One (sequence, head)'s inputs and output: where its x, B, C and y start, A, D and its length.
template <typename T>
struct Sequence {
  const T* x;
  const T* B;
  const T* C;
  float* y;
  float A, D;
  int valid_tokens;
  __device__ __forceinline__ Sequence(const SsmScanParams& p, int b, int head) {
    const int group = head / (p.heads / p.groups);
    x = static_cast<const T*>(p.x) + b * p.x_batch_stride + head * p.x_head_stride;
    B = static_cast<const T*>(p.B) + b * p.b_batch_stride + group * p.b_group_stride;
    C = static_cast<const T*>(p.C) + b * p.c_batch_stride + group * p.c_group_stride;
    y = p.y + static_cast<int64_t>(b) * p.n * p.heads * p.head_dim +
        static_cast<int64_t>(head) * p.head_dim;
    A = p.A[head];
    D = p.D[head];
    valid_tokens = p.n_valid != nullptr ? static_cast<int>(p.n_valid[b]) : p.n;
  }
};

template <typename T, int kN>
__global__ void __launch_bounds__(32 * kWarps) SsmScanKernel(const SsmScanParams p) {
  using L = Layout<kN>;
  constexpr int kNPerLane = L::kNPerLane;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
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

  const Sequence<T> seq(p, b, head);
  const float A = seq.A, D = seq.D;
  const int valid_tokens = seq.valid_tokens;
  const T *x_seq = seq.x, *B_seq = seq.B, *C_seq = seq.C;
  float* y_seq = seq.y;
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

// Variant 1, for runs of several tokens: a thread owns kPerThread = min(N, 32) states of one row,
// so kThreadsPerRow = N / kPerThread (1, 2 or 4) threads share a row and a CTA of 64 rows holds its
// state tile in registers. Each token's x (the CTA's 64 rows), B and C are staged once in shared
// memory (double-buffered, B and C padded by 4 floats per 32 so the quarters of a row read distinct
// banks) and read as float4; y is a sum over kThreadsPerRow lanes, written by consecutive rows.
template <typename T, int kN>
struct RowsLayout {
  static constexpr int kPerThread = kN < 32 ? kN : 32;
  static constexpr int kThreadsPerRow = kN / kPerThread;
  static constexpr int kRows = 64;
  static constexpr int kThreads = kRows * kThreadsPerRow;
  static constexpr int kPadded = kN + kN / 32 * 4;  // B or C in shared memory
  static constexpr int kDt = kRows + 2 * kPadded;    // after x, B, C
  static constexpr int kStage = (kDt + 1 + 3) / 4 * 4;  // keeps the second buffer 16-byte aligned
};

template <typename T, int kN>
__global__ void __launch_bounds__(RowsLayout<T, kN>::kThreads, 1)
    SsmScanRowsKernel(const SsmScanParams p) {
  using L = RowsLayout<T, kN>;
  constexpr int kPer = L::kPerThread;
  __shared__ __align__(16) float stage[2][L::kStage];
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int row0 = blockIdx.x * L::kRows;
  const int local_row = threadIdx.x / L::kThreadsPerRow;
  const int quarter = threadIdx.x % L::kThreadsPerRow;
  const int row = row0 + local_row;
  const bool valid_row = row < p.head_dim;
  const int n0 = quarter * kPer;
  const int padded0 = n0 + n0 / 32 * 4;

  float state[kPer];
  const int64_t state_offset =
      ((static_cast<int64_t>(b) * p.heads + head) * p.head_dim + row) * kN;
  if (valid_row) {
    LoadAsFloat<float, kPer>(p.state + state_offset + n0, state);
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k) state[k] = 0.f;
  }
  const Sequence<T> seq(p, b, head);
  const float A = seq.A, D = seq.D;
  const int valid_tokens = seq.valid_tokens;
  const T *x_seq = seq.x, *B_seq = seq.B, *C_seq = seq.C;
  float* y_seq = seq.y;

  auto load_stage = [&](int i, float* dst) {
    for (int j = threadIdx.x; j < L::kRows + 2 * kN + 1; j += L::kThreads) {
      if (j < L::kRows) {
        dst[j] = row0 + j < p.head_dim ? ToFloat(x_seq[i * p.x_token_stride + row0 + j]) : 0.f;
      } else if (j < L::kRows + kN) {
        const int n = j - L::kRows;
        dst[L::kRows + n + n / 32 * 4] = ToFloat(B_seq[i * p.b_token_stride + n]);
      } else if (j < L::kRows + 2 * kN) {
        const int n = j - L::kRows - kN;
        dst[L::kRows + L::kPadded + n + n / 32 * 4] = ToFloat(C_seq[i * p.c_token_stride + n]);
      } else {
        dst[L::kDt] =
            i < valid_tokens ? p.dt[b * p.dt_batch_stride + i * p.dt_token_stride + head] : 0.f;
      }
    }
  };

  if (p.n > 0) load_stage(0, stage[0]);
  __syncthreads();
#pragma unroll 1
  for (int i = 0; i < p.n; ++i) {
    const float* cur = stage[i & 1];
    if (i + 1 < p.n) load_stage(i + 1, stage[(i + 1) & 1]);
    const float dt = cur[L::kDt];
    const float decay = expf(dt * A);
    const float x = cur[local_row];
    const float dtx = dt * x;
    const float* Bv = cur + L::kRows + padded0;
    const float* Cv = cur + L::kRows + L::kPadded + padded0;
    float acc = 0.f;
    static_assert(kPer % 4 == 0, "float4 reads of B and C");
#pragma unroll
    for (int k = 0; k < kPer; k += 4) {
      const float4 bq = *reinterpret_cast<const float4*>(Bv + k);
      const float4 cq = *reinterpret_cast<const float4*>(Cv + k);
      state[k] = state[k] * decay + dtx * bq.x;
      state[k + 1] = state[k + 1] * decay + dtx * bq.y;
      state[k + 2] = state[k + 2] * decay + dtx * bq.z;
      state[k + 3] = state[k + 3] * decay + dtx * bq.w;
      acc += state[k] * cq.x + state[k + 1] * cq.y + state[k + 2] * cq.z + state[k + 3] * cq.w;
    }
#pragma unroll
    for (int offset = L::kThreadsPerRow / 2; offset > 0; offset >>= 1) {
      acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (valid_row && quarter == 0) {
      y_seq[static_cast<int64_t>(i) * p.heads * p.head_dim + row] = acc + D * x;
    }
    __syncthreads();  // the next iteration's stage load overwrites the buffer read here
  }
  if (p.state_out != nullptr && valid_row) {
    float* out = p.state_out + state_offset;
    StoreFromFloat<float, kPer>(out + n0, state);
  }
}

template <typename T, int kN>
cudaError_t LaunchRows(const SsmScanParams& p, cudaStream_t stream) {
  using L = RowsLayout<T, kN>;
  const dim3 grid((p.head_dim + L::kRows - 1) / L::kRows, p.heads, p.batch);
  SsmScanRowsKernel<T, kN><<<grid, L::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kN>
cudaError_t Launch(const SsmScanParams& p, cudaStream_t stream) {
  if (p.variant == 1) return LaunchRows<T, kN>(p, stream);
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
