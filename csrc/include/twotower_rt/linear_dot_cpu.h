// A dense projection on the CPU with bfloat16 dot products (AVX512_BF16's VDPBF16PS): out = x . w
// (+ bias), x rounded to bfloat16, w bfloat16, each output accumulated in float32. The CPU path's
// projections take it where the user allows float32 matmuls to run in bfloat16
// (torch.set_float32_matmul_precision("medium")) and the CPU has the instruction; elsewhere they
// keep the float32 kernel (linear_cpu.h).
//
// Why: one VDPBF16PS is 32 multiply-adds where an FMA is 16, so at the 16 rows of a denoiser
// forward the projections run ~1.7-1.9x faster on a Zen 4 core; at one row (an AR step) they are
// bound by loading the weights, the same bytes either way.
//
// Numbers: inputs in pairs. x[2j], x[2j+1] are rounded to bfloat16 (to nearest, ties to even), and
// each output is the chain
//
//   acc = init[c];  for j:  acc = fma(x[2j+1], w[2j+1, c], acc);  acc = fma(x[2j], w[2j, c], acc)
//
// (init the bias, or -0.0), each step rounded once (a product of two bfloat16 is exact in
// float32): what VDPBF16PS computes lane by lane on a Zen 4 (checked bit for bit on 3.2 M random
// lanes), with subnormal inputs read as zero and subnormal results flushed to zero, which the
// chain above does not do. An odd last input pairs with a zero. A row's result never depends on
// the other rows of the call or on the thread count.
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct LinearDotParams {
  const float* x = nullptr;         // (rows, in), row stride x_stride, unit column stride
  const uint32_t* w = nullptr;      // (ceil(in / 2), w_stride) words: word [j, c] holds the
                                    // bfloat16 bits of w[2j, c] in its low half and of
                                    // w[2j + 1, c] in its high half (zero past in);
                                    // w_stride >= out_features rounded up to 16
  const float* bias = nullptr;      // (out) or nullptr
  float* out = nullptr;             // (rows, out), contiguous; may not alias x or w
  int64_t rows = 0, in = 0, out_features = 0, x_stride = 0, w_stride = 0;
};

// Whether this CPU has AVX512_BF16 (and AVX-512 F/BW/VL): linear_dot runs only there.
bool linear_dot_supported();

// Returns nullptr on success, else a message naming the bad parameter (or the missing
// instruction set).
const char* linear_dot(const LinearDotParams& p);

}  // namespace cpu
}  // namespace twotower_rt
