// Launcher for twotower_rt._C.rms_norm: checks what Python hands over (pointers as integers, sizes,
// strides in elements, dtype codes, a stream), runs the kernel from
// include/twotower_rt/rmsnorm.cuh and turns every CUDA error into an exception naming the op.
#include <cmath>
#include <cstdint>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/rmsnorm.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kOp = "twotower_rt._C.rms_norm";

[[noreturn]] void ThrowInvalid(const std::string& what) { twotower_rt::ThrowInvalid(kOp, what); }

}  // namespace

void RMSNormOp(std::uintptr_t out, std::uintptr_t x, std::uintptr_t gate, std::uintptr_t weight,
               int64_t rows, int64_t n, int64_t group_size, int64_t out_row_stride,
               int64_t x_row_stride, int64_t gate_row_stride, double eps, int dtype,
               int weight_dtype, int device, std::uintptr_t stream) {
  if (rows < 0) ThrowInvalid("rows must be >= 0, got " + std::to_string(rows));
  if (n <= 0) ThrowInvalid("row length n must be > 0, got " + std::to_string(n));
  if (group_size <= 0 || n % group_size != 0) {
    ThrowInvalid("group_size must be > 0 and divide n = " + std::to_string(n) + ", got " +
                 std::to_string(group_size));
  }
  if (!IsValidDType(dtype)) ThrowInvalid("unknown dtype code " + std::to_string(dtype));
  if (!IsValidDType(weight_dtype)) {
    ThrowInvalid("unknown weight dtype code " + std::to_string(weight_dtype));
  }
  if (!(eps >= 0.0) || !std::isfinite(eps)) ThrowInvalid("eps must be finite and >= 0");
  if (device < 0) ThrowInvalid("device index must be >= 0, got " + std::to_string(device));
  if (n > rmsnorm::kMaxRowLength) {
    ThrowInvalid("row length n = " + std::to_string(n) + " exceeds " +
                 std::to_string(rmsnorm::kMaxRowLength));
  }
  if (rows > rmsnorm::kMaxSegments / (n / group_size)) {
    ThrowInvalid("rows * (n / group_size) = " + std::to_string(rows) + " * " +
                 std::to_string(n / group_size) + " exceeds " +
                 std::to_string(rmsnorm::kMaxSegments) + " (one CTA per group)");
  }
  if (rows == 0) return;
  if (out == 0 || x == 0 || weight == 0) ThrowInvalid("out, x and weight must be non-null");
  if (x_row_stride < 0 || gate_row_stride < 0) ThrowInvalid("row strides must be >= 0");
  // Rows of out must not overlap, or two CTAs would write the same elements.
  if (rows > 1 && out_row_stride < n) {
    ThrowInvalid("out row stride " + std::to_string(out_row_stride) +
                 " < n = " + std::to_string(n) + ": output rows would overlap");
  }

  RMSNormParams params;
  params.out = reinterpret_cast<void*>(out);
  params.x = reinterpret_cast<const void*>(x);
  params.gate = reinterpret_cast<const void*>(gate);
  params.weight = reinterpret_cast<const void*>(weight);
  params.rows = rows;
  params.n = n;
  params.group_size = group_size;
  params.out_row_stride = out_row_stride;
  params.x_row_stride = x_row_stride;
  params.gate_row_stride = gate_row_stride;
  params.eps = static_cast<float>(eps);
  params.dtype = static_cast<DType>(dtype);
  params.weight_dtype = static_cast<DType>(weight_dtype);

  ScopedDevice guard(kOp, device);
  CheckCuda(kOp, RMSNorm(params, reinterpret_cast<cudaStream_t>(stream)), "kernel launch");
}

}  // namespace twotower_rt
