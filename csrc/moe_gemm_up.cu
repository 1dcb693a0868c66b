// The experts' `up` projection: grouped GEMM with relu^2 fused into the epilogue.
#include "twotower_rt/moe_gemm_impl.cuh"

namespace twotower_rt {

int64_t MoeGemmWorkspaceBytesRelu2(int groups, int sm_count) {
  return moe_gemm::WorkspaceBytes<MoeEpilogue::kRelu2>(groups, sm_count);
}

cudaError_t MoeGroupedGemmRelu2(const MoeGemmParams& p, cudaStream_t stream) {
  return moe_gemm::Run<MoeEpilogue::kRelu2>(p, stream);
}

}  // namespace twotower_rt
