// The MoE layer on the CPU (see twotower_rt/moe_cpu.h): every projection a chain of fused
// multiply-adds per output over the inputs in order, in register tiles of a few tokens
// (cpu_gemm.h). The instruction-set clones round the same operations (cpu_common.h).
#include "twotower_rt/moe_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_gemm.h"
#include "twotower_rt/cpu_gemm_dot.h"
#include "twotower_rt/cpu_pool.h"

namespace twotower_rt {
namespace cpu {
namespace {

// out[b] = down . relu(up . x[b])^2 for TB tokens (h: TB buffers of inter floats).
template <int TB, typename W>
TWOTOWER_RT_INLINE void relu2_mlp(const float* const* x, const W* up, const W* down,
                                  int64_t hidden, int64_t inter, float* const* h,
                                  float* const* out) {
  gemm_rows<TB>(x, up, hidden, inter, inter, nullptr, h);
  for (int b = 0; b < TB; ++b) {
    float* hb = h[b];
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) {
      const float r = hb[i] > 0.0f ? hb[i] : 0.0f;
      hb[i] = r * r;
    }
  }
  gemm_rows<TB>(h, down, inter, hidden, hidden, nullptr, out);
}

constexpr int kTokens = 4;  // tokens per register block

// The MLP over a list of tokens, kTokens at a time.
template <typename W>
TWOTOWER_RT_INLINE void relu2_mlp_tokens(const float* const* x, int64_t count, const W* up,
                                         const W* down, int64_t hidden, int64_t inter,
                                         float* const* h, float* const* out) {
  int64_t i = 0;
  for (; i + kTokens <= count; i += kTokens) {
    relu2_mlp<kTokens>(x + i, up, down, hidden, inter, h, out + i);
  }
  switch (count - i) {
    case 3: relu2_mlp<3>(x + i, up, down, hidden, inter, h, out + i); break;
    case 2: relu2_mlp<2>(x + i, up, down, hidden, inter, h, out + i); break;
    case 1: relu2_mlp<1>(x + i, up, down, hidden, inter, h, out + i); break;
    default: break;
  }
}

struct Scratch {
  std::vector<double> scores;
  std::vector<int64_t> chosen;
  std::vector<float> weight_of;      // (tokens, experts): 0 where not chosen
  std::vector<float> routed_out;     // (tokens, top_k, hidden): token t's i-th expert's output
  std::vector<float> shared_out;     // (tokens, hidden)
  std::vector<const float*> group_in;   // per expert in id order, the inputs of its tokens
  std::vector<float*> group_dst;        // and where their outputs go
  std::vector<int64_t> group_start;     // (experts + 1): expert e's entries
  std::vector<int64_t> task_expert;     // the experts with tokens
  std::vector<const float*> shared_in;
  std::vector<float*> shared_dst;
};

// Route every token: its k experts by the biased float64 score, their float32 weights. (A clone:
// the logits' chains, side by side over the experts, vectorise; a mul and an add each, no FMA.)
TWOTOWER_RT_CLONES
void route(const MoeParams& p, Scratch& s, int64_t t0, int64_t t1) {
  const int64_t H = p.hidden, E = p.experts, k = p.top_k;
  for (int64_t t = t0; t < t1; ++t) {
    double* scores = s.scores.data() + t * E;
    const float* x = p.x + t * H;
    // Every expert's logit is its own chain over j in order (mul, then add); the chains run side
    // by side, so their latencies overlap.
    for (int64_t e = 0; e < E; ++e) scores[e] = 0.0;
    for (int64_t j = 0; j < H; ++j) {
      const double xj = static_cast<double>(x[j]);
      for (int64_t e = 0; e < E; ++e) scores[e] = scores[e] + xj * p.router_weight[e * H + j];
    }
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0 / (1.0 + std::exp(-scores[e]));
    int64_t* chosen = s.chosen.data() + t * k;
    for (int64_t i = 0; i < k; ++i) {  // best first; a tie goes to the lower id
      int64_t best = -1;
      double best_score = 0.0;
      for (int64_t e = 0; e < E; ++e) {
        bool taken = false;
        for (int64_t m = 0; m < i; ++m) taken = taken || chosen[m] == e;
        const double score = scores[e] + p.score_bias[e];
        if (!taken && (best < 0 || score > best_score)) {
          best = e;
          best_score = score;
        }
      }
      chosen[i] = best;
    }
    double total = 0.0;
    for (int64_t i = 0; i < k; ++i) total += scores[chosen[i]];
    float* weight_of = s.weight_of.data() + t * E;
    for (int64_t e = 0; e < E; ++e) weight_of[e] = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      double w = scores[chosen[i]];
      if (p.norm_topk_prob) w = w / (total + 1e-20);
      weight_of[chosen[i]] = static_cast<float>(w * p.routed_scaling_factor);
    }
  }
}

// One call's state for its tasks on the kernel threads (cpu_pool.h): the routing, kTokens tokens
// per task; then the MLPs, first the shared expert's, kTokens tokens per task, then one task per
// expert with tokens, over its tokens.
struct Job {
  const MoeParams* p;
  Scratch* s;
  int64_t shared_tasks;
};

void route_task(void* job, int64_t i) {
  const Job& j = *static_cast<const Job*>(job);
  const int64_t t0 = i * kTokens, t1 = t0 + kTokens < j.p->tokens ? t0 + kTokens : j.p->tokens;
  route(*j.p, *j.s, t0, t1);
}

// The MLP buffers of the calling thread: kTokens of the widest MLP.
float* const* mlp_buffers(int64_t widest) {
  thread_local std::vector<float> h;
  thread_local float* rows[kTokens];
  if (static_cast<int64_t>(h.size()) < kTokens * widest) h.resize(kTokens * widest);
  for (int b = 0; b < kTokens; ++b) rows[b] = h.data() + b * widest;
  return rows;
}

template <typename W>
TWOTOWER_RT_INLINE void moe_task(const Job& job, int64_t i) {
  const MoeParams& p = *job.p;
  Scratch& s = *job.s;
  const int64_t H = p.hidden;
  float* const* h = mlp_buffers(p.inter > p.shared_inter ? p.inter : p.shared_inter);
  if (i < job.shared_tasks) {
    const int64_t t = i * kTokens, n = p.tokens - t < kTokens ? p.tokens - t : kTokens;
    relu2_mlp_tokens(s.shared_in.data() + t, n, static_cast<const W*>(p.shared_up),
                     static_cast<const W*>(p.shared_down), H, p.shared_inter, h,
                     s.shared_dst.data() + t);
    return;
  }
  const int64_t e = s.task_expert[i - job.shared_tasks], g = s.group_start[e];
  relu2_mlp_tokens(s.group_in.data() + g, s.group_start[e + 1] - g,
                   static_cast<const W*>(p.up) + e * H * p.inter,
                   static_cast<const W*>(p.down) + e * p.inter * H, H, p.inter, h,
                   s.group_dst.data() + g);
}

// One clone set per weight type (target_clones does not take templates); the tasks are clones
// so that every worker runs the instruction set's code.
TWOTOWER_RT_CLONES
void moe_f32_task(void* job, int64_t i) { moe_task<float>(*static_cast<const Job*>(job), i); }

TWOTOWER_RT_CLONES
void moe_bf16_task(void* job, int64_t i) {
  moe_task<uint16_t>(*static_cast<const Job*>(job), i);
}

#ifdef TWOTOWER_RT_HAS_DOT
// The experts by bfloat16 dot products (weights_dot; cpu_gemm_dot.h): each MLP's input and hidden
// rows rounded to bfloat16 pairs before its projection, the relu^2 between them in float32.
template <int TB>
TWOTOWER_RT_DOT_TARGET inline __attribute__((always_inline)) void relu2_mlp_dot(
    const float* const* x, const uint32_t* up, const uint32_t* down, int64_t hidden,
    int64_t inter, float* const* h, uint32_t* const* pairs, float* const* out) {
  for (int b = 0; b < TB; ++b) bf16_pairs(x[b], hidden, pairs[b]);
  dot_cols<TB>(pairs, up, (hidden + 1) / 2, inter, 0, inter, nullptr, h);
  for (int b = 0; b < TB; ++b) {
    float* hb = h[b];
    for (int64_t i = 0; i < inter; ++i) {
      const float r = hb[i] > 0.0f ? hb[i] : 0.0f;
      hb[i] = r * r;
    }
    bf16_pairs(hb, inter, pairs[b]);
  }
  dot_cols<TB>(pairs, down, (inter + 1) / 2, hidden, 0, hidden, nullptr, out);
}

TWOTOWER_RT_DOT_TARGET void relu2_mlp_dot_tokens(const float* const* x, int64_t count,
                                                 const uint32_t* up, const uint32_t* down,
                                                 int64_t hidden, int64_t inter, float* const* h,
                                                 uint32_t* const* pairs, float* const* out) {
  int64_t i = 0;
  for (; i + kTokens <= count; i += kTokens) {
    relu2_mlp_dot<kTokens>(x + i, up, down, hidden, inter, h, pairs, out + i);
  }
  switch (count - i) {
    case 3: relu2_mlp_dot<3>(x + i, up, down, hidden, inter, h, pairs, out + i); break;
    case 2: relu2_mlp_dot<2>(x + i, up, down, hidden, inter, h, pairs, out + i); break;
    case 1: relu2_mlp_dot<1>(x + i, up, down, hidden, inter, h, pairs, out + i); break;
    default: break;
  }
}

// The calling thread's pair buffers: kTokens rows of ceil(widest / 2) words.
uint32_t* const* pair_buffers(int64_t widest) {
  thread_local std::vector<uint32_t> words;
  thread_local uint32_t* rows[kTokens];
  const int64_t n = (widest + 1) / 2;
  if (static_cast<int64_t>(words.size()) < kTokens * n) words.resize(kTokens * n);
  for (int b = 0; b < kTokens; ++b) rows[b] = words.data() + b * n;
  return rows;
}

void moe_dot_task(void* context, int64_t i) {
  const Job& job = *static_cast<const Job*>(context);
  const MoeParams& p = *job.p;
  Scratch& s = *job.s;
  const int64_t H = p.hidden, widest = p.inter > p.shared_inter ? p.inter : p.shared_inter;
  float* const* h = mlp_buffers(widest);
  uint32_t* const* pairs = pair_buffers(widest > H ? widest : H);
  if (i < job.shared_tasks) {
    const int64_t t = i * kTokens, n = p.tokens - t < kTokens ? p.tokens - t : kTokens;
    relu2_mlp_dot_tokens(s.shared_in.data() + t, n, static_cast<const uint32_t*>(p.shared_up),
                         static_cast<const uint32_t*>(p.shared_down), H, p.shared_inter, h,
                         pairs, s.shared_dst.data() + t);
    return;
  }
  const int64_t e = s.task_expert[i - job.shared_tasks], g = s.group_start[e];
  relu2_mlp_dot_tokens(s.group_in.data() + g, s.group_start[e + 1] - g,
                       static_cast<const uint32_t*>(p.up) + e * ((H + 1) / 2) * p.inter,
                       static_cast<const uint32_t*>(p.down) + e * ((p.inter + 1) / 2) * H, H,
                       p.inter, h, pairs, s.group_dst.data() + g);
}
#endif

// Each token's output from its experts' outputs: the weighted outputs added in expert id order
// (the first one multiplied, not added to zero), then the shared expert's, as the reference does.
TWOTOWER_RT_CLONES
void combine(const MoeParams& p, Scratch& s) {
  const int64_t H = p.hidden, E = p.experts, k = p.top_k;
  for (int64_t t = 0; t < p.tokens; ++t) {
    float* out = p.out + t * H;
    const int64_t* chosen = s.chosen.data() + t * k;
    int64_t last = -1;  // the expert added last: the next is the lowest id above it
    for (int64_t n = 0; n < k; ++n) {
      int64_t slot = -1;
      for (int64_t i = 0; i < k; ++i) {
        if (chosen[i] > last && (slot < 0 || chosen[i] < chosen[slot])) slot = i;
      }
      last = chosen[slot];
      const float w = s.weight_of[t * E + last];
      const float* o = s.routed_out.data() + (t * k + slot) * H;
      if (n == 0) {
#pragma omp simd
        for (int64_t c = 0; c < H; ++c) out[c] = o[c] * w;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < H; ++c) out[c] = out[c] + o[c] * w;
      }
    }
    if (p.shared_up == nullptr) continue;
    const float* o = s.shared_out.data() + t * H;
#pragma omp simd
    for (int64_t c = 0; c < H; ++c) out[c] = out[c] + o[c];
  }
}

// False when a task on the kernel threads failed (cpu_pool.h).
bool moe_all(const MoeParams& p, Scratch& s) {
  const int64_t H = p.hidden, E = p.experts, k = p.top_k, T = p.tokens;
  Job job{&p, &s, 0};  // (the logits' float64 chains are latency-bound: ~4 work units each)
  if (!pool_run((T + kTokens - 1) / kTokens, T * E * H * 4, route_task, &job)) {
    return false;
  }
  // Every expert's tokens in token order (each expert's MLP is the same chain per token however
  // its tokens are grouped); a token's i-th chosen expert writes routed_out[t, i].
  int64_t n = 0;
  s.task_expert.clear();
  for (int64_t e = 0; e < E; ++e) {
    s.group_start[e] = n;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < k; ++i) {
        if (s.chosen[t * k + i] != e) continue;
        s.group_in[n] = p.x + t * H;
        s.group_dst[n] = s.routed_out.data() + (t * k + i) * H;
        ++n;
      }
    }
    if (n > s.group_start[e]) s.task_expert.push_back(e);
  }
  s.group_start[E] = n;
  // The busiest experts first, so that the threads' last tasks are the short ones.
  auto count = [&](int64_t e) { return s.group_start[e + 1] - s.group_start[e]; };
  std::stable_sort(s.task_expert.begin(), s.task_expert.end(),
                   [&](int64_t a, int64_t b) { return count(a) > count(b); });
  int64_t shared_tasks = 0;
  if (p.shared_up != nullptr) {
    for (int64_t t = 0; t < T; ++t) {
      s.shared_in[t] = p.x + t * H;
      s.shared_dst[t] = s.shared_out.data() + t * H;
    }
    shared_tasks = (T + kTokens - 1) / kTokens;
  }
  job.shared_tasks = shared_tasks;
  const int64_t work = T * H * (k * p.inter + (p.shared_up != nullptr ? p.shared_inter : 0)) * 2;
  void (*task)(void*, int64_t) = p.weights_bf16 ? moe_bf16_task : moe_f32_task;
#ifdef TWOTOWER_RT_HAS_DOT
  if (p.weights_dot) task = moe_dot_task;
#endif
  if (!pool_run(shared_tasks + static_cast<int64_t>(s.task_expert.size()), work, task, &job)) {
    return false;
  }
  combine(p, s);
  return true;
}

}  // namespace

const char* moe_forward(const MoeParams& p) {
  if (p.x == nullptr || p.router_weight == nullptr || p.score_bias == nullptr ||
      p.up == nullptr || p.down == nullptr || p.out == nullptr) {
    return "moe_forward: a required pointer is null";
  }
  if ((p.shared_up == nullptr) != (p.shared_down == nullptr)) {
    return "moe_forward: shared_up and shared_down go together";
  }
  if (p.tokens < 0 || p.hidden <= 0 || p.experts <= 0 || p.inter <= 0 || p.top_k <= 0 ||
      p.top_k > p.experts || (p.shared_up != nullptr && p.shared_inter <= 0)) {
    return "moe_forward: sizes must be positive, with top_k <= experts";
  }
  if (p.weights_dot) {
    if (p.weights_bf16) return "moe_forward: weights_dot and weights_bf16 exclude each other";
    if (!dot_supported()) return "moe_forward: weights_dot needs AVX512_BF16, which this CPU lacks";
    if (p.hidden % 16 != 0 || p.inter % 16 != 0 || p.shared_inter % 16 != 0) {
      return "moe_forward: weights_dot needs hidden and the expert sizes multiples of 16";
    }
  }
  thread_local Scratch scratch;
  scratch.scores.resize(p.tokens * p.experts);
  scratch.chosen.resize(p.tokens * p.top_k);
  scratch.weight_of.resize(p.tokens * p.experts);
  scratch.routed_out.resize(p.tokens * p.top_k * p.hidden);
  scratch.shared_out.resize(p.shared_up != nullptr ? p.tokens * p.hidden : 0);
  scratch.group_in.resize(p.tokens * p.top_k);
  scratch.group_dst.resize(p.tokens * p.top_k);
  scratch.group_start.resize(p.experts + 1);
  scratch.task_expert.reserve(p.experts);
  scratch.shared_in.resize(p.tokens);
  scratch.shared_dst.resize(p.tokens);
  if (!moe_all(p, scratch)) return kPoolFailed;
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
