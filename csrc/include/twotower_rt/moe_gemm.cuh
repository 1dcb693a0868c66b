// Grouped GEMM of the routed experts (TWOTOWER.md section 2, MoE): tokens already sorted by
// expert, expert e owning rows [offsets[e-1], offsets[e]) of A, computes for every expert
//
//   D[rows of e] = epilogue(A[rows of e] (M_e x K) . W[e]^T),   W (E, N, K) row-major (nn.Linear)
//
// with epilogue relu(x)^2 in fp32 before the one rounding to bf16 (the experts' `up`), or the
// identity (`down`). One CUTLASS 3 grouped GEMM on Hopper: pointer-array problem list, TMA loads,
// warp-specialized cooperative wgmma mainloop, bf16 in and out, fp32 accumulation, tile 128x128x64.
// The per-expert problem sizes, pointers and strides are written on the device by a setup kernel
// from the offsets, and the GEMM reads them there (no host-side problem shapes), so nothing crosses
// to the host and the pair captures into a CUDA graph.
//
// Floor (real model: E = 128, N x K = 1856 x 2688 up, 2688 x 1856 down, bf16): every touched
// expert's weights are read once, 20 MB per expert (10 MB per projection), so 16 tokens (~70
// experts) stream ~1.4 GB and 256+ tokens all 2.55 GB per layer: 0.64 ms at 4 TB/s. FLOPs
// 2 * tokens * 6 * 1856 * 2688 * 2 are below the bandwidth time up to ~1000 tokens per forward.
//
// The shared expert folds in as one extra group (MoeGemmExtraGroup, group index `experts`): its
// own A (every token, in token order), weight, output and sizes (N = 3712 up / K = 3712 down), so
// one launch streams the routed and the shared weights (+ 2 x 3712 x 2688 x 2 B = 40 MB per layer,
// always read: 16 tokens then stream ~1.44 GB, 256+ tokens 2.59 GB).
//
// ptxas (CUDA 13.0, sm_90a): the GEMM kernel 168 registers, no spills, for either epilogue; the
// setup kernel 32 registers.
//
// Status: compiled; never yet run on a GPU (tests/test_moe.py's GPU tests, bench/run.py moe).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace twotower_rt {

// One more group after the experts' (group index `experts`) with its own buffers and sizes:
//   D_x (rows x n) = epilogue(A_x (rows x k) . W_x^T),   W_x (n, k) row-major
// with the experts' epilogue. The MoE's shared expert: every token (rows = T, in token order),
// weight its own up_proj / down_proj weight, output to its own buffer. w == nullptr: none.
struct MoeGemmExtraGroup {
  const __nv_bfloat16* a = nullptr;  // [rows, k], row stride lda
  const __nv_bfloat16* w = nullptr;  // [n, k] row-major
  __nv_bfloat16* d = nullptr;        // [rows, n], row stride ldd
  int rows = 0, n = 0, k = 0;
  int64_t lda = 0, ldd = 0;
};

struct MoeGemmParams {
  const __nv_bfloat16* a;  // [rows, k] row-major, rows sorted by expert
  const __nv_bfloat16* w;  // [experts, n, k] row-major
  const int32_t* offsets;  // [experts] cumulative row counts (the end of each expert's rows)
  __nv_bfloat16* d;        // [rows, n] row-major
  void* workspace;         // MoeGemmWorkspaceBytes(MoeGemmGroups(p))
  int64_t workspace_bytes;
  int experts, n, k;
  int sm_count;
  int device;
  MoeGemmExtraGroup extra;  // optional: the shared expert
};

// Groups the GEMM runs: the experts, plus the extra group when there is one.
__host__ __device__ inline int MoeGemmGroups(const MoeGemmParams& p) {
  return p.experts + (p.extra.w != nullptr ? 1 : 0);
}

enum class MoeEpilogue : int { kIdentity = 0, kRelu2 = 1 };

// One heavy CUTLASS instantiation per translation unit: csrc/moe_gemm_up.cu (relu^2) and
// csrc/moe_gemm_down.cu (identity) define these from include/twotower_rt/moe_gemm_impl.cuh.
int64_t MoeGemmWorkspaceBytesRelu2(int groups, int sm_count);
int64_t MoeGemmWorkspaceBytesIdentity(int groups, int sm_count);
cudaError_t MoeGroupedGemmRelu2(const MoeGemmParams& p, cudaStream_t stream);
cudaError_t MoeGroupedGemmIdentity(const MoeGemmParams& p, cudaStream_t stream);

// Bytes of workspace for `groups` groups (experts, + 1 with an extra group): the device-side
// problem list plus CUTLASS's own.
inline int64_t MoeGemmWorkspaceBytes(int groups, int sm_count, MoeEpilogue epilogue) {
  return epilogue == MoeEpilogue::kRelu2 ? MoeGemmWorkspaceBytesRelu2(groups, sm_count)
                                         : MoeGemmWorkspaceBytesIdentity(groups, sm_count);
}

// The setup kernel and the grouped GEMM on `stream`.
inline cudaError_t MoeGroupedGemm(const MoeGemmParams& p, MoeEpilogue epilogue,
                                  cudaStream_t stream) {
  return epilogue == MoeEpilogue::kRelu2 ? MoeGroupedGemmRelu2(p, stream)
                                         : MoeGroupedGemmIdentity(p, stream);
}

}  // namespace twotower_rt
