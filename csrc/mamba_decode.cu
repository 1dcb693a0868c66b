// Launcher for twotower_rt._C.mamba_decode_step: checks what Python hands over (pointers as
// integers, sizes, a dtype code, a stream), runs include/twotower_rt/mamba_decode.cuh and turns
// every CUDA error into an exception naming the op.
#include <cmath>
#include <cstdint>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/mamba_decode.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kOp = "twotower_rt._C.mamba_decode_step";

}  // namespace

void MambaDecodeOp(std::uintptr_t zxbcdt, int64_t zxbcdt_stride, std::uintptr_t conv_state,
                   std::uintptr_t conv_state_out, std::uintptr_t conv_weight,
                   std::uintptr_t conv_bias, std::uintptr_t dt_bias, std::uintptr_t A_log,
                   std::uintptr_t D, std::uintptr_t ssm_state, std::uintptr_t ssm_state_out,
                   std::uintptr_t norm_weight, std::uintptr_t out, int64_t batch, int64_t heads,
                   int64_t head_dim, int64_t state_size, int64_t groups, int64_t kernel,
                   double eps, double dt_min, double dt_max, int dtype, int device,
                   std::uintptr_t stream) {
  if (batch < 0 || heads <= 0 || head_dim <= 0 || groups <= 0 || kernel <= 0) {
    ThrowInvalid(kOp, "need batch >= 0 and positive heads, head_dim, groups, kernel");
  }
  if (heads % groups != 0) ThrowInvalid(kOp, "groups must divide heads");
  if (!MambaDecodeSupportsStateSize(static_cast<int>(state_size))) {
    ThrowInvalid(kOp, "state_size must be 16, 32, 64, 128 or 256, got " +
                          std::to_string(state_size));
  }
  if (batch > 65535 || groups > 65535) ThrowInvalid(kOp, "batch and groups must be <= 65535");
  if (!IsValidDType(dtype)) ThrowInvalid(kOp, "unknown dtype code " + std::to_string(dtype));
  if (!(eps >= 0.0) || !std::isfinite(eps)) ThrowInvalid(kOp, "eps must be finite and >= 0");
  if (!(dt_min <= dt_max)) ThrowInvalid(kOp, "need dt_min <= dt_max");
  if (device < 0) ThrowInvalid(kOp, "device index must be >= 0");
  if (MambaDecodeSmemBytes(static_cast<int>(heads), static_cast<int>(head_dim),
                           static_cast<int>(groups), static_cast<int>(state_size)) > 227 * 1024) {
    ThrowInvalid(kOp, "a group's channels do not fit one CTA's shared memory");
  }
  if (batch == 0) return;
  for (std::uintptr_t ptr : {zxbcdt, conv_state, conv_state_out, conv_weight, dt_bias, A_log, D,
                             norm_weight, out}) {
    if (ptr == 0) ThrowInvalid(kOp, "tensor pointers must be non-null (conv_bias may be 0)");
  }
  if (ssm_state == 0 || ssm_state_out == 0 || ssm_state % 16 != 0 || ssm_state_out % 16 != 0) {
    ThrowInvalid(kOp, "the SSM states must be non-null and 16-byte aligned");
  }
  MambaDecodeParams p{};
  p.zxbcdt = reinterpret_cast<const void*>(zxbcdt);
  p.zxbcdt_stride = zxbcdt_stride;
  p.conv_state = reinterpret_cast<const void*>(conv_state);
  p.conv_state_out = reinterpret_cast<void*>(conv_state_out);
  p.conv_weight = reinterpret_cast<const void*>(conv_weight);
  p.conv_bias = reinterpret_cast<const void*>(conv_bias);
  p.dt_bias = reinterpret_cast<const void*>(dt_bias);
  p.A_log = reinterpret_cast<const void*>(A_log);
  p.D = reinterpret_cast<const void*>(D);
  p.ssm_state = reinterpret_cast<const float*>(ssm_state);
  p.ssm_state_out = reinterpret_cast<float*>(ssm_state_out);
  p.norm_weight = reinterpret_cast<const void*>(norm_weight);
  p.out = reinterpret_cast<void*>(out);
  p.eps = static_cast<float>(eps);
  p.dt_min = static_cast<float>(dt_min);
  p.dt_max = static_cast<float>(dt_max);
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.head_dim = static_cast<int>(head_dim);
  p.state_size = static_cast<int>(state_size);
  p.groups = static_cast<int>(groups);
  p.kernel = static_cast<int>(kernel);
  p.dtype = static_cast<DType>(dtype);
  ScopedDevice guard(kOp, device);
  CheckCuda(kOp, MambaDecode(p, reinterpret_cast<cudaStream_t>(stream)), "kernel launch");
}

}  // namespace twotower_rt
