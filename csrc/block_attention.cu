// Launcher for twotower_rt._C.block_attention: checks what Python hands over (pointers as integers,
// sizes, strides in elements, a stream), runs include/twotower_rt/block_attention.cuh (variant 0,
// mma.sync) or the Hopper wgmma kernel of block_attention_sm90.cuh (variant 1, compiled in
// csrc/block_attention_sm90.cu) and turns every CUDA error into an exception naming the op.

#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/block_attention.cuh"

namespace twotower_rt {

// csrc/block_attention_sm90.cu: the wgmma kernel and its split merge (its own translation unit).
cudaError_t LaunchBlockAttentionSm90(const BlockAttentionParams& p, cudaStream_t stream);

namespace {

constexpr const char* kOp = "twotower_rt._C.block_attention";
constexpr int kVariantMmaSync = 0;
constexpr int kVariantWgmma = 1;

using Strides = std::array<int64_t, 3>;  // (batch, token, head), in elements

void CheckStrides(const char* name, const Strides& strides, bool required) {
  for (int64_t s : strides) {
    if (s < 0) ThrowInvalid(kOp, std::string(name) + " strides must be >= 0");
    // 16-byte cp.async chunks: every row must start on a 16-byte boundary.
    if (required && s % 8 != 0) {
      ThrowInvalid(kOp, std::string(name) + " strides must be multiples of 8 elements (16 bytes)");
    }
  }
}

void CheckPointer(const char* name, std::uintptr_t ptr) {
  if (ptr == 0) ThrowInvalid(kOp, std::string(name) + " must be non-null");
  if (!IsAligned(reinterpret_cast<const void*>(ptr), 16)) {
    ThrowInvalid(kOp, std::string(name) + " must be 16-byte aligned");
  }
}

}  // namespace

void BlockAttentionOp(std::uintptr_t q, Strides q_strides, std::uintptr_t k_cache,
                      Strides k_cache_strides, std::uintptr_t v_cache, Strides v_cache_strides,
                      std::uintptr_t context_lens, std::uintptr_t cache_slots,
                      std::uintptr_t k_block, Strides k_block_strides, std::uintptr_t v_block,
                      Strides v_block_strides, std::uintptr_t out, Strides out_strides,
                      std::uintptr_t partial_out, std::uintptr_t partial_lse, int64_t batch,
                      int64_t seq, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                      int64_t block_len, int64_t num_splits, double softmax_scale, int variant,
                      int device, std::uintptr_t stream) {
  if (batch < 0 || seq < 0) ThrowInvalid(kOp, "batch and seq must be >= 0");
  if (variant != kVariantMmaSync && variant != kVariantWgmma) {
    ThrowInvalid(kOp, "variant must be 0 (mma_sync) or 1 (wgmma), got " + std::to_string(variant));
  }
  if (kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) {
    ThrowInvalid(kOp, "need q_heads > 0 a multiple of kv_heads > 0, got q_heads=" +
                          std::to_string(q_heads) + ", kv_heads=" + std::to_string(kv_heads));
  }
  if (!BlockAttentionSupportsHeadDim(static_cast<int>(head_dim))) {
    ThrowInvalid(kOp, "head_dim must be 32, 64 or 128, got " + std::to_string(head_dim));
  }
  if (variant == kVariantWgmma && !BlockAttentionSm90SupportsHeadDim(static_cast<int>(head_dim))) {
    ThrowInvalid(kOp, "the wgmma variant is built for head_dim 128 only, got " +
                          std::to_string(head_dim) + " (use variant 0, mma_sync)");
  }
  if (block_len != 0 && block_len != seq) {
    ThrowInvalid(kOp, "block_len must be 0 or seq, got " + std::to_string(block_len));
  }
  if (num_splits < 1 || num_splits > block_attention::kMaxSplits) {
    ThrowInvalid(kOp, "num_splits must be in [1, " + std::to_string(block_attention::kMaxSplits) +
                          "], got " + std::to_string(num_splits));
  }
  if (batch * kv_heads > 65535) ThrowInvalid(kOp, "batch * kv_heads exceeds 65535 (grid.z)");
  if (seq * q_heads > (int64_t{1} << 30)) ThrowInvalid(kOp, "seq * q_heads is too large");
  if (!(softmax_scale > 0.0) || !std::isfinite(softmax_scale)) {
    ThrowInvalid(kOp, "softmax_scale must be finite and > 0");
  }
  if (device < 0) ThrowInvalid(kOp, "device index must be >= 0");
  if (batch == 0 || seq == 0) return;
  CheckPointer("q", q);
  CheckPointer("k_cache", k_cache);
  CheckPointer("v_cache", v_cache);
  CheckPointer("out", out);
  if (context_lens == 0) ThrowInvalid(kOp, "context_lens must be non-null");
  CheckStrides("q", q_strides, true);
  CheckStrides("k_cache", k_cache_strides, true);
  CheckStrides("v_cache", v_cache_strides, true);
  CheckStrides("out", out_strides, false);
  if (out_strides[2] < head_dim && q_heads > 1) ThrowInvalid(kOp, "out heads would overlap");
  if (block_len > 0) {
    CheckPointer("k_block", k_block);
    CheckPointer("v_block", v_block);
    CheckStrides("k_block", k_block_strides, true);
    CheckStrides("v_block", v_block_strides, true);
  }
  if (num_splits > 1) {
    CheckPointer("partial_out", partial_out);
    CheckPointer("partial_lse", partial_lse);
  }

  BlockAttentionParams p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q);
  p.q_batch_stride = q_strides[0];
  p.q_seq_stride = q_strides[1];
  p.q_head_stride = q_strides[2];
  p.k_cache = reinterpret_cast<const __nv_bfloat16*>(k_cache);
  p.v_cache = reinterpret_cast<const __nv_bfloat16*>(v_cache);
  p.k_cache_batch_stride = k_cache_strides[0];
  p.k_cache_token_stride = k_cache_strides[1];
  p.k_cache_head_stride = k_cache_strides[2];
  p.v_cache_batch_stride = v_cache_strides[0];
  p.v_cache_token_stride = v_cache_strides[1];
  p.v_cache_head_stride = v_cache_strides[2];
  p.context_lens = reinterpret_cast<const int32_t*>(context_lens);
  p.cache_slots = reinterpret_cast<const int32_t*>(cache_slots);
  p.k_block = block_len > 0 ? reinterpret_cast<const __nv_bfloat16*>(k_block) : p.k_cache;
  p.v_block = block_len > 0 ? reinterpret_cast<const __nv_bfloat16*>(v_block) : p.v_cache;
  p.k_block_batch_stride = block_len > 0 ? k_block_strides[0] : 0;
  p.k_block_token_stride = block_len > 0 ? k_block_strides[1] : 0;
  p.k_block_head_stride = block_len > 0 ? k_block_strides[2] : 0;
  p.v_block_batch_stride = block_len > 0 ? v_block_strides[0] : 0;
  p.v_block_token_stride = block_len > 0 ? v_block_strides[1] : 0;
  p.v_block_head_stride = block_len > 0 ? v_block_strides[2] : 0;
  p.out = reinterpret_cast<__nv_bfloat16*>(out);
  p.out_batch_stride = out_strides[0];
  p.out_seq_stride = out_strides[1];
  p.out_head_stride = out_strides[2];
  p.partial_out = reinterpret_cast<float*>(partial_out);
  p.partial_lse = reinterpret_cast<float*>(partial_lse);
  p.batch = static_cast<int>(batch);
  p.seq = static_cast<int>(seq);
  p.q_heads = static_cast<int>(q_heads);
  p.kv_heads = static_cast<int>(kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.block_len = static_cast<int>(block_len);
  p.num_splits = static_cast<int>(num_splits);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);

  ScopedDevice guard(kOp, device);
  const cudaStream_t cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  CheckCuda(kOp,
            variant == kVariantWgmma ? LaunchBlockAttentionSm90(p, cuda_stream)
                                     : BlockAttention(p, cuda_stream),
            "kernel launch");
}

}  // namespace twotower_rt
