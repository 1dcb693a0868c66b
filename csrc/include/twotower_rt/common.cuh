// Shared pieces of the twotower_rt kernels: dtype codes, the *_SWITCH macros that turn runtime
// choices into template parameters, vector types for 16-byte accesses, and block reductions.
// No torch and no pybind11 here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace twotower_rt {

// Element types crossing the Python boundary. The Python side maps torch dtypes to these codes
// (twotower_rt._C.DTYPE_*); keep the numbers stable.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

inline bool IsValidDType(int code) { return code == 0 || code == 1; }

inline const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

}  // namespace twotower_rt

// Runtime dtype -> `using TYPE = ...` inside the lambda body. The launchers return cudaError_t, so
// an unknown code becomes cudaErrorInvalidValue (csrc/*.cu validate codes before calling, with a
// message; reaching the default means a caller skipped that check).
#define TWOTOWER_RT_DTYPE_SWITCH(DTYPE, TYPE, ...) \
  [&]() -> cudaError_t {                           \
    switch (DTYPE) {                               \
      case ::twotower_rt::DType::kFloat32: {       \
        using TYPE = float;                        \
        return __VA_ARGS__();                      \
      }                                            \
      case ::twotower_rt::DType::kBFloat16: {      \
        using TYPE = __nv_bfloat16;                \
        return __VA_ARGS__();                      \
      }                                            \
      default:                                     \
        return cudaErrorInvalidValue;              \
    }                                              \
  }()

#define TWOTOWER_RT_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&]() -> cudaError_t {                               \
    if (COND) {                                        \
      constexpr static bool CONST_NAME = true;         \
      return __VA_ARGS__();                            \
    } else {                                           \
      constexpr static bool CONST_NAME = false;        \
      return __VA_ARGS__();                            \
    }                                                  \
  }()

namespace twotower_rt {

// N elements of T moved as one access. Alignment is capped at 16 bytes: wider arrays (8 floats
// when a bf16 row meets an fp32 weight) become two 16-byte accesses, so callers only ever need
// 16-byte-aligned base pointers.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Array {
  T data[N];
};

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
__device__ __forceinline__ void LoadAsFloat(const T* ptr, float (&dst)[N]) {
  const Array<T, N> v = *reinterpret_cast<const Array<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = ToFloat(v.data[i]);
}

template <typename T, int N>
__device__ __forceinline__ void StoreFromFloat(T* ptr, const float (&src)[N]) {
  Array<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.data[i] = FromFloat<T>(src[i]);
  *reinterpret_cast<Array<T, N>*>(ptr) = v;
}

// Butterfly reduction: every lane ends with the same, bitwise-identical sum (each level adds the
// same two partials, only in swapped order, and fp addition is commutative).
__device__ __forceinline__ float WarpReduceSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32 (full-mask
// shuffles) and at most 1024; `scratch` holds 32 floats of shared memory. The order of additions is
// fixed by the launch shape, so equal inputs give bitwise-equal results.
__device__ __forceinline__ float BlockReduceSum(float v, float* scratch) {
  v = WarpReduceSum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.f;
  return WarpReduceSum(v);
}

inline bool IsAligned(const void* ptr, int bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

}  // namespace twotower_rt
