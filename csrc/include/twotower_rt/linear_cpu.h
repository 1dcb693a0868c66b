// A dense projection on the CPU: out = x . w (+ bias), w K-major (in, out), fp32, for the few
// rows of a step (the Mamba in/out projections, q/k/v and o, the heads: cpu_fast / model.linear).
//
// Why it exists: at 1 to 16 rows MKL's sgemm reaches ~20-70 GFLOP/s on a 2-core Xeon on the
// default model's shapes, where register tiles of 4 rows x 64 outputs reach ~100, and MKL's small-M
// kernels round a row differently depending on how many rows share the call.
//
// Numbers (cpu_gemm.h): each output is one chain of fused multiply-adds over the inputs in order,
// starting from the bias (or from the first product). So results agree with torch.mm to float32
// rounding, not bitwise; a row's result never depends on the other rows of the call, and every
// instruction-set clone gives the same bits.
#pragma once

#include <cstdint>

namespace twotower_rt {
namespace cpu {

struct LinearParams {
  const float* x = nullptr;     // (rows, in), row stride x_stride, unit column stride
  const float* w = nullptr;     // (in, out) K-major, rows w_stride apart: w_stride >= out; with
                                // w_stride >= out rounded up to 16 (padding read, never used),
                                // the last out % 16 outputs run as one vector
  const uint16_t* w_bf16 = nullptr;  // or the same weight as bfloat16 bits (exactly the float
                                     // weight's arithmetic, half the bytes); give one of the two
  const float* bias = nullptr;  // (out) or nullptr
  float* out = nullptr;         // (rows, out), contiguous; may not alias x or w
  int64_t rows = 0, in = 0, out_features = 0, x_stride = 0, w_stride = 0;
};

// Returns nullptr on success, else a message naming the bad parameter.
const char* linear(const LinearParams& p);

}  // namespace cpu
}  // namespace twotower_rt
