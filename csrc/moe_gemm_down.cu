// The experts' `down` projection: grouped GEMM, plain epilogue.
#include "twotower_rt/moe_gemm_impl.cuh"

namespace twotower_rt {

int64_t MoeGemmWorkspaceBytesIdentity(int groups, int sm_count) {
  return moe_gemm::WorkspaceBytes<MoeEpilogue::kIdentity>(groups, sm_count);
}

cudaError_t MoeGroupedGemmIdentity(const MoeGemmParams& p, cudaStream_t stream) {
  return moe_gemm::Run<MoeEpilogue::kIdentity>(p, stream);
}

}  // namespace twotower_rt
