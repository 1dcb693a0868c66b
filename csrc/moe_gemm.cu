// Launchers for twotower_rt._C.moe_grouped_gemm: checks what Python hands over (pointers as
// integers, sizes, a stream), runs include/twotower_rt/moe_gemm.cuh's grouped GEMM and turns
// every CUDA error into an exception naming the op.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/moe_gemm.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kOp = "twotower_rt._C.moe_grouped_gemm";

int SmCount(int device) {
  int count = 0;
  CheckCuda(kOp, cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
            "cudaDeviceGetAttribute");
  return count;
}

MoeEpilogue CheckEpilogue(int epilogue) {
  if (epilogue != 0 && epilogue != 1) ThrowInvalid(kOp, "epilogue must be 0 (none) or 1 (relu^2)");
  return static_cast<MoeEpilogue>(epilogue);
}

}  // namespace

int64_t MoeGemmWorkspaceOp(int64_t experts, int epilogue, int device) {
  if (experts <= 0 || experts > 65536) ThrowInvalid(kOp, "experts must be in [1, 65536]");
  ScopedDevice guard(kOp, device);
  return MoeGemmWorkspaceBytes(static_cast<int>(experts), SmCount(device), CheckEpilogue(epilogue));
}

void MoeGroupedGemmOp(std::uintptr_t a, std::uintptr_t w, std::uintptr_t offsets, std::uintptr_t d,
                      std::uintptr_t workspace, int64_t workspace_bytes, int64_t experts,
                      int64_t n, int64_t k, int epilogue, int device, std::uintptr_t stream) {
  const MoeEpilogue epi = CheckEpilogue(epilogue);
  if (experts <= 0 || experts > 65536) ThrowInvalid(kOp, "experts must be in [1, 65536]");
  if (n <= 0 || k <= 0 || n % 8 != 0 || k % 8 != 0) {
    ThrowInvalid(kOp, "n and k must be positive multiples of 8 (16-byte rows), got n=" +
                          std::to_string(n) + ", k=" + std::to_string(k));
  }
  if (device < 0) ThrowInvalid(kOp, "device index must be >= 0");
  for (std::uintptr_t ptr : {a, w, d}) {
    if (ptr == 0 || ptr % 16 != 0) ThrowInvalid(kOp, "a, w and d must be non-null, 16-byte aligned");
  }
  if (workspace == 0 || workspace % 256 != 0) {
    ThrowInvalid(kOp, "the workspace must be non-null and 256-byte aligned");
  }
  if (offsets == 0) ThrowInvalid(kOp, "offsets must be non-null");
  ScopedDevice guard(kOp, device);
  MoeGemmParams p{};
  p.a = reinterpret_cast<const __nv_bfloat16*>(a);
  p.w = reinterpret_cast<const __nv_bfloat16*>(w);
  p.offsets = reinterpret_cast<const int32_t*>(offsets);
  p.d = reinterpret_cast<__nv_bfloat16*>(d);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.workspace_bytes = workspace_bytes;
  p.experts = static_cast<int>(experts);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.sm_count = SmCount(device);
  p.device = device;
  if (workspace_bytes < MoeGemmWorkspaceBytes(p.experts, p.sm_count, epi)) {
    ThrowInvalid(kOp, "workspace of " + std::to_string(workspace_bytes) + " bytes is too small");
  }
  CheckCuda(kOp, MoeGroupedGemm(p, epi, reinterpret_cast<cudaStream_t>(stream)), "grouped GEMM");
}

}  // namespace twotower_rt
