// Launchers for twotower_rt._C's custom all-reduce: the IPC allocation (cudaMalloc + handle), the
// opening and closing of peers' handles, and the kernel of include/twotower_rt/all_reduce.cuh.
// Every CUDA error becomes an exception naming the call.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/all_reduce.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kOp = "twotower_rt._C.all_reduce";

}  // namespace

int64_t AllReduceSignalBytesOp() { return kAllReduceSignalBytes; }

// A zeroed allocation of signals + `buffer_bytes` on `device`, and its IPC handle (raw bytes).
std::pair<std::uintptr_t, std::string> AllReduceAllocateOp(int64_t buffer_bytes, int device) {
  const char* op = "twotower_rt._C.all_reduce_allocate";
  if (buffer_bytes <= 0 || buffer_bytes % 16 != 0) {
    ThrowInvalid(op, "buffer_bytes must be a positive multiple of 16, got " +
                         std::to_string(buffer_bytes));
  }
  ScopedDevice guard(op, device);
  void* ptr = nullptr;
  const size_t total = static_cast<size_t>(kAllReduceSignalBytes + buffer_bytes);
  CheckCuda(op, cudaMalloc(&ptr, total), "cudaMalloc");
  cudaError_t err = cudaMemset(ptr, 0, total);
  cudaIpcMemHandle_t handle;
  if (err == cudaSuccess) err = cudaIpcGetMemHandle(&handle, ptr);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    cudaFree(ptr);
    CheckCuda(op, err, "cudaMemset / cudaIpcGetMemHandle");
  }
  return {reinterpret_cast<std::uintptr_t>(ptr),
          std::string(reinterpret_cast<const char*>(&handle), sizeof(handle))};
}

std::uintptr_t AllReduceOpenHandleOp(const std::string& handle_bytes, int device) {
  const char* op = "twotower_rt._C.all_reduce_open_handle";
  cudaIpcMemHandle_t handle;
  if (handle_bytes.size() != sizeof(handle)) {
    ThrowInvalid(op, "an IPC handle is " + std::to_string(sizeof(handle)) + " bytes, got " +
                         std::to_string(handle_bytes.size()));
  }
  std::memcpy(&handle, handle_bytes.data(), sizeof(handle));
  ScopedDevice guard(op, device);
  void* ptr = nullptr;
  CheckCuda(op, cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess),
            "cudaIpcOpenMemHandle");
  return reinterpret_cast<std::uintptr_t>(ptr);
}

void AllReduceCloseHandleOp(std::uintptr_t ptr, int device) {
  const char* op = "twotower_rt._C.all_reduce_close_handle";
  ScopedDevice guard(op, device);
  CheckCuda(op, cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)), "cudaIpcCloseMemHandle");
}

void AllReduceFreeOp(std::uintptr_t ptr, int device) {
  const char* op = "twotower_rt._C.all_reduce_free";
  ScopedDevice guard(op, device);
  CheckCuda(op, cudaFree(reinterpret_cast<void*>(ptr)), "cudaFree");
}

void AllReduceOp(const std::vector<std::uintptr_t>& ranks, std::uintptr_t input,
                 std::uintptr_t output, int64_t numel, int64_t buffer_bytes, int rank, int dtype,
                 int algo, int device, std::uintptr_t stream) {
  const int world = static_cast<int>(ranks.size());
  if (world < 2 || world > kAllReduceMaxRanks) {
    ThrowInvalid(kOp, "needs 2 to " + std::to_string(kAllReduceMaxRanks) + " ranks, got " +
                          std::to_string(world));
  }
  if (rank < 0 || rank >= world) ThrowInvalid(kOp, "rank out of range");
  if (!IsValidDType(dtype)) ThrowInvalid(kOp, "unknown dtype code " + std::to_string(dtype));
  if (algo != 0 && algo != 1) ThrowInvalid(kOp, "algo must be 0 (one-shot) or 1 (two-shot)");
  const int64_t element = dtype == 0 ? 4 : 2;
  if (numel < 0 || (numel * element) % 16 != 0) {
    ThrowInvalid(kOp, "the message must be a multiple of 16 bytes, got " +
                          std::to_string(numel * element));
  }
  if (numel * element > buffer_bytes) {
    ThrowInvalid(kOp, "message of " + std::to_string(numel * element) +
                          " bytes exceeds the IPC buffer of " + std::to_string(buffer_bytes));
  }
  if (numel == 0) return;
  for (std::uintptr_t ptr : ranks) {
    if (ptr == 0 || ptr % 128 != 0) ThrowInvalid(kOp, "rank buffers must be non-null, aligned");
  }
  if (input == 0 || output == 0 || input % 16 != 0 || output % 16 != 0) {
    ThrowInvalid(kOp, "input and output must be non-null and 16-byte aligned");
  }
  AllReduceParams p{};
  for (int r = 0; r < world; ++r) p.ranks[r] = reinterpret_cast<char*>(ranks[r]);
  p.input = reinterpret_cast<const void*>(input);
  p.output = reinterpret_cast<void*>(output);
  p.numel = numel;
  p.rank = rank;
  p.world = world;
  p.dtype = static_cast<DType>(dtype);
  p.algo = static_cast<AllReduceAlgo>(algo);
  ScopedDevice guard(kOp, device);
  CheckCuda(kOp, AllReduce(p, reinterpret_cast<cudaStream_t>(stream)), "kernel launch");
}

}  // namespace twotower_rt
