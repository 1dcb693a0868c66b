// The denoiser's time-modulated RMSNorm on the CPU (TWOTOWER.md: every denoiser layer's pre-norm
// with its adaLN-style scale and shift), one call per layer. Per row r of x (rows, hidden), with
// the scale and shift of its sequence (rows_per_seq consecutive rows share them):
//
//   pre  (Mamba / attention layers): out = rms_norm(x * scale + shift) * weight
//   post (MoE / MLP layers):         out = rms_norm(x) * weight * scale + shift
//   plain (scale, shift null):       out = rms_norm(x) * weight   (the context tower's norms)
//   rms_norm(y) = y * (1 / sqrt(mean(y^2) + eps))
//
// scale is the layer's 1 + scale (as cpu_fast.tower_forward makes it). Why it exists: in PyTorch
// ops this is three to five small ops per layer (~20 us for a 16-token block on a 2-core Xeon),
// and even the plain norm, F.rms_norm, is a composite of ~6 ops on the CPU (~15-20 us a call),
// while the arithmetic is a few thousand flops.
//
// Numbers: x * scale + shift and the post-modulation are fused multiply-adds and the mean of
// squares sums in 16 fixed lanes, so the result agrees with the PyTorch ops to float32 rounding,
// not bitwise; every row is computed alone (the same bits whatever the batch) and every
// instruction-set clone gives the same bits (cpu_common.h).
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct ModNormParams {
  const float* x = nullptr;       // (rows, hidden), contiguous
  const float* weight = nullptr;  // (hidden)
  const float* scale = nullptr;   // (rows / rows_per_seq, hidden): 1 + the layer's scale; or
                                  // nullptr with shift: a plain RMSNorm
  const float* shift = nullptr;   // (rows / rows_per_seq, hidden)
  float* out = nullptr;           // (rows, hidden); may not alias x
  int64_t rows = 0, hidden = 0, rows_per_seq = 1;
  float eps = 1e-5f;
  bool post = false;  // modulate after the norm (MoE / MLP layers) instead of before
};

// Returns nullptr on success, else a message naming the bad parameter.
const char* modulated_rms_norm(const ModNormParams& p);

// A layer's residual update, out = x + gate * y with one rounding (a fused multiply-add, as
// torch.addcmul(x, gate, y) rounds it on the x86-64 CPUs checked), or x + y where gate is null:
// one kernel call instead of a PyTorch op, so that the whole layer stack of a forward can be
// queued on the kernels' stream (cpu_stream.h). Row r uses gate row r / rows_per_seq.
struct ResidualParams {
  const float* x = nullptr;     // (rows, hidden), contiguous
  const float* y = nullptr;     // (rows, hidden), contiguous
  const float* gate = nullptr;  // rows / rows_per_seq rows of hidden, gate_stride apart; or null
  float* out = nullptr;         // (rows, hidden); may be x
  int64_t rows = 0, hidden = 0, rows_per_seq = 1, gate_stride = 0;
};

const char* residual_add(const ResidualParams& p);

}  // namespace cpu
}  // namespace twotower_rt
