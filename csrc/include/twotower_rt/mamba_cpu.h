// The Mamba-2 mixer's middle on the CPU, fused: from the in_proj output of n tokens to the gated,
// normed input of out_proj, and the layer's new conv and SSM states, in one pass per sequence.
//
// Per sequence and token t (the model's Mamba2Mixer.forward, python/twotower_rt/model/mamba.py):
//   xBC_t  = silu(conv_bias + sum_k taps[k] * raw[t + 1 + k])   raw = [conv state (K) ; new xBC]
//   dt_t   = clamp(softplus(dt_raw_t + dt_bias), dt_min, dt_max)          (per head)
//   state  = state * exp(dt_t * A) + (dt_t * x_t) outer B_t               (per head, P x N)
//   y_t    = state . C_t + D * x_t
//   out_t  = rms_norm_grouped(y_t * silu(z_t)) * norm_weight
// Rows past a sequence's n_valid are padding: their raw columns are zero and the state passes them
// unchanged (dt = 0), as in the reference.
//
// Why it exists: on the small models the CPU runs, this middle is ~30 small PyTorch ops per token
// block (~300 us per layer for one token, ~600 us for a 16-token block on a 2-core Xeon), while
// its arithmetic is ~1 MFLOP per 16 tokens (H * P * N = 12288 state elements, ~4 flops each per
// token, plus the conv and the norm): the floor is tens of microseconds.
//
// Numbers: the conv taps, the state update (state * decay + dtx * B) and y = state . C + D * x are
// fused multiply-adds (rounded once; the reference rounds the product and the sum apart), exp is
// our own (Cephes-style) and y sums over the state in index order, so the result agrees with the
// PyTorch path to fp32 rounding, not bitwise; every instruction-set clone gives the same bits
// (cpu_common.h). Every sequence is computed alone, in the same order whatever
// the batch, so a row's result never depends on the other rows.
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct MambaChunkParams {
  // Inputs, fp32, contiguous.
  const float* zxbcdt = nullptr;       // (batch, n, d_inner + conv_dim + heads): in_proj output
  const float* conv_state = nullptr;   // (batch, conv_dim, K): the last K raw columns, oldest first
  const float* ssm_state = nullptr;    // (batch, heads, head_dim, state_size)
  const float* conv_taps = nullptr;    // (K, conv_dim): the depthwise conv's weights, time-major
  const float* conv_bias = nullptr;    // (conv_dim) or nullptr
  const float* dt_bias = nullptr;      // (heads)
  const float* A = nullptr;            // (heads): -exp(A_log)
  const float* D = nullptr;            // (heads)
  const float* norm_weight = nullptr;  // (d_inner): the gated norm's weight
  const int64_t* n_valid = nullptr;    // (batch) real tokens per sequence, or nullptr: all n
  // Outputs, fp32, contiguous; each may be nullptr (not computed).
  float* out = nullptr;             // (batch, n, d_inner): the gated, normed y
  float* conv_state_out = nullptr;  // (batch, conv_dim, K): the K raw columns ending at n_valid
  float* ssm_state_out = nullptr;   // (batch, heads, head_dim, state_size) after n_valid tokens
  int64_t batch = 0, n = 0;
  int64_t heads = 0, head_dim = 0, state_size = 0, groups = 0, conv_kernel = 0;
  int64_t norm_group = 0;  // channels per gated-norm group (d_inner / groups)
  float eps = 1e-5f;
  float dt_min = 0.0f, dt_max = 0.0f;  // clamp dt to [dt_min, dt_max] unless (0, +inf)
};

// Returns nullptr on success, else a message naming the bad parameter.
const char* mamba_chunk(const MambaChunkParams& p);

}  // namespace cpu
}  // namespace twotower_rt
