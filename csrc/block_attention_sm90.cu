// The Hopper wgmma block-attention kernel (include/twotower_rt/block_attention_sm90.cuh) in its own
// translation unit, so its CuTe templates compile apart from the mma.sync kernel. The arguments are
// checked by the one launcher, BlockAttentionOp (csrc/block_attention.cu), which calls this for
// variant "wgmma".

#include "twotower_rt/block_attention_sm90.cuh"

namespace twotower_rt {

cudaError_t LaunchBlockAttentionSm90(const BlockAttentionParams& p, cudaStream_t stream) {
  return BlockAttentionSm90(p, stream);
}

}  // namespace twotower_rt
