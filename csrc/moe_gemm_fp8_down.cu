// The experts' `down` projection with FP8 weights: mixed-input grouped GEMM, plain epilogue.
#include "twotower_rt/moe_gemm_fp8_impl.cuh"

namespace twotower_rt {

int64_t MoeGemmFp8WorkspaceBytesIdentity(int groups, int sm_count) {
  return moe_gemm_fp8::WorkspaceBytes<MoeEpilogue::kIdentity>(groups, sm_count);
}

cudaError_t MoeGroupedGemmFp8Identity(const MoeGemmFp8Params& p, cudaStream_t stream) {
  return moe_gemm_fp8::Run<MoeEpilogue::kIdentity>(p, stream);
}

}  // namespace twotower_rt
