// One greedy mask-diffusion decision on the CPU (TWOTOWER.md section 4, temperature 0): per
// position the prediction and its confidence, per sequence the commit rule. The same contract as
// the CUDA kernel (mask_sampling.cuh) and python/twotower_rt/ops/mask_sampling.py's reference:
//
//   per masked position: x = logits with the mask token's logit set to -1e12; m = max x;
//     lse = log(sum exp(x - m)); logp = (x - m) - lse; prediction = the first argmax of logp;
//     confidence = exp(logp[prediction])           (positions committed before: not computed)
//   per sequence: k = max(n_above or 1, ceil(n_masked / (T - step))), at most n_masked, all of
//     them at step >= T - 1; the k most confident masked positions are committed (ties: the
//     lower position first).
//
// Why it exists: the reference is ~25 PyTorch ops over a (B, S, V) tensor (a copy, log_softmax,
// argmax, gather, exp, an argsort, the scatter back), ~170 us for one 16-token block of a
// 2048-token vocabulary on a 2-core Xeon; the work is one pass for the max and one for the sum.
//
// Numbers: the sum of exponentials runs in 16 fixed lanes with its own exp (cpu_common.h), so lse
// and the confidence agree with the reference to float32 rounding, not bitwise; a prediction can
// differ only where two logits are within rounding of the row's log-sum-exp of each other.
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct MaskDecideParams {
  const float* logits = nullptr;   // (batch, block_size, vocab), contiguous
  const int64_t* block = nullptr;  // (batch, block_size): mask_token_id where still masked
  const int64_t* step = nullptr;   // (batch): each sequence's step within its block
  int64_t* out_block = nullptr;    // (batch, block_size): the block after this step
  bool* out_masked = nullptr;      // (batch, block_size): still masked after this step
  int64_t* out_num_committed = nullptr;  // (batch): k
  int64_t* out_prediction = nullptr;     // (batch, block_size): the token itself where committed
  float* out_confidence = nullptr;       // (batch, block_size): +inf where committed before
  int64_t batch = 0, block_size = 0, vocab = 0, mask_token_id = 0, steps_per_block = 0;
  float confidence_threshold = 0.0f;
};

// Returns nullptr on success, else a message naming the bad parameter.
const char* mask_decide(const MaskDecideParams& p);

}  // namespace cpu
}  // namespace twotower_rt
