// Block attention on the CPU (TWOTOWER.md section 3) for the few queries of a step, one call per
// layer, optionally writing the block's K/V into the cache first (the context tower's append).
//
// Per sequence b (cache row r = cache_slots[b], or b), with L = context_lens[b]: its S queries
// attend over the cache's keys [0, L) and then the block's own keys, query s seeing block keys
// [0, s] (causal: the context tower) or all S (the denoiser); GQA: query head h reads KV head
// h / (Hq / Hkv). Per query and head:
//
//   score_j = dot(q, k_j) * scale;  p_j = exp(score_j - max) / sum_i exp(score_i - max)
//   out     = sum_j p_j v_j                                 (fp32 throughout)
//
// Why it exists: the PyTorch path is ~15 ops per call (gather the cache rows, concatenate the
// block, build the mask, two einsums, masked softmax) and ~100-150 us on a 2-core Xeon, while the
// arithmetic of a decode step is ~30 kMAC.
//
// Numbers: each dot product is one chain of fused multiply-adds over the head dimension in order;
// the exponentials are cpu_common.h's exp_approx (~2 ulp), their sum in 16 lanes folded pairwise;
// out is one chain of fused multiply-adds over the keys in order. So results agree with the
// PyTorch path to float32 rounding, not bitwise; each (sequence, query) is computed alone, the
// same bits whatever else shares the call, and every instruction-set clone gives the same bits. A
// query without any key (L = 0 and no block) gets zeros (the PyTorch path gives NaN).
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct AttentionParams {
  const float* q = nullptr;         // (B, S, Hq, D): token (b, s) at q + b * q_batch_stride +
                                    // s * q_stride, its heads contiguous
  float* k_cache = nullptr;         // (cache_rows, capacity, Hkv, D), contiguous
  float* v_cache = nullptr;         // same
  const int64_t* context_lens = nullptr;  // (B): each in [0, capacity]
  const int64_t* cache_slots = nullptr;   // (B) cache row of each sequence, or nullptr: row b
  const float* k_block = nullptr;   // (B, S, Hkv, D), token (b, s) at k_block + b *
                                    // block_batch_stride + s * block_stride, or nullptr
  const float* v_block = nullptr;   // the same strides as k_block (nullptr with it)
  float* out = nullptr;             // (B, S, Hq, D), contiguous
  int64_t batch = 0, queries = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t capacity = 0, cache_rows = 0;
  int64_t q_stride = 0, q_batch_stride = 0, block_stride = 0, block_batch_stride = 0;
  float scale = 1.0f;
  bool causal = false;  // query s sees block keys [0, s] instead of all S
  bool append = false;  // first write the block's K/V into the cache at [L, L + S)
};

// Returns nullptr on success, else a message naming the bad parameter (checked before anything
// is written).
const char* block_attention(const AttentionParams& p);

}  // namespace cpu
}  // namespace twotower_rt
