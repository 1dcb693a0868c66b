// What the block-attention kernels share: the params struct, the key tile and split limits, and
// the kernel that merges split-KV partials. The mma.sync kernel (block_attention.cuh) and the wgmma
// kernel (block_attention_sm90.cuh) both include it, so neither translation unit instantiates the
// other's kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "twotower_rt/common.cuh"

namespace twotower_rt {

struct BlockAttentionParams {
  const __nv_bfloat16* q;  // [batch, seq, q_heads, head_dim], unit stride over head_dim
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  const __nv_bfloat16* k_cache;  // [cache rows, capacity, kv_heads, head_dim]
  const __nv_bfloat16* v_cache;
  int64_t k_cache_batch_stride, k_cache_token_stride, k_cache_head_stride;
  int64_t v_cache_batch_stride, v_cache_token_stride, v_cache_head_stride;
  const int32_t* context_lens;  // [batch], each in [0, capacity]
  const int32_t* cache_slots;   // [batch]: cache row of sequence b; null means row b
  const __nv_bfloat16* k_block;  // [batch, block_len, kv_heads, head_dim]; null when block_len == 0
  const __nv_bfloat16* v_block;
  int64_t k_block_batch_stride, k_block_token_stride, k_block_head_stride;
  int64_t v_block_batch_stride, v_block_token_stride, v_block_head_stride;
  __nv_bfloat16* out;  // [batch, seq, q_heads, head_dim], unit stride over head_dim
  int64_t out_batch_stride, out_seq_stride, out_head_stride;
  float* partial_out;  // [num_splits, batch, seq, q_heads, head_dim] when num_splits > 1
  float* partial_lse;  // [num_splits, batch, seq, q_heads], log2 of the row's sum of exp2
  int batch, seq, q_heads, kv_heads, head_dim, block_len, num_splits;
  float softmax_scale_log2;  // log2(e) / sqrt(head_dim)
};

namespace block_attention {

constexpr int kBlockN = 64;      // keys per tile
constexpr int kMaxSplits = 256;  // grid.y, and the combine kernel's loop

// Merges the splits' partials of each (b, s, head) row: one warp per row. The lanes first turn the
// splits' log2-sum-exps into weights (kept in shared memory), then each lane sums its kHeadDim / 32
// columns over the splits in index order (deterministic), skipping splits without keys; the loads
// of four splits are in flight at once.
template <int kHeadDim>
__global__ void __launch_bounds__(256) BlockAttentionCombineKernel(const BlockAttentionParams p) {
  constexpr int kVec = kHeadDim / 32;  // columns per lane
  static_assert(kHeadDim % 32 == 0 && kVec <= 4, "head_dim");
  __shared__ float weights[8][kMaxSplits];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seq * p.q_heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + warp;
  if (row >= rows) return;
  float max_lse = -INFINITY;
  for (int i = lane; i < p.num_splits; i += 32) max_lse = fmaxf(max_lse, p.partial_lse[i * rows + row]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
  }
  const float base = max_lse == -INFINITY ? 0.f : max_lse;
  float total = 0.f;
  for (int i = lane; i < p.num_splits; i += 32) {
    const float w = exp2f(p.partial_lse[i * rows + row] - base);
    weights[warp][i] = w;
    total += w;
  }
  total = WarpReduceSum(total);
  __syncwarp();
  float acc[kVec] = {};
  const float* partial = p.partial_out + row * kHeadDim + lane * kVec;
  int i = 0;
  for (; i + 4 <= p.num_splits; i += 4) {
    float v[4][kVec];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const Array<float, kVec> x =
          *reinterpret_cast<const Array<float, kVec>*>(partial + (i + j) * rows * kHeadDim);
#pragma unroll
      for (int c = 0; c < kVec; ++c) v[j][c] = x.data[c];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float w = weights[warp][i + j];
#pragma unroll
      for (int c = 0; c < kVec; ++c) acc[c] += w > 0.f ? w * v[j][c] : 0.f;
    }
  }
  for (; i < p.num_splits; ++i) {
    const float w = weights[warp][i];
    if (w == 0.f) continue;  // a split without keys wrote zeros; skip the read
    const Array<float, kVec> x =
        *reinterpret_cast<const Array<float, kVec>*>(partial + i * rows * kHeadDim);
#pragma unroll
    for (int c = 0; c < kVec; ++c) acc[c] += w * x.data[c];
  }
  const int head = static_cast<int>(row % p.q_heads);
  const int s = static_cast<int>(row / p.q_heads % p.seq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.q_heads) * p.seq));
  __nv_bfloat16* dst = p.out + b * p.out_batch_stride + s * p.out_seq_stride +
                       head * p.out_head_stride + lane * kVec;
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
  for (int c = 0; c < kVec; ++c) dst[c] = __float2bfloat16_rn(acc[c] * inv_total);
}

// What one CTA of the split-KV grid (blockIdx: row tile, split, sequence x KV head) works on:
// its sequence's rows and key tiles, and where its K/V start in the cache and the block.
struct CtaWork {
  int group, rows, row0, split, b, kv_head, context_len, num_keys, tile_begin, tile_end;
  const __nv_bfloat16 *k_cache, *v_cache, *k_block, *v_block;

  __device__ __forceinline__ CtaWork(const BlockAttentionParams& p, int block_m) {
    group = p.q_heads / p.kv_heads;
    rows = p.seq * group;
    row0 = blockIdx.x * block_m;
    split = blockIdx.y;
    b = blockIdx.z / p.kv_heads;
    kv_head = blockIdx.z % p.kv_heads;
    context_len = p.context_lens[b];
    num_keys = context_len + p.block_len;
    const int num_tiles = (num_keys + kBlockN - 1) / kBlockN;
    const int tiles_per_split = (num_tiles + p.num_splits - 1) / p.num_splits;
    tile_begin = split * tiles_per_split;
    tile_end = min(num_tiles, tile_begin + tiles_per_split);
    const int64_t slot = p.cache_slots != nullptr ? p.cache_slots[b] : b;
    k_cache = p.k_cache + slot * p.k_cache_batch_stride + kv_head * p.k_cache_head_stride;
    v_cache = p.v_cache + slot * p.v_cache_batch_stride + kv_head * p.v_cache_head_stride;
    k_block = p.k_block + b * p.k_block_batch_stride + kv_head * p.k_block_head_stride;
    v_block = p.v_block + b * p.v_block_batch_stride + kv_head * p.v_block_head_stride;
  }
};

}  // namespace block_attention

// Head dims the wgmma kernel (block_attention_sm90.cuh) is built for: the real model's 128; the
// others run the mma.sync kernel.
inline bool BlockAttentionSm90SupportsHeadDim(int head_dim) { return head_dim == 128; }

}  // namespace twotower_rt
