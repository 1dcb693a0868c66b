// Grouped GEMM of the routed experts with FP8 (e4m3) weights: moe_gemm.cuh's problem, but W is
// stored float8_e4m3fn with fp32 scales, and for every expert e (rows [offsets[e-1], offsets[e]))
//
//   D[rows of e] = epilogue(A[rows of e] . Wq[e]^T),   Wq[e][j, c] = bf16(float(W[e][j, c]) * s)
//
// s = scales[e][c / group_size][j] (fp32): one scale per output channel j and per group of
// group_size input columns (group_size == k: per-channel scales). The weight is dequantized exactly
// as the PyTorch path does it (Fp8Linear: e4m3 -> fp32, times the fp32 scale, one rounding to
// bf16), so the kernel differs from x @ dequantize(W).T only in the fp32 accumulation order.
//
// One CUTLASS 3 mixed-input grouped GEMM on Hopper (pointer-array problem list written on the
// device from the offsets, as in moe_gemm.cuh; TMA loads; cooperative warp-specialized mainloop).
// Hopper's wgmma takes a converted operand only from registers and only as its A operand, so the
// kernel computes the transposed product D^T (n x rows) = Wq (n x k) . A^T (k x rows): the FP8
// weight is the MMA's A (K-major, loaded to registers, converted and scaled there), the bf16
// tokens its B (A row-major is B K-major), and D^T column-major is D row-major. Tile: 128 output
// channels x 64 tokens x 64 k; an expert with 0 tokens has no tiles.
//
// Scales arrive in the layout the collective's TMA wants: [experts][ceil(k / group_size)][n],
// output channel fastest (python/twotower_rt/ops/moe.py builds it from the checkpoint's
// (n / rows, k / cols) scales). group_size must be k or a multiple of 64 (the k tile: one scale
// row per k tile).
//
// Floor (real model: E = 128, n x k = 1856 x 2688 up, 2688 x 1856 down): every touched expert's
// weights are read once, 1 byte per weight: 5 MB per expert and projection, 10 MB per expert for
// up + down (per-channel scales add 18 KB), 1.28 GB per layer with all experts touched: 0.32 ms
// at 4 TB/s, half the bf16 kernel's floor. FLOPs as in moe_gemm.cuh (plus one convert and one
// multiply per weight element per 64-token tile).
//
// The shared expert folds in as one extra group (MoeGemmFp8ExtraGroup, group index `experts`), as
// in moe_gemm.cuh. The collective has one chunk_size (group_size) for all groups: the extra
// group's scales come as [ceil(k_x / group_size)][n_x] at the experts' group_size (per-channel
// scales of a wider K repeated over its chunks: python/twotower_rt/ops/moe.py presents them), and
// when k_x > group_size, group_size must be a multiple of 64 (the kernel reads the scale row
// k_tile / ceil(group_size / 64)). + 2 x 3712 x 2688 B = 20 MB per layer for the shared expert.
//
// ptxas (CUDA 13.0, sm_90a): the GEMM kernel 168 registers, no spills, for either epilogue; the
// setup kernel 38 registers.
//
// Status: compiled; never yet run on a GPU (tests/test_moe_fp8.py's GPU tests, bench/run.py moe).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "twotower_rt/moe_gemm.cuh"

namespace twotower_rt {

// One more group after the experts' (group index `experts`), as MoeGemmExtraGroup, FP8 weights.
// w == nullptr: no extra group.
struct MoeGemmFp8ExtraGroup {
  const __nv_bfloat16* a = nullptr;  // [rows, k], row stride lda
  const uint8_t* w = nullptr;        // [n, k] row-major, float8_e4m3fn bits
  const float* scales = nullptr;     // [ceil(k / group_size), n], the experts' group_size
  __nv_bfloat16* d = nullptr;        // [rows, n], row stride ldd
  int rows = 0, n = 0, k = 0;
  int64_t lda = 0, ldd = 0;
};

struct MoeGemmFp8Params {
  const __nv_bfloat16* a;  // [rows, k] row-major, rows sorted by expert
  const uint8_t* w;        // [experts, n, k] row-major, float8_e4m3fn bits
  const float* scales;     // [experts, ceil(k / group_size), n]
  const int32_t* offsets;  // [experts] cumulative row counts (the end of each expert's rows)
  __nv_bfloat16* d;        // [rows, n] row-major
  void* workspace;         // MoeGemmFp8WorkspaceBytes(MoeGemmFp8Groups(p))
  int64_t workspace_bytes;
  int experts, n, k;
  int group_size;  // input columns per scale: k (per-channel) or a multiple of kMoeFp8TileK
  int sm_count;
  int device;
  MoeGemmFp8ExtraGroup extra;  // optional: the shared expert
};

__host__ __device__ inline int MoeGemmFp8Groups(const MoeGemmFp8Params& p) {
  return p.experts + (p.extra.w != nullptr ? 1 : 0);
}

// The k extent of one mainloop tile: a scale group must cover whole tiles.
constexpr int kMoeFp8TileK = 64;

// One heavy CUTLASS instantiation per translation unit: csrc/moe_gemm_fp8_up.cu (relu^2) and
// csrc/moe_gemm_fp8_down.cu (identity), from include/twotower_rt/moe_gemm_fp8_impl.cuh.
int64_t MoeGemmFp8WorkspaceBytesRelu2(int groups, int sm_count);
int64_t MoeGemmFp8WorkspaceBytesIdentity(int groups, int sm_count);
cudaError_t MoeGroupedGemmFp8Relu2(const MoeGemmFp8Params& p, cudaStream_t stream);
cudaError_t MoeGroupedGemmFp8Identity(const MoeGemmFp8Params& p, cudaStream_t stream);

// Bytes of workspace for `groups` groups (experts, + 1 with an extra group).
inline int64_t MoeGemmFp8WorkspaceBytes(int groups, int sm_count, MoeEpilogue epilogue) {
  return epilogue == MoeEpilogue::kRelu2 ? MoeGemmFp8WorkspaceBytesRelu2(groups, sm_count)
                                         : MoeGemmFp8WorkspaceBytesIdentity(groups, sm_count);
}

// The setup kernel and the grouped GEMM on `stream`.
inline cudaError_t MoeGroupedGemmFp8(const MoeGemmFp8Params& p, MoeEpilogue epilogue,
                                     cudaStream_t stream) {
  return epilogue == MoeEpilogue::kRelu2 ? MoeGroupedGemmFp8Relu2(p, stream)
                                         : MoeGroupedGemmFp8Identity(p, stream);
}

}  // namespace twotower_rt
