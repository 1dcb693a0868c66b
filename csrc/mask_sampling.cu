// Launchers for twotower_rt._C.mask_sampling and twotower_rt._C.sample_tokens: check what Python
// hands over (pointers as integers, sizes, strides in elements, dtype codes, a stream), run the
// kernels from include/twotower_rt/{mask_sampling,sample_tokens}.cuh, and turn every CUDA error
// into an exception naming the op.
#include <cmath>
#include <cstdint>
#include <string>

#include "op_errors.h"
#include "ops.h"
#include "twotower_rt/mask_sampling.cuh"
#include "twotower_rt/sample_tokens.cuh"

namespace twotower_rt {

namespace {

constexpr const char* kMaskSamplingOp = "twotower_rt._C.mask_sampling";
constexpr const char* kSampleTokensOp = "twotower_rt._C.sample_tokens";

}  // namespace

int64_t MaskSamplingWorkspaceOp(int64_t batch, int64_t block_size, int64_t vocab) {
  if (batch < 0 || block_size < 0 || vocab <= 0) {
    ThrowInvalid("twotower_rt._C.mask_sampling_workspace_bytes",
                 "need batch >= 0, block_size >= 0, vocab > 0");
  }
  return MaskSamplingWorkspaceBytes(batch, block_size, vocab);
}

void MaskSamplingOp(std::uintptr_t logits, int64_t logits_batch_stride,
                    int64_t logits_position_stride, std::uintptr_t block, int64_t block_row_stride,
                    std::uintptr_t step, std::uintptr_t seed, std::uintptr_t offset,
                    std::uintptr_t out_block, std::uintptr_t out_masked,
                    std::uintptr_t out_num_committed, std::uintptr_t out_prediction,
                    std::uintptr_t out_confidence, std::uintptr_t workspace,
                    int64_t workspace_bytes, int64_t batch, int64_t block_size, int64_t vocab,
                    int64_t mask_token_id, int64_t steps_per_block, double confidence_threshold,
                    double temperature, int dtype, int device, std::uintptr_t stream) {
  const char* op = kMaskSamplingOp;
  if (batch < 0 || block_size < 0) ThrowInvalid(op, "batch and block_size must be >= 0");
  if (vocab <= 0 || vocab > mask_sampling::kMaxVocab) {
    ThrowInvalid(op, "vocab must be in [1, " + std::to_string(mask_sampling::kMaxVocab) +
                         "], got " + std::to_string(vocab));
  }
  if (block_size > mask_sampling::kMaxBlockSize) {
    ThrowInvalid(op, "block_size " + std::to_string(block_size) + " exceeds " +
                         std::to_string(mask_sampling::kMaxBlockSize));
  }
  if (block_size > 0 && batch > mask_sampling::kMaxPositions / block_size) {
    ThrowInvalid(op, "batch * block_size exceeds " + std::to_string(mask_sampling::kMaxPositions));
  }
  if (mask_token_id < 0 || mask_token_id >= vocab) {
    ThrowInvalid(op, "mask_token_id " + std::to_string(mask_token_id) + " is outside [0, " +
                         std::to_string(vocab) + ")");
  }
  if (steps_per_block < 1) ThrowInvalid(op, "steps_per_block must be >= 1");
  if (!std::isfinite(confidence_threshold)) ThrowInvalid(op, "confidence_threshold must be finite");
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) {
    ThrowInvalid(op, "temperature must be finite and >= 0");
  }
  if (!IsValidDType(dtype)) ThrowInvalid(op, "unknown dtype code " + std::to_string(dtype));
  if (device < 0) ThrowInvalid(op, "device index must be >= 0");
  if (batch == 0 || block_size == 0) return;
  if (logits == 0 || block == 0 || step == 0 || out_block == 0 || out_masked == 0 ||
      out_num_committed == 0 || out_prediction == 0 || out_confidence == 0 || workspace == 0) {
    ThrowInvalid(op, "logits, block, step, the outputs and the workspace must be non-null");
  }
  if (temperature > 0.0 && (seed == 0 || offset == 0)) {
    ThrowInvalid(op, "seed and offset are required when temperature > 0");
  }
  if (workspace_bytes < MaskSamplingWorkspaceBytes(batch, block_size, vocab)) {
    ThrowInvalid(op, "workspace of " + std::to_string(workspace_bytes) +
                         " bytes; this shape needs " +
                         std::to_string(MaskSamplingWorkspaceBytes(batch, block_size, vocab)));
  }
  if (!IsAligned(reinterpret_cast<const void*>(workspace), 16)) {
    ThrowInvalid(op, "workspace must be 16-byte aligned");
  }

  MaskSamplingParams p{};
  p.logits = reinterpret_cast<const void*>(logits);
  p.logits_batch_stride = logits_batch_stride;
  p.logits_position_stride = logits_position_stride;
  p.block = reinterpret_cast<const int64_t*>(block);
  p.block_row_stride = block_row_stride;
  p.step = reinterpret_cast<const int64_t*>(step);
  p.seed = reinterpret_cast<const int64_t*>(seed);
  p.offset = reinterpret_cast<const int64_t*>(offset);
  p.out_block = reinterpret_cast<int64_t*>(out_block);
  p.out_masked = reinterpret_cast<bool*>(out_masked);
  p.out_num_committed = reinterpret_cast<int64_t*>(out_num_committed);
  p.out_prediction = reinterpret_cast<int64_t*>(out_prediction);
  p.out_confidence = reinterpret_cast<float*>(out_confidence);
  p.partials = reinterpret_cast<float4*>(workspace);
  p.batch = batch;
  p.block_size = block_size;
  p.vocab = vocab;
  p.mask_token_id = mask_token_id;
  p.steps_per_block = steps_per_block;
  p.confidence_threshold = static_cast<float>(confidence_threshold);
  p.temperature = static_cast<float>(temperature);
  p.dtype = static_cast<DType>(dtype);

  ScopedDevice guard(op, device);
  CheckCuda(op, MaskSampling(p, reinterpret_cast<cudaStream_t>(stream)), "kernel launch");
}

int64_t SampleTokensSplitSizeOp(int64_t batch, int64_t vocab, int64_t splits, int64_t sm_count) {
  if (batch < 0 || vocab <= 0 || splits < 0 || sm_count <= 0) {
    ThrowInvalid("twotower_rt._C.sample_tokens_split_size",
                 "need batch >= 0, vocab > 0, splits >= 0 and sm_count > 0");
  }
  return SampleTokensSplitSize(batch, vocab, static_cast<int>(sm_count), splits);
}

int64_t SampleTokensWorkspaceOp(int64_t batch, int64_t split_size) {
  if (batch < 0 || split_size < 0) {
    ThrowInvalid("twotower_rt._C.sample_tokens_workspace_bytes",
                 "need batch >= 0 and split_size >= 0");
  }
  return static_cast<int64_t>(SampleTokensWorkspaceBytes(batch, split_size));
}

void SampleTokensOp(std::uintptr_t logits, int64_t logits_row_stride, std::uintptr_t seed,
                    std::uintptr_t offset, std::uintptr_t out, int64_t batch, int64_t vocab,
                    int64_t top_k, double top_p, double temperature, int64_t split_size,
                    std::uintptr_t workspace, int64_t workspace_bytes, int dtype, int device,
                    std::uintptr_t stream) {
  const char* op = kSampleTokensOp;
  if (batch < 0) ThrowInvalid(op, "batch must be >= 0");
  if (vocab <= 0 || vocab > sample_tokens::kMaxVocab) {
    ThrowInvalid(op, "vocab must be in [1, " + std::to_string(sample_tokens::kMaxVocab) +
                         "], got " + std::to_string(vocab));
  }
  if (!(top_p > 0.0) || top_p > 1.0) ThrowInvalid(op, "top_p must be in (0, 1]");
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) {
    ThrowInvalid(op, "temperature must be finite and >= 0");
  }
  if (!IsValidDType(dtype)) ThrowInvalid(op, "unknown dtype code " + std::to_string(dtype));
  if (device < 0) ThrowInvalid(op, "device index must be >= 0");
  if (batch == 0) return;
  if (logits == 0 || out == 0) ThrowInvalid(op, "logits and out must be non-null");
  if (temperature > 0.0 && (seed == 0 || offset == 0)) {
    ThrowInvalid(op, "seed and offset are required when temperature > 0");
  }
  if (split_size < 0 || split_size % 8 != 0 || (split_size > 0 && batch > 65535)) {
    ThrowInvalid(op, "split_size must be 0 or a multiple of 8 (and batch <= 65535 to split), got " +
                         std::to_string(split_size));
  }
  if (split_size > 0 &&
      (workspace == 0 || workspace % 8 != 0 ||
       workspace_bytes < static_cast<int64_t>(SampleTokensWorkspaceBytes(batch, split_size)))) {
    ThrowInvalid(op, "split rows need an 8-byte aligned workspace of sample_tokens_workspace_bytes");
  }

  SampleTokensParams p{};
  p.logits = reinterpret_cast<const void*>(logits);
  p.logits_row_stride = logits_row_stride;
  p.seed = reinterpret_cast<const int64_t*>(seed);
  p.offset = reinterpret_cast<const int64_t*>(offset);
  p.out = reinterpret_cast<int64_t*>(out);
  p.batch = batch;
  p.vocab = vocab;
  p.top_k = top_k;
  p.top_p = static_cast<float>(top_p);
  p.temperature = static_cast<float>(temperature);
  p.dtype = static_cast<DType>(dtype);

  ScopedDevice guard(op, device);
  CheckCuda(op,
            SampleTokens(p, split_size, reinterpret_cast<void*>(workspace),
                         reinterpret_cast<cudaStream_t>(stream)),
            "kernel launch");
}

}  // namespace twotower_rt
