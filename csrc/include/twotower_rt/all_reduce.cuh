// Custom all-reduce for 2-8 GPUs of one node over CUDA IPC buffers (tensor parallelism's
// row-parallel layers end in one). Every rank runs the same kernel on the same shape:
//
//   one-shot:  copy my input into my IPC buffer; barrier; out = sum over ranks 0..N-1 of every
//              rank's buffer (fp32 accumulation, rank order); barrier.
//   two-shot:  copy in; barrier; reduce my 1/N of each block's chunk from all ranks (rank order)
//              into my buffer; barrier; gather every rank's reduced part into out; barrier.
//
// Results are bitwise identical on all ranks: one-shot adds the same values in the same order
// everywhere, two-shot computes each element once and copies it. The copy-in makes the op
// independent of where the input lives, so it is safe inside a CUDA graph; the barriers' flag values
// come from a per-block counter in device memory (not from the host), so a replayed graph keeps
// counting. The closing barrier keeps the next call's copy-in from overwriting a buffer a slower
// peer is still reading.
//
// Barrier: block j of every rank works on the same chunk j, so blocks synchronise pairwise per
// block: thread t < N stores the flag into rank t's slot for me (st.release.sys) and spins until
// rank t's flag for block j reaches the same value in my slot (ld.acquire.sys). Peer data is read
// with ld.global.cg (L2, not a possibly stale L1).
//
// Floor. One-shot moves N x bytes in per rank (N - 1 over NVLink) and is latency-bound for the
// model's 16 x 2688 bf16 (86 KB): two barriers plus one read pass. Two-shot moves 2 (N - 1) / N x
// bytes over the links, for larger messages.
//
// Layout of each rank's IPC allocation: AllReduceSignals, then the data buffer (AllReduceBufferBytes
// of it at most, 16-byte aligned).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "twotower_rt/common.cuh"

namespace twotower_rt {

constexpr int kAllReduceMaxRanks = 8;
constexpr int kAllReduceMaxBlocks = 36;
constexpr int kAllReduceThreads = 512;

struct alignas(128) AllReduceSignals {
  uint32_t start[kAllReduceMaxBlocks][kAllReduceMaxRanks];
  uint32_t middle[kAllReduceMaxBlocks][kAllReduceMaxRanks];
  uint32_t end[kAllReduceMaxBlocks][kAllReduceMaxRanks];
  uint32_t counter[kAllReduceMaxBlocks];  // this rank's calls so far, per block
};

// Bytes before the data buffer in each rank's allocation.
constexpr int64_t kAllReduceSignalBytes = (sizeof(AllReduceSignals) + 4095) / 4096 * 4096;

enum class AllReduceAlgo : int { kOneShot = 0, kTwoShot = 1 };

struct AllReduceParams {
  // Each rank's allocation as mapped in this process (signals at offset 0, data after them).
  char* ranks[kAllReduceMaxRanks];
  const void* input;  // this rank's input, `numel` elements, 16-byte aligned
  void* output;       // may be the input
  int64_t numel;      // multiple of 16 bytes' worth of elements
  int rank;
  int world;
  DType dtype;
  AllReduceAlgo algo;
};

namespace all_reduce {

__device__ __forceinline__ void StoreRelease(uint32_t* addr, uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ uint32_t LoadAcquire(const uint32_t* addr) {
  uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(addr) : "memory");
  return value;
}

__device__ __forceinline__ uint4 LoadPeer(const uint4* addr) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(addr));
  return v;
}

// p.ranks[rank] by selects over constant indices: indexing the kernel-parameter array with a runtime
// index would copy it to local memory.
__device__ __forceinline__ char* RankBase(const AllReduceParams& p, int rank) {
  char* base = p.ranks[0];
#pragma unroll
  for (int r = 1; r < kAllReduceMaxRanks; ++r) base = rank == r ? p.ranks[r] : base;
  return base;
}

__device__ __forceinline__ AllReduceSignals* Signals(const AllReduceParams& p, int rank) {
  return reinterpret_cast<AllReduceSignals*>(RankBase(p, rank));
}

__device__ __forceinline__ uint4* Data(const AllReduceParams& p, int rank) {
  return reinterpret_cast<uint4*>(RankBase(p, rank) + kAllReduceSignalBytes);
}

// Phase 0, 1, 2: start, middle, end. Every thread of the block must call it.
__device__ __forceinline__ void Barrier(const AllReduceParams& p, int phase, uint32_t flag) {
  __syncthreads();  // the block's writes before the barrier come first
  const int t = threadIdx.x;
  if (t < p.world) {
    AllReduceSignals* peer = Signals(p, t);
    AllReduceSignals* self = Signals(p, p.rank);
    uint32_t(*peer_slots)[kAllReduceMaxRanks] =
        phase == 0 ? peer->start : (phase == 1 ? peer->middle : peer->end);
    uint32_t(*self_slots)[kAllReduceMaxRanks] =
        phase == 0 ? self->start : (phase == 1 ? self->middle : self->end);
    StoreRelease(&peer_slots[blockIdx.x][p.rank], flag);
    while (LoadAcquire(&self_slots[blockIdx.x][t]) != flag) {
    }
  }
  __syncthreads();
}

// Sum of `world` 16-byte vectors of T in fp32, rank order, back to T.
template <typename T>
struct VecSum {
  static constexpr int kN = 16 / sizeof(T);
  float acc[kN];
  __device__ __forceinline__ void Set(const uint4& v) {
    const T* x = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) acc[i] = ToFloat(x[i]);
  }
  __device__ __forceinline__ void Add(const uint4& v) {
    const T* x = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) acc[i] += ToFloat(x[i]);
  }
  __device__ __forceinline__ uint4 Get() const {
    uint4 v;
    T* x = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) x[i] = FromFloat<T>(acc[i]);
    return v;
  }
};

template <typename T>
__device__ __forceinline__ uint4 ReduceVector(const AllReduceParams& p, int64_t v) {
  // All loads first (up to 8 in flight), then the adds in rank order.
  uint4 x[kAllReduceMaxRanks];
#pragma unroll
  for (int r = 0; r < kAllReduceMaxRanks; ++r) {
    if (r < p.world) {
      x[r] = LoadPeer(reinterpret_cast<const uint4*>(p.ranks[r] + kAllReduceSignalBytes) + v);
    }
  }
  VecSum<T> sum;
  sum.Set(x[0]);
#pragma unroll
  for (int r = 1; r < kAllReduceMaxRanks; ++r) {
    if (r < p.world) sum.Add(x[r]);
  }
  return sum.Get();
}

template <typename T>
__global__ void __launch_bounds__(kAllReduceThreads) AllReduceKernel(const AllReduceParams p) {
  const int64_t num_vectors = p.numel * static_cast<int64_t>(sizeof(T)) / 16;
  const int64_t per_block = (num_vectors + gridDim.x - 1) / gridDim.x;
  const int64_t begin = blockIdx.x * per_block;
  const int64_t end = min(num_vectors, begin + per_block);
  const uint4* input = reinterpret_cast<const uint4*>(p.input);
  uint4* output = reinterpret_cast<uint4*>(p.output);
  uint4* own = Data(p, p.rank);
  uint32_t* counter = &Signals(p, p.rank)->counter[blockIdx.x];
  const uint32_t flag = *counter + 1;

  for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) own[v] = input[v];
  Barrier(p, 0, flag);
  if (p.algo == AllReduceAlgo::kOneShot) {
    for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
      output[v] = ReduceVector<T>(p, v);
    }
  } else {
    // Rank r owns part r of the block's chunk: reduce it into its own buffer, then all gather.
    const int64_t part = (end - begin + p.world - 1) / p.world;
    const int64_t mine = begin + p.rank * part;
    for (int64_t v = mine + threadIdx.x; v < min(end, mine + part); v += blockDim.x) {
      own[v] = ReduceVector<T>(p, v);
    }
    Barrier(p, 1, flag);
#pragma unroll
    for (int r = 0; r < kAllReduceMaxRanks; ++r) {
      if (r >= p.world) break;
      const uint4* reduced = reinterpret_cast<const uint4*>(p.ranks[r] + kAllReduceSignalBytes);
      const int64_t theirs = begin + r * part;
      for (int64_t v = theirs + threadIdx.x; v < min(end, theirs + part); v += blockDim.x) {
        output[v] = LoadPeer(reduced + v);
      }
    }
  }
  Barrier(p, 2, flag);
  if (threadIdx.x == 0) *counter = flag;
}

}  // namespace all_reduce

// Blocks for a message: enough 512-thread blocks for one vector per thread, at most 36.
inline int AllReduceBlocks(int64_t bytes) {
  const int64_t vectors = bytes / 16;
  const int64_t blocks = (vectors + kAllReduceThreads - 1) / kAllReduceThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kAllReduceMaxBlocks ? kAllReduceMaxBlocks
                                                                         : blocks));
}

// Host launcher; the caller checked the arguments (csrc/all_reduce.cu).
inline cudaError_t AllReduce(const AllReduceParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  const int64_t bytes = p.numel * (p.dtype == DType::kFloat32 ? 4 : 2);
  const int blocks = AllReduceBlocks(bytes);
  return TWOTOWER_RT_DTYPE_SWITCH(p.dtype, T, [&] {
    all_reduce::AllReduceKernel<T><<<blocks, kAllReduceThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace twotower_rt
