// The launchers that twotower_rt._C binds (csrc/*.cu), declared once for bindings.cpp and for the
// launchers that define them. Pointers arrive as integers, sizes and strides (in elements) as
// int64, dtype codes as int, the stream as an integer cudaStream_t.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace twotower_rt {

// csrc/rmsnorm.cu
void RMSNormOp(std::uintptr_t out, std::uintptr_t x, std::uintptr_t gate, std::uintptr_t weight,
               int64_t rows, int64_t n, int64_t group_size, int64_t out_row_stride,
               int64_t x_row_stride, int64_t gate_row_stride, double eps, int dtype,
               int weight_dtype, int device, std::uintptr_t stream);

// csrc/mask_sampling.cu
int64_t MaskSamplingWorkspaceOp(int64_t batch, int64_t block_size, int64_t vocab);
void MaskSamplingOp(std::uintptr_t logits, int64_t logits_batch_stride,
                    int64_t logits_position_stride, std::uintptr_t block, int64_t block_row_stride,
                    std::uintptr_t step, std::uintptr_t seed, std::uintptr_t offset,
                    std::uintptr_t out_block, std::uintptr_t out_masked,
                    std::uintptr_t out_num_committed, std::uintptr_t out_prediction,
                    std::uintptr_t out_confidence, std::uintptr_t workspace,
                    int64_t workspace_bytes, int64_t batch, int64_t block_size, int64_t vocab,
                    int64_t mask_token_id, int64_t steps_per_block, double confidence_threshold,
                    double temperature, int dtype, int device, std::uintptr_t stream);
int64_t SampleTokensSplitSizeOp(int64_t batch, int64_t vocab, int64_t splits, int64_t sm_count);
int64_t SampleTokensWorkspaceOp(int64_t batch, int64_t split_size);
void SampleTokensOp(std::uintptr_t logits, int64_t logits_row_stride, std::uintptr_t seed,
                    std::uintptr_t offset, std::uintptr_t out, int64_t batch, int64_t vocab,
                    int64_t top_k, double top_p, double temperature, int64_t split_size,
                    std::uintptr_t workspace, int64_t workspace_bytes, int dtype, int device,
                    std::uintptr_t stream);

// csrc/ssm_scan.cu
void SsmScanOp(std::uintptr_t x, std::array<int64_t, 3> x_strides, std::uintptr_t dt,
               std::array<int64_t, 2> dt_strides, std::uintptr_t A, std::uintptr_t D,
               std::uintptr_t B, std::array<int64_t, 3> b_strides, std::uintptr_t C,
               std::array<int64_t, 3> c_strides, std::uintptr_t n_valid, std::uintptr_t state,
               std::uintptr_t state_out, std::uintptr_t state_rows, std::uintptr_t y,
               int64_t batch, int64_t n, int64_t heads, int64_t groups, int64_t head_dim,
               int64_t state_size, int64_t chunk, int dtype, int variant, int device,
               std::uintptr_t stream);
void SsmChunkCombineOp(std::uintptr_t states, std::uintptr_t decay, std::uintptr_t initial,
                       std::uintptr_t final_state, int64_t batch, int64_t chunks, int64_t heads,
                       int64_t head_elems, int device, std::uintptr_t stream);

// csrc/mamba_decode.cu
void MambaDecodeOp(std::uintptr_t zxbcdt, int64_t zxbcdt_stride, std::uintptr_t conv_state,
                   std::uintptr_t conv_state_out, std::uintptr_t conv_weight,
                   std::uintptr_t conv_bias, std::uintptr_t dt_bias, std::uintptr_t A_log,
                   std::uintptr_t D, std::uintptr_t ssm_state, std::uintptr_t ssm_state_out,
                   std::uintptr_t norm_weight, std::uintptr_t out, int64_t batch, int64_t heads,
                   int64_t head_dim, int64_t state_size, int64_t groups, int64_t kernel,
                   double eps, double dt_min, double dt_max, int dtype, int device,
                   std::uintptr_t stream);

// csrc/all_reduce.cu
int64_t AllReduceSignalBytesOp();
std::pair<std::uintptr_t, std::string> AllReduceAllocateOp(int64_t buffer_bytes, int device);
std::uintptr_t AllReduceOpenHandleOp(const std::string& handle_bytes, int device);
void AllReduceCloseHandleOp(std::uintptr_t ptr, int device);
void AllReduceFreeOp(std::uintptr_t ptr, int device);
void AllReduceOp(const std::vector<std::uintptr_t>& ranks, std::uintptr_t input,
                 std::uintptr_t output, int64_t numel, int64_t buffer_bytes, int rank, int dtype,
                 int algo, int device, std::uintptr_t stream);

#ifdef TWOTOWER_RT_HAVE_CUTLASS
// csrc/moe_gemm.cu (built only with the CUTLASS headers)
// extra_*: an optional extra group (the shared expert folded in); extra_w == 0: none.
int64_t MoeGemmWorkspaceOp(int64_t experts, int epilogue, int device, bool extra_group);
void MoeGroupedGemmOp(std::uintptr_t a, std::uintptr_t w, std::uintptr_t offsets, std::uintptr_t d,
                      std::uintptr_t workspace, int64_t workspace_bytes, int64_t experts,
                      int64_t n, int64_t k, int epilogue, int device, std::uintptr_t stream,
                      std::uintptr_t extra_a, std::uintptr_t extra_w, std::uintptr_t extra_d,
                      int64_t extra_rows, int64_t extra_n, int64_t extra_k, int64_t extra_lda,
                      int64_t extra_ldd);
int64_t MoeGemmFp8WorkspaceOp(int64_t experts, int epilogue, int device, bool extra_group);
void MoeGroupedGemmFp8Op(std::uintptr_t a, std::uintptr_t w, std::uintptr_t scales,
                         std::uintptr_t offsets, std::uintptr_t d, std::uintptr_t workspace,
                         int64_t workspace_bytes, int64_t experts, int64_t n, int64_t k,
                         int64_t group_size, int epilogue, int device, std::uintptr_t stream,
                         std::uintptr_t extra_a, std::uintptr_t extra_w,
                         std::uintptr_t extra_scales, std::uintptr_t extra_d, int64_t extra_rows,
                         int64_t extra_n, int64_t extra_k, int64_t extra_lda, int64_t extra_ldd);
#endif

#ifdef TWOTOWER_RT_HAVE_BLOCK_ATTENTION
// csrc/block_attention.cu (built only with the CUTLASS headers). variant: 0 the mma.sync kernel,
// 1 the Hopper wgmma kernel (csrc/block_attention_sm90.cu; head_dim 128; unverified on a GPU).
void BlockAttentionOp(std::uintptr_t q, std::array<int64_t, 3> q_strides, std::uintptr_t k_cache,
                      std::array<int64_t, 3> k_cache_strides, std::uintptr_t v_cache,
                      std::array<int64_t, 3> v_cache_strides, std::uintptr_t context_lens,
                      std::uintptr_t cache_slots, std::uintptr_t k_block,
                      std::array<int64_t, 3> k_block_strides, std::uintptr_t v_block,
                      std::array<int64_t, 3> v_block_strides, std::uintptr_t out,
                      std::array<int64_t, 3> out_strides, std::uintptr_t partial_out,
                      std::uintptr_t partial_lse, int64_t batch, int64_t seq, int64_t q_heads,
                      int64_t kv_heads, int64_t head_dim, int64_t block_len, int64_t num_splits,
                      double softmax_scale, int variant, int device, std::uintptr_t stream);
#endif

}  // namespace twotower_rt
