// The greedy mask-diffusion decision on the CPU (see twotower_rt/mask_decide_cpu.h). One position
// at a time: a pass for the max, one for the sum of exponentials (16 fixed lanes, so every clone
// adds in the same order), one for the first argmax of logp. Then the commit rule per sequence.
#include "twotower_rt/mask_decide_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "twotower_rt/cpu_common.h"

namespace twotower_rt {
namespace cpu {
namespace {

constexpr float kMaskedLogit = -1e12f;  // the mask token's logit, as in the reference
constexpr int kLanes = 16;

struct Decision {
  int64_t prediction;
  float confidence;
};

// x: the position's logits, copied, with the mask token's logit already set to -1e12.
TWOTOWER_RT_CLONES
Decision decide_position(const float* x, int64_t vocab) {
  const float m = max_of(x, vocab);
  // sum exp(x - m) in 16 lanes, then the lanes pairwise: one order on every instruction set.
  float lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.0f;
  int64_t i = 0;
  for (; i + kLanes <= vocab; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] = lane[j] + exp_approx(x[i + j] - m);
  }
  for (int j = 0; i < vocab; ++i, ++j) lane[j] = lane[j] + exp_approx(x[i] - m);
  const float lse = std::log(fold_lanes<kLanes>(lane));
  // logp = (x - m) - lse never decreases with x, so its max is (m - m) - lse; the prediction is
  // the first position that rounds to it, as the reference's argmax over logp.
  const float best = (m - m) - lse;
  int64_t prediction = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    if ((x[v] - m) - lse == best) {
      prediction = v;
      break;
    }
  }
  return {prediction, std::exp(best)};
}

}  // namespace

const char* mask_decide(const MaskDecideParams& p) {
  if (p.batch < 0 || p.block_size < 0 || p.vocab < 1) return "mask_decide: bad sizes";
  if (p.mask_token_id < 0 || p.mask_token_id >= p.vocab) return "mask_decide: bad mask_token_id";
  if (p.steps_per_block < 1) return "mask_decide: steps_per_block must be >= 1";
  if (p.batch == 0 || p.block_size == 0) return nullptr;
  if (p.logits == nullptr || p.block == nullptr || p.step == nullptr || p.out_block == nullptr ||
      p.out_masked == nullptr || p.out_num_committed == nullptr || p.out_prediction == nullptr ||
      p.out_confidence == nullptr) {
    return "mask_decide: null pointer";
  }
  const int64_t S = p.block_size;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<int64_t> order(S);
  std::vector<float> row(p.vocab);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t* block = p.block + b * S;
    int64_t* prediction = p.out_prediction + b * S;
    float* confidence = p.out_confidence + b * S;
    int64_t n_masked = 0, n_above = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (block[s] != p.mask_token_id) {
        prediction[s] = block[s];
        confidence[s] = inf;
        continue;
      }
      const float* x = p.logits + (b * S + s) * p.vocab;
      std::copy(x, x + p.vocab, row.begin());
      row[p.mask_token_id] = kMaskedLogit;
      const Decision d = decide_position(row.data(), p.vocab);
      prediction[s] = d.prediction;
      confidence[s] = d.confidence;
      n_masked += 1;
      n_above += d.confidence > p.confidence_threshold ? 1 : 0;
    }
    const int64_t step = p.step[b];
    const int64_t remaining = std::max<int64_t>(p.steps_per_block - step, 1);
    int64_t k =
        std::max<int64_t>(n_above > 0 ? n_above : 1, (n_masked + remaining - 1) / remaining);
    k = step >= p.steps_per_block - 1 ? n_masked : std::min(k, n_masked);
    // The k most confident masked positions, ties to the lower position (a stable sort).
    int64_t count = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (block[s] == p.mask_token_id) order[count++] = s;
    }
    std::stable_sort(order.begin(), order.begin() + count,
                     [&](int64_t a, int64_t c) { return confidence[a] > confidence[c]; });
    int64_t* out_block = p.out_block + b * S;
    bool* out_masked = p.out_masked + b * S;
    for (int64_t s = 0; s < S; ++s) {
      out_block[s] = block[s];
      out_masked[s] = block[s] == p.mask_token_id;
    }
    for (int64_t r = 0; r < k; ++r) {
      out_block[order[r]] = prediction[order[r]];
      out_masked[order[r]] = false;
    }
    p.out_num_committed[b] = k;
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace twotower_rt
