// A whole MoE layer on the CPU for the few tokens of a step: the float64 sigmoid router, its top-k
// choice, the chosen relu^2 experts and the shared expert, one token at a time.
//
// Per token x (the model's MoE.forward, python/twotower_rt/model/moe.py):
//   scores  = sigmoid(router_weight . x)               float64, as the reference, so the choice
//   chosen  = top_k(scores + score_bias)                is the reference's
//   w_e     = scores[e] / (sum_chosen scores + 1e-20) * scaling   (or unnormalised), as float32
//   routed  = sum over chosen e in id order of (down_e . relu(up_e . x)^2) * w_e     (fp32)
//   out     = routed + shared_down . relu(shared_up . x)^2
//
// Why it exists: the PyTorch path spends ~30 ops per layer on a few tokens (the router's float64
// ops, a sort, one pair of matmuls per active expert, the shared expert, the scatter back), ~200
// us per layer for one token on a 2-core Xeon, while its arithmetic is ~0.2 MMAC per token.
//
// Weights are taken K-major (input dimension outermost), so each projection is a chain of fused
// multiply-adds over inputs of a scalar times a contiguous row, vectorised over outputs, in input
// order: no horizontal reductions, the same bits on every instruction set (cpu_common.h), but not
// MKL's order, so results agree with the PyTorch path to float32 rounding, not bitwise. Tokens are
// computed alone: a token's output never depends on the others in the call.
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct MoeParams {
  const float* x = nullptr;              // (tokens, hidden)
  const double* router_weight = nullptr;  // (experts, hidden)
  const double* score_bias = nullptr;     // (experts): e_score_correction_bias
  // The experts' weights, float, or bfloat16 bits with weights_bf16 (exactly the arithmetic of
  // the same weights as float, from half the bytes: cpu_gemm.h):
  const void* up = nullptr;               // (experts, hidden, inter): K-major up projections
  const void* down = nullptr;             // (experts, inter, hidden): K-major down projections
  const void* shared_up = nullptr;        // (hidden, shared_inter) or nullptr: no shared expert
  const void* shared_down = nullptr;      // (shared_inter, hidden)
  bool weights_bf16 = false;
  // Or, with weights_dot, the experts by bfloat16 dot products (cpu_gemm_dot.h; AVX512_BF16
  // only): every weight in pair layout, up (experts, hidden / 2, inter), down (experts, inter / 2,
  // hidden), shared_up (hidden / 2, shared_inter), shared_down (shared_inter / 2, hidden) 32-bit
  // words, hidden and the expert sizes multiples of 16; each projection's inputs rounded to
  // bfloat16.
  bool weights_dot = false;
  float* out = nullptr;                   // (tokens, hidden)
  int64_t tokens = 0, hidden = 0, experts = 0, inter = 0, shared_inter = 0, top_k = 0;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
};

// Returns nullptr on success, else a message naming the bad parameter.
const char* moe_forward(const MoeParams& p);

}  // namespace cpu
}  // namespace twotower_rt
