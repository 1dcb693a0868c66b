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
// An engine keeps every sequence's state in a slot pool: with state_rows the kernel reads and
// writes row state_rows[b] in place, so a step moves each state once (a gathered copy and its
// scatter back would move it three more times: 8 MB per sequence and layer of the real model).
//
// The chunked prefill (ops/ssm_scan.py, not yet run on a GPU): a long run from a state is cut into
// chunks scanned in parallel, in three launches: the chunk-local states from zero (y == null: no
// C, no reductions), SsmChunkCombine (the state entering each chunk: a sequential pass over the
// chunks per state element, bound by 2 reads + 1 write of the chunk states), then y from the
// entering states. Twice the scan's FLOPs for batch x chunks times the parallelism: for prefill of
// one long prompt (batch x heads x row tiles = 256 CTAs for batch 1 of the real model) the plain
// scan leaves most SMs idle for thousands of sequential steps.
//
// Resources (nvcc 13.0.88, sm_90a, -Xptxas -v): SsmScanKernel 32-48 registers, SsmScanRowsKernel
// 94-128, SsmChunkCombineKernel 32; no stack, no spills.
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
  // The run is cut into `chunks` runs of `chunk` tokens (the last one shorter), each scanned by its
  // own CTAs from its own state: run r = b * chunks + c covers tokens [c * chunk, (c + 1) * chunk).
  // chunks = 1, chunk = n: the plain scan. The chunked prefill (ops/ssm_scan.py) runs the kernel
  // twice around SsmChunkCombine: chunk-local states from zero, then y from the entering states.
  const float* state;  // [batch * chunks, heads, P, N] contiguous, read; null: zero
  float* state_out;    // same layout, or null; may be `state` (in place)
  // [batch] or null: sequence b's state is row state_rows[b] of state / state_out (an engine's
  // slot pool, read and written in place); only with chunks = 1.
  const int64_t* state_rows;
  float* y;            // [batch, n, heads, P] contiguous, or null (not computed)
  int batch, n, heads, groups, head_dim, state_size;
  int chunk, chunks;
  DType dtype;  // of x, B, C
  int variant;  // 0: SsmScanKernel (measured), 1: SsmScanRowsKernel (not yet run on a GPU)
};

// The chunked scan's middle pass: per sequence, the state entering each chunk from the state before
// the run and the chunk-local states (scanned from zero): entering[0] = initial,
// entering[c + 1] = decay[c] * entering[c] + local[c]; the final state is entering[chunks].
struct SsmChunkCombineParams {
  float* states;         // [batch, chunks, heads, P, N]: in: chunk-local states; out: entering
  const float* decay;    // [batch, chunks, heads]: exp(A * the chunk's summed valid dt)
  const float* initial;  // [batch, heads, P, N] or null (zero)
  float* final_state;    // [batch, heads, P, N] or null
  int batch, chunks, heads;
  int head_elems;  // P * N, a multiple of 4
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

// One (run, head)'s inputs and output: where its x, dt, B, C, y and states start, A, D and its
// token counts. blockIdx.z is the run: b * chunks + c.
template <typename T>
struct Sequence {
  const T* x;
  const float* dt;
  const T* B;
  const T* C;
  float* y;
  const float* state;  // null: zero
  float* state_out;
  float A, D;
  int tokens, valid_tokens;
  __device__ __forceinline__ Sequence(const SsmScanParams& p, int run, int head) {
    const int b = run / p.chunks;
    const int t0 = (run % p.chunks) * p.chunk;
    const int group = head / (p.heads / p.groups);
    tokens = min(p.chunk, p.n - t0);
    const int valid = p.n_valid != nullptr ? static_cast<int>(p.n_valid[b]) : p.n;
    valid_tokens = max(0, min(valid - t0, tokens));
    x = static_cast<const T*>(p.x) + b * p.x_batch_stride + t0 * p.x_token_stride +
        head * p.x_head_stride;
    dt = p.dt + b * p.dt_batch_stride + t0 * p.dt_token_stride + head;
    B = static_cast<const T*>(p.B) + b * p.b_batch_stride + t0 * p.b_token_stride +
        group * p.b_group_stride;
    C = static_cast<const T*>(p.C) + b * p.c_batch_stride + t0 * p.c_token_stride +
        group * p.c_group_stride;
    y = p.y == nullptr ? nullptr
                       : p.y + (static_cast<int64_t>(b) * p.n + t0) * p.heads * p.head_dim +
                             static_cast<int64_t>(head) * p.head_dim;
    const int64_t row = p.state_rows != nullptr ? p.state_rows[b] : run;
    const int64_t state_offset = (row * p.heads + head) * p.head_dim * p.state_size;
    state = p.state == nullptr ? nullptr : p.state + state_offset;
    state_out = p.state_out == nullptr ? nullptr : p.state_out + state_offset;
    A = p.A[head];
    D = p.D[head];
  }
};

template <typename T, int kN>
__global__ void __launch_bounds__(32 * kWarps) SsmScanKernel(const SsmScanParams p) {
  using L = Layout<kN>;
  constexpr int kNPerLane = L::kNPerLane;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int head = blockIdx.y;
  const Sequence<T> seq(p, blockIdx.z, head);
  const int n0 = (lane % L::kLanesPerRow) * kNPerLane;
  const bool row_leader = lane % L::kLanesPerRow == 0;

  int rows[kRowIters];
  float state[kRowIters][kNPerLane];
#pragma unroll
  for (int r = 0; r < kRowIters; ++r) {
    rows[r] = blockIdx.x * L::kRowsPerCta + (warp * kRowIters + r) * L::kRowsPerWarpStep +
              lane / L::kLanesPerRow;
    if (rows[r] < p.head_dim && seq.state != nullptr) {
      LoadAsFloat<float, kNPerLane>(seq.state + rows[r] * kN + n0, state[r]);
    } else {
#pragma unroll
      for (int k = 0; k < kNPerLane; ++k) state[r][k] = 0.f;
    }
  }

  const float A = seq.A, D = seq.D;
  float* y_seq = seq.y;
  for (int i = 0; i < seq.tokens; ++i) {
    const float dt = i < seq.valid_tokens ? seq.dt[i * p.dt_token_stride] : 0.f;
    const float decay = expf(dt * A);
    float Bv[kNPerLane], Cv[kNPerLane];
    LoadAsFloat<T, kNPerLane>(seq.B + i * p.b_token_stride + n0, Bv);
    const T* x_tok = seq.x + i * p.x_token_stride;
    if (y_seq == nullptr) {  // the chunked scan's first pass: states only
#pragma unroll
      for (int r = 0; r < kRowIters; ++r) {
        const float dtx = rows[r] < p.head_dim ? dt * ToFloat(x_tok[rows[r]]) : 0.f;
#pragma unroll
        for (int k = 0; k < kNPerLane; ++k) state[r][k] = state[r][k] * decay + dtx * Bv[k];
      }
      continue;
    }
    LoadAsFloat<T, kNPerLane>(seq.C + i * p.c_token_stride + n0, Cv);
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

  if (seq.state_out != nullptr) {
#pragma unroll
    for (int r = 0; r < kRowIters; ++r) {
      if (rows[r] < p.head_dim) {
        StoreFromFloat<float, kNPerLane>(seq.state_out + rows[r] * kN + n0, state[r]);
      }
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
  const Sequence<T> seq(p, blockIdx.z, head);
  const int row0 = blockIdx.x * L::kRows;
  const int local_row = threadIdx.x / L::kThreadsPerRow;
  const int quarter = threadIdx.x % L::kThreadsPerRow;
  const int row = row0 + local_row;
  const bool valid_row = row < p.head_dim;
  const int n0 = quarter * kPer;
  const int padded0 = n0 + n0 / 32 * 4;

  float state[kPer];
  if (valid_row && seq.state != nullptr) {
    LoadAsFloat<float, kPer>(seq.state + row * kN + n0, state);
  } else {
#pragma unroll
    for (int k = 0; k < kPer; ++k) state[k] = 0.f;
  }
  const float A = seq.A, D = seq.D;
  const int tokens = seq.tokens, valid_tokens = seq.valid_tokens;
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
        dst[L::kRows + L::kPadded + n + n / 32 * 4] =
            y_seq != nullptr ? ToFloat(C_seq[i * p.c_token_stride + n]) : 0.f;
      } else {
        dst[L::kDt] = i < valid_tokens ? seq.dt[i * p.dt_token_stride] : 0.f;
      }
    }
  };

  if (tokens > 0) load_stage(0, stage[0]);
  __syncthreads();
#pragma unroll 1
  for (int i = 0; i < tokens; ++i) {
    const float* cur = stage[i & 1];
    if (i + 1 < tokens) load_stage(i + 1, stage[(i + 1) & 1]);
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
    if (valid_row && quarter == 0 && y_seq != nullptr) {
      y_seq[static_cast<int64_t>(i) * p.heads * p.head_dim + row] = acc + D * x;
    }
    __syncthreads();  // the next iteration's stage load overwrites the buffer read here
  }
  if (seq.state_out != nullptr && valid_row) {
    StoreFromFloat<float, kPer>(seq.state_out + row * kN + n0, state);
  }
}

template <typename T, int kN>
cudaError_t LaunchRows(const SsmScanParams& p, cudaStream_t stream) {
  using L = RowsLayout<T, kN>;
  const dim3 grid((p.head_dim + L::kRows - 1) / L::kRows, p.heads, p.batch * p.chunks);
  SsmScanRowsKernel<T, kN><<<grid, L::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kN>
cudaError_t Launch(const SsmScanParams& p, cudaStream_t stream) {
  if (p.variant == 1) return LaunchRows<T, kN>(p, stream);
  const dim3 grid((p.head_dim + Layout<kN>::kRowsPerCta - 1) / Layout<kN>::kRowsPerCta, p.heads,
                  p.batch * p.chunks);
  SsmScanKernel<T, kN><<<grid, 32 * kWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

// Four consecutive state elements of one sequence per thread, the chunks in order.
__global__ void __launch_bounds__(256) SsmChunkCombineKernel(const SsmChunkCombineParams p) {
  const int64_t per_sequence = static_cast<int64_t>(p.heads) * p.head_elems;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= per_sequence * p.batch) return;
  const int64_t b = i / per_sequence;
  const int64_t e = i - b * per_sequence;
  const int head = static_cast<int>(e / p.head_elems);
  float4 running = p.initial != nullptr
                       ? *reinterpret_cast<const float4*>(p.initial + b * per_sequence + e)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
  for (int c = 0; c < p.chunks; ++c) {
    const int64_t run = b * p.chunks + c;
    float4* slot = reinterpret_cast<float4*>(p.states + run * per_sequence + e);
    const float4 local = *slot;
    const float a = p.decay[run * p.heads + head];
    *slot = running;
    running = make_float4(a * running.x + local.x, a * running.y + local.y,
                          a * running.z + local.z, a * running.w + local.w);
  }
  if (p.final_state != nullptr) {
    *reinterpret_cast<float4*>(p.final_state + b * per_sequence + e) = running;
  }
}

}  // namespace ssm_scan

// Host launcher; the caller checked the arguments (csrc/ssm_scan.cu).
inline cudaError_t SsmChunkCombine(const SsmChunkCombineParams& p, cudaStream_t stream) {
  const int64_t vectors = static_cast<int64_t>(p.batch) * p.heads * p.head_elems / 4;
  if (vectors == 0) return cudaSuccess;
  const int64_t blocks = (vectors + 255) / 256;
  ssm_scan::SsmChunkCombineKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

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
