// Launchers for twotower_rt._C.moe_grouped_gemm and moe_grouped_gemm_fp8: check what Python hands
// over (pointers as integers, sizes, a stream), run include/twotower_rt/moe_gemm.cuh's grouped GEMM
// (bf16 weights) or moe_gemm_fp8.cuh's (FP8 weights) and turn every CUDA error into an exception
// naming the op. Both take an optional extra group (the MoE's shared expert folded in): its A, W
// (and FP8 scales), D, rows, n, k and row strides; extra_w == 0 means none.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/moe_gemm.cuh"
#include "twotower_rt/moe_gemm_fp8.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kOp = "twotower_rt._C.moe_grouped_gemm";
constexpr const char* kOpFp8 = "twotower_rt._C.moe_grouped_gemm_fp8";

int SmCount(int device, const char* op = kOp) {
  int count = 0;
  CheckCuda(op, cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
            "cudaDeviceGetAttribute");
  return count;
}

MoeEpilogue CheckEpilogue(int epilogue, const char* op = kOp) {
  if (epilogue != 0 && epilogue != 1) ThrowInvalid(op, "epilogue must be 0 (none) or 1 (relu^2)");
  return static_cast<MoeEpilogue>(epilogue);
}

// The extra group's arguments (both ops); false when there is none (extra_w == 0). k_multiple:
// 8 for bf16 weights, 16 for e4m3 (16-byte rows either way).
bool CheckExtraGroup(const char* op, std::uintptr_t a, std::uintptr_t w, std::uintptr_t d,
                     int64_t rows, int64_t n, int64_t k, int64_t lda, int64_t ldd,
                     int k_multiple) {
  if (w == 0) return false;
  for (std::uintptr_t ptr : {a, w, d}) {
    if (ptr == 0 || ptr % 16 != 0) {
      ThrowInvalid(op, "the extra group's a, w and d must be non-null, 16-byte aligned");
    }
  }
  if (rows < 0 || rows > (int64_t{1} << 30)) {
    ThrowInvalid(op, "extra_rows must be in [0, 2^30], got " + std::to_string(rows));
  }
  if (n <= 0 || k <= 0 || n % 8 != 0 || k % k_multiple != 0 || n > (1 << 30) || k > (1 << 30)) {
    ThrowInvalid(op, "extra_n must be a positive multiple of 8 and extra_k of " +
                         std::to_string(k_multiple) + " (16-byte rows), got extra_n=" +
                         std::to_string(n) + ", extra_k=" + std::to_string(k));
  }
  if (lda < k || ldd < n || lda % 8 != 0 || ldd % 8 != 0) {
    ThrowInvalid(op, "extra_lda must be >= extra_k and extra_ldd >= extra_n, both multiples of 8 "
                     "(16-byte rows), got extra_lda=" + std::to_string(lda) +
                         ", extra_ldd=" + std::to_string(ldd));
  }
  return true;
}

// Both ops' main groups: sizes (k_multiple as for the extra group), the device, the operand
// pointers (non-null, 16-byte aligned), the workspace and the offsets.
void CheckMainGroups(const char* op, int64_t experts, int64_t n, int64_t k, int k_multiple,
                     int device, std::initializer_list<std::uintptr_t> operands,
                     std::uintptr_t workspace, std::uintptr_t offsets) {
  if (experts <= 0 || experts > 65536) ThrowInvalid(op, "experts must be in [1, 65536]");
  if (n <= 0 || k <= 0 || n % 8 != 0 || k % k_multiple != 0) {
    ThrowInvalid(op, "n must be a positive multiple of 8 and k of " + std::to_string(k_multiple) +
                         " (16-byte rows), got n=" + std::to_string(n) +
                         ", k=" + std::to_string(k));
  }
  if (device < 0) ThrowInvalid(op, "device index must be >= 0");
  for (std::uintptr_t ptr : operands) {
    if (ptr == 0 || ptr % 16 != 0) {
      ThrowInvalid(op, "the operands (a, w, scales, d) must be non-null, 16-byte aligned");
    }
  }
  if (workspace == 0 || workspace % 256 != 0) {
    ThrowInvalid(op, "the workspace must be non-null and 256-byte aligned");
  }
  if (offsets == 0) ThrowInvalid(op, "offsets must be non-null");
}

}  // namespace

int64_t MoeGemmWorkspaceOp(int64_t experts, int epilogue, int device, bool extra_group) {
  if (experts <= 0 || experts > 65536) ThrowInvalid(kOp, "experts must be in [1, 65536]");
  ScopedDevice guard(kOp, device);
  return MoeGemmWorkspaceBytes(static_cast<int>(experts) + (extra_group ? 1 : 0), SmCount(device),
                               CheckEpilogue(epilogue));
}

void MoeGroupedGemmOp(std::uintptr_t a, std::uintptr_t w, std::uintptr_t offsets, std::uintptr_t d,
                      std::uintptr_t workspace, int64_t workspace_bytes, int64_t experts,
                      int64_t n, int64_t k, int epilogue, int device, std::uintptr_t stream,
                      std::uintptr_t extra_a, std::uintptr_t extra_w, std::uintptr_t extra_d,
                      int64_t extra_rows, int64_t extra_n, int64_t extra_k, int64_t extra_lda,
                      int64_t extra_ldd) {
  const MoeEpilogue epi = CheckEpilogue(epilogue);
  const bool has_extra = CheckExtraGroup(kOp, extra_a, extra_w, extra_d, extra_rows, extra_n,
                                         extra_k, extra_lda, extra_ldd, 8);
  CheckMainGroups(kOp, experts, n, k, 8, device, {a, w, d}, workspace, offsets);
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
  if (has_extra) {
    p.extra.a = reinterpret_cast<const __nv_bfloat16*>(extra_a);
    p.extra.w = reinterpret_cast<const __nv_bfloat16*>(extra_w);
    p.extra.d = reinterpret_cast<__nv_bfloat16*>(extra_d);
    p.extra.rows = static_cast<int>(extra_rows);
    p.extra.n = static_cast<int>(extra_n);
    p.extra.k = static_cast<int>(extra_k);
    p.extra.lda = extra_lda;
    p.extra.ldd = extra_ldd;
  }
  if (workspace_bytes < MoeGemmWorkspaceBytes(MoeGemmGroups(p), p.sm_count, epi)) {
    ThrowInvalid(kOp, "workspace of " + std::to_string(workspace_bytes) + " bytes is too small");
  }
  CheckCuda(kOp, MoeGroupedGemm(p, epi, reinterpret_cast<cudaStream_t>(stream)), "grouped GEMM");
}

int64_t MoeGemmFp8WorkspaceOp(int64_t experts, int epilogue, int device, bool extra_group) {
  if (experts <= 0 || experts > 65536) ThrowInvalid(kOpFp8, "experts must be in [1, 65536]");
  ScopedDevice guard(kOpFp8, device);
  return MoeGemmFp8WorkspaceBytes(static_cast<int>(experts) + (extra_group ? 1 : 0),
                                  SmCount(device, kOpFp8), CheckEpilogue(epilogue, kOpFp8));
}

void MoeGroupedGemmFp8Op(std::uintptr_t a, std::uintptr_t w, std::uintptr_t scales,
                         std::uintptr_t offsets, std::uintptr_t d, std::uintptr_t workspace,
                         int64_t workspace_bytes, int64_t experts, int64_t n, int64_t k,
                         int64_t group_size, int epilogue, int device, std::uintptr_t stream,
                         std::uintptr_t extra_a, std::uintptr_t extra_w,
                         std::uintptr_t extra_scales, std::uintptr_t extra_d, int64_t extra_rows,
                         int64_t extra_n, int64_t extra_k, int64_t extra_lda, int64_t extra_ldd) {
  const MoeEpilogue epi = CheckEpilogue(epilogue, kOpFp8);
  const bool has_extra = CheckExtraGroup(kOpFp8, extra_a, extra_w, extra_d, extra_rows, extra_n,
                                         extra_k, extra_lda, extra_ldd, 16);
  if (has_extra && (extra_scales == 0 || extra_scales % 16 != 0)) {
    ThrowInvalid(kOpFp8, "extra_scales must be non-null, 16-byte aligned");
  }
  // One chunk_size for every group (moe_gemm_fp8.cuh): a wider extra K is read in k-tile chunks.
  if (has_extra && extra_k > group_size && group_size % kMoeFp8TileK != 0) {
    ThrowInvalid(kOpFp8, "an extra group with extra_k=" + std::to_string(extra_k) +
                             " > group_size=" + std::to_string(group_size) +
                             " needs group_size to be a multiple of " +
                             std::to_string(kMoeFp8TileK) + " (its scales are read per chunk)");
  }
  // k: 16-byte rows of e4m3 weights (and of bf16 tokens); n: 16-byte rows of bf16 output.
  CheckMainGroups(kOpFp8, experts, n, k, 16, device, {a, w, scales, d}, workspace, offsets);
  if (group_size != k && (group_size <= 0 || group_size % kMoeFp8TileK != 0)) {
    ThrowInvalid(kOpFp8, "group_size (input columns per scale) must be k=" + std::to_string(k) +
                             " (per-channel scales) or a positive multiple of " +
                             std::to_string(kMoeFp8TileK) + ", got " +
                             std::to_string(group_size));
  }
  ScopedDevice guard(kOpFp8, device);
  MoeGemmFp8Params p{};
  p.a = reinterpret_cast<const __nv_bfloat16*>(a);
  p.w = reinterpret_cast<const uint8_t*>(w);
  p.scales = reinterpret_cast<const float*>(scales);
  p.offsets = reinterpret_cast<const int32_t*>(offsets);
  p.d = reinterpret_cast<__nv_bfloat16*>(d);
  p.workspace = reinterpret_cast<void*>(workspace);
  p.workspace_bytes = workspace_bytes;
  p.experts = static_cast<int>(experts);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.group_size = static_cast<int>(group_size);
  p.sm_count = SmCount(device, kOpFp8);
  p.device = device;
  if (has_extra) {
    p.extra.a = reinterpret_cast<const __nv_bfloat16*>(extra_a);
    p.extra.w = reinterpret_cast<const uint8_t*>(extra_w);
    p.extra.scales = reinterpret_cast<const float*>(extra_scales);
    p.extra.d = reinterpret_cast<__nv_bfloat16*>(extra_d);
    p.extra.rows = static_cast<int>(extra_rows);
    p.extra.n = static_cast<int>(extra_n);
    p.extra.k = static_cast<int>(extra_k);
    p.extra.lda = extra_lda;
    p.extra.ldd = extra_ldd;
  }
  if (workspace_bytes < MoeGemmFp8WorkspaceBytes(MoeGemmFp8Groups(p), p.sm_count, epi)) {
    ThrowInvalid(kOpFp8, "workspace of " + std::to_string(workspace_bytes) + " bytes is too small");
  }
  CheckCuda(kOpFp8, MoeGroupedGemmFp8(p, epi, reinterpret_cast<cudaStream_t>(stream)),
            "grouped GEMM");
}

}  // namespace twotower_rt
