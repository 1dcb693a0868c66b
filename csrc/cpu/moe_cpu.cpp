// The MoE layer on the CPU (see twotower_rt/moe_cpu.h): every projection a chain of fused
// multiply-adds per output over the inputs in order, in register tiles of a few tokens
// (cpu_gemm.h). The instruction-set clones round the same operations (cpu_common.h).
#include "twotower_rt/moe_cpu.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_gemm.h"

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
  std::vector<float> h, expert_out;  // kTokens buffers of the widest MLP / of hidden
  std::vector<float> group_out;      // (tokens, hidden): one expert's outputs
  std::vector<const float*> group_in;
  std::vector<float*> group_dst;
  std::vector<int64_t> group_tokens;
  std::vector<char> started;
};

// Route every token: its k experts by the biased float64 score, their float32 weights.
void route(const MoeParams& p, Scratch& s) {
  const int64_t H = p.hidden, E = p.experts, k = p.top_k;
  double* scores = s.scores.data();
  for (int64_t t = 0; t < p.tokens; ++t) {
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

// up, down: (E, hidden, I) and (E, I, hidden); shared_up, shared_down: or nullptr.
template <typename W>
TWOTOWER_RT_INLINE void moe_all(const MoeParams& p, Scratch& s, const W* up, const W* down,
                                const W* shared_up, const W* shared_down) {
  const int64_t H = p.hidden, E = p.experts, k = p.top_k, T = p.tokens;
  route(p, s);
  float* h[kTokens];
  for (int b = 0; b < kTokens; ++b) h[b] = s.h.data() + b * (s.h.size() / kTokens);
  char* started = s.started.data();
  for (int64_t t = 0; t < T; ++t) started[t] = 0;
  // Expert by expert in id order, each over the tokens that chose it; every token thus adds its
  // experts' weighted outputs in id order, as the reference does.
  for (int64_t e = 0; e < E; ++e) {
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) {
      bool picked = false;
      for (int64_t i = 0; i < k; ++i) picked = picked || s.chosen[t * k + i] == e;
      if (!picked) continue;
      s.group_tokens[count] = t;
      s.group_in[count] = p.x + t * H;
      s.group_dst[count] = s.group_out.data() + count * H;
      ++count;
    }
    relu2_mlp_tokens(s.group_in.data(), count, up + e * H * p.inter, down + e * p.inter * H, H,
                     p.inter, h, s.group_dst.data());
    for (int64_t g = 0; g < count; ++g) {
      const int64_t t = s.group_tokens[g];
      const float w = s.weight_of[t * E + e];
      const float* o = s.group_dst[g];
      float* out = p.out + t * H;
      if (!started[t]) {
#pragma omp simd
        for (int64_t c = 0; c < H; ++c) out[c] = o[c] * w;
        started[t] = 1;
      } else {
#pragma omp simd
        for (int64_t c = 0; c < H; ++c) out[c] = out[c] + o[c] * w;
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    if (!started[t]) {
      for (int64_t c = 0; c < H; ++c) p.out[t * H + c] = 0.0f;
    }
  }
  if (shared_up == nullptr) return;
  for (int64_t t = 0; t < T; ++t) {
    s.group_in[t] = p.x + t * H;
    s.group_dst[t] = s.group_out.data() + t * H;
  }
  relu2_mlp_tokens(s.group_in.data(), T, shared_up, shared_down, H, p.shared_inter, h,
                   s.group_dst.data());
  for (int64_t t = 0; t < T; ++t) {
    float* out = p.out + t * H;
    const float* o = s.group_dst[t];
#pragma omp simd
    for (int64_t c = 0; c < H; ++c) out[c] = out[c] + o[c];
  }
}

// One clone set per weight type (target_clones does not take templates).
TWOTOWER_RT_CLONES
void moe_f32(const MoeParams& p, Scratch& s) {
  auto w = [](const void* ptr) { return static_cast<const float*>(ptr); };
  moe_all(p, s, w(p.up), w(p.down), w(p.shared_up), w(p.shared_down));
}

TWOTOWER_RT_CLONES
void moe_bf16(const MoeParams& p, Scratch& s) {
  auto w = [](const void* ptr) { return static_cast<const uint16_t*>(ptr); };
  moe_all(p, s, w(p.up), w(p.down), w(p.shared_up), w(p.shared_down));
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
  thread_local Scratch scratch;
  const int64_t widest = p.inter > p.shared_inter ? p.inter : p.shared_inter;
  scratch.scores.resize(p.experts);
  scratch.chosen.resize(p.tokens * p.top_k);
  scratch.weight_of.resize(p.tokens * p.experts);
  scratch.h.resize(kTokens * widest);
  scratch.group_out.resize(p.tokens * p.hidden);
  scratch.group_in.resize(p.tokens);
  scratch.group_dst.resize(p.tokens);
  scratch.group_tokens.resize(p.tokens);
  scratch.started.resize(p.tokens);
  if (p.weights_bf16) {
    moe_bf16(p, scratch);
  } else {
    moe_f32(p, scratch);
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
