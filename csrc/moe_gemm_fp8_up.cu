// The experts' `up` projection with FP8 weights: mixed-input grouped GEMM, relu^2 in the epilogue.
#include "twotower_rt/moe_gemm_fp8_impl.cuh"

namespace twotower_rt {

int64_t MoeGemmFp8WorkspaceBytesRelu2(int groups, int sm_count) {
  return moe_gemm_fp8::WorkspaceBytes<MoeEpilogue::kRelu2>(groups, sm_count);
}

cudaError_t MoeGroupedGemmFp8Relu2(const MoeGemmFp8Params& p, cudaStream_t stream) {
  return moe_gemm_fp8::Run<MoeEpilogue::kRelu2>(p, stream);
}

}  // namespace twotower_rt
