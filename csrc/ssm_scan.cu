// Launcher for twotower_rt._C.ssm_scan: checks what Python hands over (pointers as integers, sizes,
// strides in elements, a dtype code, a stream), runs include/twotower_rt/ssm_scan.cuh and turns
// every CUDA error into an exception naming the op.
#include <array>
#include <cstdint>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/ssm_scan.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kOp = "twotower_rt._C.ssm_scan";

}  // namespace

void SsmScanOp(std::uintptr_t x, std::array<int64_t, 3> x_strides, std::uintptr_t dt,
               std::array<int64_t, 2> dt_strides, std::uintptr_t A, std::uintptr_t D,
               std::uintptr_t B, std::array<int64_t, 3> b_strides, std::uintptr_t C,
               std::array<int64_t, 3> c_strides, std::uintptr_t n_valid, std::uintptr_t state,
               std::uintptr_t state_out, std::uintptr_t state_rows, std::uintptr_t y,
               int64_t batch, int64_t n, int64_t heads, int64_t groups, int64_t head_dim,
               int64_t state_size, int64_t chunk, int dtype, int variant, int device,
               std::uintptr_t stream) {
  if (variant != 0 && variant != 1) ThrowInvalid(kOp, "variant must be 0 or 1");
  if (chunk < 0) ThrowInvalid(kOp, "chunk must be >= 0 (0: the whole run)");
  if (batch < 0 || n < 0 || heads < 0 || head_dim < 0) {
    ThrowInvalid(kOp, "batch, n, heads and head_dim must be >= 0");
  }
  if (groups <= 0 || heads % groups != 0) {
    ThrowInvalid(kOp, "groups must be > 0 and divide heads = " + std::to_string(heads));
  }
  if (!SsmScanSupportsStateSize(static_cast<int>(state_size))) {
    ThrowInvalid(kOp, "state_size must be 16, 32, 64 or 128, got " + std::to_string(state_size));
  }
  if (!IsValidDType(dtype)) ThrowInvalid(kOp, "unknown dtype code " + std::to_string(dtype));
  if (chunk == 0 || chunk > n) chunk = n > 0 ? n : 1;
  const int64_t chunks = n > 0 ? (n + chunk - 1) / chunk : 1;
  if (state_rows != 0 && chunks != 1) {
    ThrowInvalid(kOp, "state_rows (states indexed by slot) takes the scan in one piece (chunk 0)");
  }
  if (batch * chunks > 65535 || heads > 65535) {
    ThrowInvalid(kOp, "batch x chunks and heads must be <= 65535");
  }
  if (device < 0) ThrowInvalid(kOp, "device index must be >= 0");
  if (batch == 0 || heads == 0 || head_dim == 0) return;
  // A null state starts from zero; a null y computes the states only (the chunked scan's first
  // pass), which then needs state_out.
  if (A == 0 || D == 0 || (y == 0 && state_out == 0) ||
      (n > 0 && (x == 0 || dt == 0 || B == 0 || C == 0))) {
    ThrowInvalid(kOp, "x, dt, A, D, B and C must be non-null, and y or state_out");
  }
  const int elem = dtype == 0 ? 4 : 2;
  const int per_lane = static_cast<int>(state_size < 32 ? 1 : state_size / 32);
  const int b_align = elem * per_lane > 16 ? 16 : elem * per_lane;
  if (B % b_align != 0 || C % b_align != 0 || (state != 0 && state % 16 != 0) ||
      (state_out != 0 && state_out % 16 != 0)) {
    ThrowInvalid(kOp, "B and C must be " + std::to_string(b_align) +
                          "-byte aligned, the states 16-byte aligned");
  }
  for (int i = 0; i < 3; ++i) {
    if (b_strides[i] % per_lane != 0 || c_strides[i] % per_lane != 0) {
      ThrowInvalid(kOp, "B and C strides must be multiples of " + std::to_string(per_lane));
    }
  }

  SsmScanParams p{};
  p.x = reinterpret_cast<const void*>(x);
  p.x_batch_stride = x_strides[0];
  p.x_token_stride = x_strides[1];
  p.x_head_stride = x_strides[2];
  p.dt = reinterpret_cast<const float*>(dt);
  p.dt_batch_stride = dt_strides[0];
  p.dt_token_stride = dt_strides[1];
  p.A = reinterpret_cast<const float*>(A);
  p.D = reinterpret_cast<const float*>(D);
  p.B = reinterpret_cast<const void*>(B);
  p.C = reinterpret_cast<const void*>(C);
  p.b_batch_stride = b_strides[0];
  p.b_token_stride = b_strides[1];
  p.b_group_stride = b_strides[2];
  p.c_batch_stride = c_strides[0];
  p.c_token_stride = c_strides[1];
  p.c_group_stride = c_strides[2];
  p.n_valid = reinterpret_cast<const int64_t*>(n_valid);
  p.state = reinterpret_cast<const float*>(state);
  p.state_out = reinterpret_cast<float*>(state_out);
  p.state_rows = reinterpret_cast<const int64_t*>(state_rows);
  p.y = reinterpret_cast<float*>(y);
  p.batch = static_cast<int>(batch);
  p.n = static_cast<int>(n);
  p.heads = static_cast<int>(heads);
  p.groups = static_cast<int>(groups);
  p.head_dim = static_cast<int>(head_dim);
  p.state_size = static_cast<int>(state_size);
  p.chunk = static_cast<int>(chunk);
  p.chunks = static_cast<int>(chunks);
  p.dtype = static_cast<DType>(dtype);
  p.variant = variant;

  ScopedDevice guard(kOp, device);
  CheckCuda(kOp, SsmScan(p, reinterpret_cast<cudaStream_t>(stream)), "kernel launch");
}

void SsmChunkCombineOp(std::uintptr_t states, std::uintptr_t decay, std::uintptr_t initial,
                       std::uintptr_t final_state, int64_t batch, int64_t chunks, int64_t heads,
                       int64_t head_elems, int device, std::uintptr_t stream) {
  constexpr const char* kCombine = "twotower_rt._C.ssm_chunk_combine";
  if (batch < 0 || chunks < 1 || heads < 0 || head_elems < 0 || head_elems % 4 != 0) {
    ThrowInvalid(kCombine, "need batch, heads >= 0, chunks >= 1 and head_elems a multiple of 4");
  }
  if (batch > 0 && heads > 0 && head_elems > 0 && (states == 0 || decay == 0)) {
    ThrowInvalid(kCombine, "states and decay must be non-null");
  }
  for (std::uintptr_t ptr : {states, initial, final_state}) {
    if (ptr % 16 != 0) ThrowInvalid(kCombine, "the states must be 16-byte aligned");
  }
  if (device < 0) ThrowInvalid(kCombine, "device index must be >= 0");
  SsmChunkCombineParams p{};
  p.states = reinterpret_cast<float*>(states);
  p.decay = reinterpret_cast<const float*>(decay);
  p.initial = reinterpret_cast<const float*>(initial);
  p.final_state = reinterpret_cast<float*>(final_state);
  p.batch = static_cast<int>(batch);
  p.chunks = static_cast<int>(chunks);
  p.heads = static_cast<int>(heads);
  p.head_elems = static_cast<int>(head_elems);
  ScopedDevice guard(kCombine, device);
  CheckCuda(kCombine, SsmChunkCombine(p, reinterpret_cast<cudaStream_t>(stream)), "kernel launch");
}

}  // namespace twotower_rt
