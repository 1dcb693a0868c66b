// RMSNorm over rows, with an optional SiLU gate and optional grouping (Mamba-2's gated norm).
//
//   h   = x * silu(gate)                                  (gate optional)
//   out = h * rsqrt(mean(h^2 over each group of G) + eps) * weight      (G = group_size, G | N)
//
// in fp32, for x, gate, out in float32 or bfloat16 and weight in float32 or bfloat16. Reference:
// python/twotower_rt/ops/rmsnorm.py:rms_norm_ref.
//
// Floor. The kernel must move rows*N elements of x in, of gate in (if gated), of out back, plus N
// weights (read once per CTA; they stay in L2). For bf16 at the model's shapes:
//   pre-norm,  N = 2688,          1024 rows: 2 * 1024 * 2688 * 2 B = 11.0 MB -> 3.7 us at 3.0 TB/s
//   gated,     N = 4096, G = 512, 1024 rows: 3 * 1024 * 4096 * 2 B = 25.2 MB -> 8.4 us
//   either,    16 rows: 0.2 / 0.4 MB -> latency-bound (a launch costs more than the bytes).
// FLOPs are ~4 per element (~8 gated): about 1 FLOP/byte, so memory is the only roof.
//
// Mapping. One CTA per (row, group); each thread owns up to kCachedVecsPerThread 16-byte vectors,
// kept in registers between the sum of squares and the write, so x and gate are read from memory
// once. Groups wider than kCachedVecsPerThread * 1024 vectors (over 16K bf16 or 8K fp32 elements)
// re-read the rest in the second pass (from L1/L2). Scalar accesses are used when a pointer, a row
// stride or G is not a multiple of the vector width.
//
// Resources (nvcc 13.0.88, sm_90a, -Xptxas -v, 16 instantiations): 24-50 registers, 0 bytes of
// stack, no spills, 128 B of shared memory. The model's cases, 16-byte bf16 accesses: 32 registers
// plain (full occupancy), 49 gated (50 with an fp32 weight).
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include "twotower_rt/common.cuh"

namespace twotower_rt {

struct RMSNormParams {
  void* out;           // [rows, n], row stride out_row_stride, unit column stride
  const void* x;       // [rows, n], row stride x_row_stride
  const void* gate;    // [rows, n] or nullptr, row stride gate_row_stride
  const void* weight;  // [n], contiguous
  int64_t rows;
  int64_t n;
  int64_t group_size;  // divides n; n for a plain RMSNorm
  int64_t out_row_stride;
  int64_t x_row_stride;
  int64_t gate_row_stride;
  float eps;
  DType dtype;  // of x, gate and out
  DType weight_dtype;
};

namespace rmsnorm {

constexpr int kMaxThreads = 1024;
constexpr int kCachedVecsPerThread = 2;

// __fdividef: a precise division has a called slow path (stack frame, spills); the ~2 ulp error is
// far below bf16 rounding, and for v -> -inf the quotient goes to 0 as silu does.
__device__ __forceinline__ float Silu(float v) { return __fdividef(v, 1.f + __expf(-v)); }

// h = x * silu(gate) for the kVec elements starting at element `col` of a row.
template <typename T, bool kHasGate, int kVec>
__device__ __forceinline__ void LoadGated(const T* x, const T* gate, int col, float (&h)[kVec]) {
  LoadAsFloat(x + col, h);
  if constexpr (kHasGate) {
    float g[kVec];
    LoadAsFloat(gate + col, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] *= Silu(g[i]);
  }
}

template <typename T, typename TW, int kVec>
__device__ __forceinline__ void ScaleAndStore(T* out, const TW* weight, int col, float rstd,
                                              float (&h)[kVec]) {
  float w[kVec];
  LoadAsFloat(weight + col, w);
#pragma unroll
  for (int i = 0; i < kVec; ++i) h[i] = h[i] * rstd * w[i];
  StoreFromFloat(out + col, h);
}

template <typename T, typename TW, bool kHasGate, int kVec>
__global__ void __launch_bounds__(kMaxThreads) RMSNormKernel(const RMSNormParams p) {
  static_assert(kVec == 1 || sizeof(T) * kVec == 16, "vector accesses are 16 bytes of x");
  __shared__ float scratch[32];

  // 32-bit index math inside a row (Launch checks the bounds): a 64-bit division is a called
  // subroutine that costs registers and a stack frame.
  const int groups_per_row = static_cast<int>(p.n / p.group_size);
  const int row = static_cast<int>(blockIdx.x) / groups_per_row;
  const int first_col =
      (static_cast<int>(blockIdx.x) - row * groups_per_row) * static_cast<int>(p.group_size);
  const int vecs = static_cast<int>(p.group_size) / kVec;
  const int stride = blockDim.x;

  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride + first_col;
  const T* gate =
      kHasGate ? static_cast<const T*>(p.gate) + row * p.gate_row_stride + first_col : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.out_row_stride + first_col;
  const TW* weight = static_cast<const TW*>(p.weight) + first_col;

  // Pass 1: sum of squares; the first kCachedVecsPerThread vectors stay in registers.
  float h[kCachedVecsPerThread][kVec];
  float sum_sq = 0.f;
#pragma unroll
  for (int c = 0; c < kCachedVecsPerThread; ++c) {
    const int v = threadIdx.x + c * stride;
    if (v < vecs) {
      LoadGated<T, kHasGate>(x, gate, v * kVec, h[c]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum_sq += h[c][i] * h[c][i];
    }
  }
  for (int v = threadIdx.x + kCachedVecsPerThread * stride; v < vecs; v += stride) {
    float t[kVec];
    LoadGated<T, kHasGate>(x, gate, v * kVec, t);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum_sq += t[i] * t[i];
  }

  const float rstd =
      rsqrtf(BlockReduceSum(sum_sq, scratch) / static_cast<float>(p.group_size) + p.eps);

  // Pass 2: normalise, scale, store. Each element is written by the thread that read it, after its
  // last read, so out == x (in place) is safe.
#pragma unroll
  for (int c = 0; c < kCachedVecsPerThread; ++c) {
    const int v = threadIdx.x + c * stride;
    if (v < vecs) ScaleAndStore(out, weight, v * kVec, rstd, h[c]);
  }
  for (int v = threadIdx.x + kCachedVecsPerThread * stride; v < vecs; v += stride) {
    float t[kVec];
    LoadGated<T, kHasGate>(x, gate, v * kVec, t);
    ScaleAndStore(out, weight, v * kVec, rstd, t);
  }
}

// Largest rows * (n / group_size) and n that Launch accepts (grid size, 32-bit in-row indices).
constexpr int64_t kMaxSegments = INT_MAX;
constexpr int64_t kMaxRowLength = INT_MAX;

template <typename T, typename TW, bool kHasGate, int kVec>
cudaError_t Launch(const RMSNormParams& p, cudaStream_t stream) {
  const int64_t num_segments = p.rows * (p.n / p.group_size);
  if (num_segments == 0) return cudaSuccess;
  if (num_segments > kMaxSegments || p.n > kMaxRowLength) return cudaErrorInvalidValue;
  // One vector per thread while the group allows it: small row counts (16 rows per denoise step
  // at batch 1) are latency-bound, so spread each group over as many threads as possible.
  const int64_t vecs = p.group_size / kVec;
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (vecs + 31) / 32 * 32)));
  RMSNormKernel<T, TW, kHasGate, kVec>
      <<<static_cast<unsigned>(num_segments), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// 16-byte accesses need every row start and every group start 16-byte aligned.
template <typename T, typename TW>
bool CanVectorize(const RMSNormParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  const bool pointers = IsAligned(p.x, 16) && IsAligned(p.out, 16) && IsAligned(p.weight, 16) &&
                        (p.gate == nullptr || IsAligned(p.gate, 16));
  const bool strides = p.x_row_stride % kVec == 0 && p.out_row_stride % kVec == 0 &&
                       (p.gate == nullptr || p.gate_row_stride % kVec == 0);
  return pointers && strides && p.group_size % kVec == 0;
}

}  // namespace rmsnorm

// Host launcher. Assumes sizes were validated (csrc/rmsnorm.cu does it); returns the launch's
// error, cudaErrorInvalidValue for an unknown dtype code.
inline cudaError_t RMSNorm(const RMSNormParams& p, cudaStream_t stream) {
  return TWOTOWER_RT_DTYPE_SWITCH(p.dtype, T, [&] {
    return TWOTOWER_RT_DTYPE_SWITCH(p.weight_dtype, TW, [&] {
      return TWOTOWER_RT_BOOL_SWITCH(p.gate != nullptr, kHasGate, [&] {
        if (rmsnorm::CanVectorize<T, TW>(p)) {
          return rmsnorm::Launch<T, TW, kHasGate, 16 / sizeof(T)>(p, stream);
        }
        return rmsnorm::Launch<T, TW, kHasGate, 1>(p, stream);
      });
    });
  });
}

}  // namespace twotower_rt
