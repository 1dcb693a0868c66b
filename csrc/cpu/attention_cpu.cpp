// Block attention on the CPU (see twotower_rt/attention_cpu.h): per sequence and KV head, its keys
// (the cache's, then the block's) transposed once, then each query head of the group over them,
// 16 keys at a time.
#include "twotower_rt/attention_cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_pool.h"

namespace twotower_rt {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;

struct Scratch {
  std::vector<float> keys_t;  // (D, padded keys): a KV head's keys, transposed
  std::vector<float> values;  // (keys, D): its values, contiguous
  std::vector<float> probs;   // (heads of a group, padded keys)
};

constexpr int64_t kChunks = 4;  // 16-key chunks of scores computed side by side (kPad keys)
constexpr int64_t kPad = kChunks * kLanes;

// Scores of one query head over keys [0, n): keys_t (D, ld) transposed keys, ld a multiple of
// kPad, zero-padded. Each key's dot product is one chain of fused multiply-adds over d; kPad keys
// run side by side (in vectors V: cpu_common.h, wide_vectors) so that their chains overlap.
template <typename V>
TWOTOWER_RT_INLINE void head_scores_v(const float* q, const float* keys_t, int64_t ld, int64_t n,
                                      int64_t D, float scale, float* scores) {
  constexpr int64_t L = sizeof(V) / sizeof(float), kVectors = kPad / L;
  for (int64_t c0 = 0; c0 < n; c0 += kPad) {
    V acc[kVectors];
    for (int64_t c = 0; c < kVectors; ++c) acc[c] = V{} - 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const V qd = splat_v<V>(q[d]);
      const float* row = keys_t + d * ld + c0;
      for (int64_t c = 0; c < kVectors; ++c) {
        V k;
        std::memcpy(&k, row + c * L, sizeof(V));
        acc[c] = fmadd_v(qd, k, acc[c]);
      }
    }
    for (int64_t c = 0; c < kVectors; ++c) {
      const V scaled = acc[c] * scale;
      std::memcpy(scores + c0 + c * L, &scaled, sizeof(V));
    }
  }
}

TWOTOWER_RT_INLINE void head_scores(const float* q, const float* keys_t, int64_t ld, int64_t n,
                                    int64_t D, float scale, float* scores) {
  if (wide_vectors()) {
    head_scores_v<v16>(q, keys_t, ld, n, D, scale, scores);
  } else {
    head_scores_v<v8>(q, keys_t, ld, n, D, scale, scores);
  }
}

// scores[0, n) -> softmax probabilities in place: exp(score - max) (exp_approx), their sum in
// 16 lanes folded pairwise, each divided by it.
TWOTOWER_RT_INLINE void softmax(float* scores, int64_t n) {
  const float m = max_of(scores, n);
  float lane[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = 0.0f;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      scores[j + l] = exp_approx(scores[j + l] - m);
      lane[l] = lane[l] + scores[j + l];
    }
  }
  for (int64_t l = 0; j < n; ++j, ++l) {
    scores[j] = exp_approx(scores[j] - m);
    lane[l] = lane[l] + scores[j];
  }
  const float total = fold_lanes<kLanes>(lane);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) scores[i] = scores[i] / total;
}

// The G query heads q[0..G) of one query over keys [0, n) (n > 0): out[h] = sum_i p_h,i v_i, one
// chain of fused multiply-adds per output over the keys in order; the G heads' chains side by
// side, in vectors V (cpu_common.h: wide_vectors). probs: G rows of ld floats.
template <int G, typename V>
TWOTOWER_RT_INLINE void heads_output_v(const float* probs, int64_t ld, const float* values,
                                       int64_t n, int64_t D, float* const* out) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  int64_t d0 = 0;
  for (; d0 + L <= D; d0 += L) {
    V acc[G];
    for (int h = 0; h < G; ++h) acc[h] = V{} - 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      V v;
      std::memcpy(&v, values + i * D + d0, sizeof(V));
      for (int h = 0; h < G; ++h) acc[h] = fmadd_v(splat_v<V>(probs[h * ld + i]), v, acc[h]);
    }
    for (int h = 0; h < G; ++h) std::memcpy(out[h] + d0, &acc[h], sizeof(V));
  }
  for (int h = 0; h < G && d0 < D; ++h) {
    for (int64_t d = d0; d < D; ++d) out[h][d] = -0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float w = probs[h * ld + i];
#pragma omp simd
      for (int64_t d = d0; d < D; ++d) out[h][d] = fmadd(w, values[i * D + d], out[h][d]);
    }
  }
}

template <int G>
TWOTOWER_RT_INLINE void heads_output(const float* probs, int64_t ld, const float* values,
                                     int64_t n, int64_t D, float* const* out) {
  if (wide_vectors()) {
    heads_output_v<G, v16>(probs, ld, values, n, D, out);
  } else {
    heads_output_v<G, v8>(probs, ld, values, n, D, out);
  }
}

// Query heads [h0, h0 + count) of one query (q: its first head) over keys [0, n).
TWOTOWER_RT_INLINE void attend(const float* q, int64_t count, const float* keys_t, int64_t ld,
                               const float* values, int64_t n, int64_t D, float scale,
                               float* probs, float* out) {
  if (n == 0) {
    for (int64_t d = 0; d < count * D; ++d) out[d] = 0.0f;
    return;
  }
  for (int64_t h = 0; h < count; ++h) {
    head_scores(q + h * D, keys_t, ld, n, D, scale, probs + h * ld);
    softmax(probs + h * ld, n);
  }
  int64_t h = 0;
  for (; h + 4 <= count; h += 4) {
    float* outs[4] = {out + h * D, out + (h + 1) * D, out + (h + 2) * D, out + (h + 3) * D};
    heads_output<4>(probs + h * ld, ld, values, n, D, outs);
  }
  float* outs[3] = {out + h * D, out + (h + 1) * D, out + (h + 2) * D};
  switch (count - h) {
    case 3: heads_output<3>(probs + h * ld, ld, values, n, D, outs); break;
    case 2: heads_output<2>(probs + h * ld, ld, values, n, D, outs); break;
    case 1: heads_output<1>(probs + h * ld, ld, values, n, D, outs); break;
    default: break;
  }
}

// The block's K/V into the cache rows (before any head reads them).
void append_block(const AttentionParams& p) {
  const int64_t S = p.queries, HD = p.kv_heads * p.head_dim, row_floats = p.capacity * HD;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t row = p.cache_slots != nullptr ? p.cache_slots[b] : b;
    float* k_row = p.k_cache + row * row_floats + p.context_lens[b] * HD;
    float* v_row = p.v_cache + row * row_floats + p.context_lens[b] * HD;
    for (int64_t i = 0; i < S; ++i) {
      const int64_t at = b * p.block_batch_stride + i * p.block_stride;
      std::memcpy(k_row + i * HD, p.k_block + at, HD * sizeof(float));
      std::memcpy(v_row + i * HD, p.v_block + at, HD * sizeof(float));
    }
  }
}

// One sequence's one KV head and the query heads of its group, for every query: a task of the
// kernel threads (cpu_pool.h), on the thread's own scratch.
struct Job {
  const AttentionParams* p;
  int64_t padded;  // keys, padded, of the longest sequence
};

TWOTOWER_RT_CLONES
void attention_task(void* job, int64_t task) {
  const AttentionParams& p = *static_cast<const Job*>(job)->p;
  const int64_t padded = static_cast<const Job*>(job)->padded;
  const int64_t S = p.queries, Hq = p.q_heads, Hkv = p.kv_heads, D = p.head_dim;
  const int64_t group = Hq / Hkv, row_floats = p.capacity * Hkv * D;
  const int64_t b = task / Hkv, g = task % Hkv;
  thread_local Scratch s;
  s.keys_t.resize(D * padded);
  s.values.resize(padded * D);
  s.probs.resize(group * padded);
  const int64_t row = p.cache_slots != nullptr ? p.cache_slots[b] : b;
  const int64_t L = p.context_lens[b];
  const float* k_row = p.k_cache + row * row_floats;
  const float* v_row = p.v_cache + row * row_floats;
  const float* k_block = p.k_block == nullptr ? nullptr : p.k_block + b * p.block_batch_stride;
  const float* v_block = p.v_block == nullptr ? nullptr : p.v_block + b * p.block_batch_stride;
  const int64_t n_block = k_block == nullptr ? 0 : S;
  const int64_t n_all = L + n_block, ld = (n_all + kPad - 1) / kPad * kPad;
  // This KV head's keys transposed (zero-padded to kPad) and its values contiguous: the cache's
  // first L, then the block's.
  float* keys_t = s.keys_t.data();
  float* values = s.values.data();
  for (int64_t j = 0; j < n_all; ++j) {
    const int64_t at = j < L ? (j * Hkv + g) * D : (j - L) * p.block_stride + g * D;
    const float* k = (j < L ? k_row : k_block) + at;
    const float* v = (j < L ? v_row : v_block) + at;
    for (int64_t d = 0; d < D; ++d) keys_t[d * ld + j] = k[d];
    std::memcpy(values + j * D, v, D * sizeof(float));
  }
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = n_all; j < ld; ++j) keys_t[d * ld + j] = 0.0f;
  }
  for (int64_t i = 0; i < S; ++i) {
    const int64_t t = b * S + i, n = L + (p.causal && n_block > 0 ? i + 1 : n_block);
    const float* q = p.q + b * p.q_batch_stride + i * p.q_stride + g * group * D;
    attend(q, group, keys_t, ld, values, n, D, p.scale, s.probs.data(),
           p.out + (t * Hq + g * group) * D);
  }
}

}  // namespace

const char* block_attention(const AttentionParams& p) {
  if (p.q == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
      p.context_lens == nullptr || p.out == nullptr) {
    return "block_attention: a required pointer is null";
  }
  if ((p.k_block == nullptr) != (p.v_block == nullptr)) {
    return "block_attention: k_block and v_block go together";
  }
  if (p.append && p.k_block == nullptr) return "block_attention: append needs the block's K/V";
  if (p.batch < 0 || p.queries <= 0 || p.q_heads <= 0 || p.kv_heads <= 0 || p.head_dim <= 0 ||
      p.q_heads % p.kv_heads != 0 || p.capacity < 0 || p.cache_rows < 0 ||
      p.q_stride < 0 || p.q_batch_stride < 0 || p.block_stride < 0 ||
      p.block_batch_stride < 0) {
    return "block_attention: sizes must be positive, kv_heads dividing q_heads, strides not "
           "negative";
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t row = p.cache_slots != nullptr ? p.cache_slots[b] : b;
    if (row < 0 || row >= p.cache_rows) return "block_attention: a cache slot is out of range";
    const int64_t L = p.context_lens[b];
    if (L < 0 || L + (p.append ? p.queries : 0) > p.capacity) {
      return "block_attention: a context length is out of range (or its block does not fit)";
    }
  }
  if (p.batch == 0) return nullptr;
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) longest = std::max(longest, p.context_lens[b]);
  if (p.append) append_block(p);
  Job job{&p, (longest + p.queries + kPad - 1) / kPad * kPad};
  // The products: queries x heads x keys x head_dim, twice (scores and the weighted values).
  const int64_t work = p.batch * p.queries * p.q_heads * (longest + p.queries) * p.head_dim * 2;
  if (!pool_run(p.batch * p.kv_heads, work, attention_task, &job)) return kPoolFailed;
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
