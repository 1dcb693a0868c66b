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
// expert's weights are read once, 10 MB per expert and projection pair, so 16 tokens (~70 experts)
// stream ~0.7 GB and 256+ tokens all 1.28 GB per layer: 0.3 ms at 4 TB/s. FLOPs 2 * tokens * 6 *
// 1856 * 2688 * 2 are below the bandwidth time up to ~1000 tokens per forward.
//
// Status: compiled; never yet run on a GPU (tests/test_moe.py's GPU tests, bench/run.py moe).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace twotower_rt {

struct MoeGemmParams {
  const __nv_bfloat16* a;  // [rows, k] row-major, rows sorted by expert
  const __nv_bfloat16* w;  // [experts, n, k] row-major
  const int32_t* offsets;  // [experts] cumulative row counts (the end of each expert's rows)
  __nv_bfloat16* d;        // [rows, n] row-major
  void* workspace;         // MoeGemmWorkspaceBytes(experts)
  int64_t workspace_bytes;
  int experts, n, k;
  int sm_count;
  int device;
};

enum class MoeEpilogue : int { kIdentity = 0, kRelu2 = 1 };

// One heavy CUTLASS instantiation per translation unit: csrc/moe_gemm_up.cu (relu^2) and
// csrc/moe_gemm_down.cu (identity) define these from include/twotower_rt/moe_gemm_impl.cuh.
int64_t MoeGemmWorkspaceBytesRelu2(int experts, int sm_count);
int64_t MoeGemmWorkspaceBytesIdentity(int experts, int sm_count);
cudaError_t MoeGroupedGemmRelu2(const MoeGemmParams& p, cudaStream_t stream);
cudaError_t MoeGroupedGemmIdentity(const MoeGemmParams& p, cudaStream_t stream);

// Bytes of workspace for `experts` groups: the device-side problem list plus CUTLASS's own.
inline int64_t MoeGemmWorkspaceBytes(int experts, int sm_count, MoeEpilogue epilogue) {
  return epilogue == MoeEpilogue::kRelu2 ? MoeGemmWorkspaceBytesRelu2(experts, sm_count)
                                         : MoeGemmWorkspaceBytesIdentity(experts, sm_count);
}

// The setup kernel and the grouped GEMM on `stream`.
inline cudaError_t MoeGroupedGemm(const MoeGemmParams& p, MoeEpilogue epilogue,
                                  cudaStream_t stream) {
  return epilogue == MoeEpilogue::kRelu2 ? MoeGroupedGemmRelu2(p, stream)
                                         : MoeGroupedGemmIdentity(p, stream);
}

}  // namespace twotower_rt
