// One mask-diffusion decision for a batch of blocks, on the device (TWOTOWER.md section 4):
//
//   x = logits[b, s, :] with x[mask_token_id] = -1e12;   logp = log_softmax(x)
//   prediction[b, s] = argmax logp                  (temperature <= 0)
//                    = argmax logp / T + gumbel     (temperature T > 0; philox.cuh's noise)
//   confidence[b, s] = exp(logp[prediction])        (untempered)
//   then per sequence b, over its masked positions: k = n_masked on the last step, else
//   min(n_masked, max(n_above or 1, ceil(n_masked / (T_steps - step)))), n_above = #conf > gamma;
//   the k most confident masked positions (ties: lower position first) take their prediction.
// Committed positions are never revisited: their logits are not read at all, their prediction is
// their token and their confidence +inf. Reference: python/twotower_rt/ops/mask_sampling.py
// (mask_sampling_ref).
//
// Floor. The logits of the masked positions must be read once: B * S * V * 4 bytes in fp32, 8 MB
// per sequence at S = 16, V = 131072 (2.8 us at 3.0 TB/s for B = 1, 179 us for B = 64), less as a
// block fills up. Everything else (partials, block ids, outputs) is under 0.1% of that. Per
// element: ~6 FLOPs and one exp2; at T > 0 also a quarter Philox4x32-10 (10 rounds of 2 mul.hi +
// 2 mul.lo + xors) and two logf, skipped for every vector whose logits cannot beat the running best
// score (x/T + kGumbelMax < best): compute stays under the memory time for peaked distributions,
// not for flat ones.
//
// Mapping. Phase 1 (MaskSamplingPartialKernel): one CTA of 256 threads per (position, V-split),
// grid position-major so neighbouring CTAs stream neighbouring memory; 16-byte loads (4 fp32 or 8
// bf16) when the row starts and strides allow, four in flight per thread; each CTA writes one
// partial (max, sum of exp(x - max), best score, its index). The split count depends only on the
// shape (so results are bitwise the same on every GPU): about 1056 CTAs, splits of >= 4096 logits.
// Phase 2 (MaskSamplingCommitKernel): one CTA per sequence, one warp per position merges that
// position's partials in a fixed order, then the commit rule over the S <= 1024 positions by
// counting ranks in shared memory (S^2 compares; 256 at S = 16), written in place if asked.
//
// Resources (nvcc 13.0.88, sm_90a, -Xptxas -v, 10 instantiations): no stack, no spills. Phase 1 at
// 256 threads: fp32 16-byte loads 40 registers greedy / 48 sampling (6 and 5 CTAs per SM), bf16
// 64 / 63 (4 CTAs per SM), scalar fallback 30 / 52; 128 B of shared memory. Phase 2: 32 registers,
// 13 KB of shared memory. Measured on an H200 (bench/results/2026-11-27-nvidia-h200.json): 64 x 16 x
// 131072 fp32 in 134 us greedy (4.0 TB/s, 94% of the measured copy bandwidth), 500 us at T = 0.7
// (the Philox noise: compute-bound); batch 1 in 10 us (launch- and latency-bound).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "twotower_rt/common.cuh"
#include "twotower_rt/philox.cuh"

namespace twotower_rt {

struct MaskSamplingParams {
  const void* logits;  // [batch, block_size, vocab], unit vocab stride
  int64_t logits_batch_stride;
  int64_t logits_position_stride;
  const int64_t* block;  // [batch, block_size] token ids, row stride block_row_stride
  int64_t block_row_stride;
  const int64_t* step;    // [batch]: this decision's step within the block, 0-based
  const int64_t* seed;    // [batch]; read only when temperature > 0
  const int64_t* offset;  // [batch]; read only when temperature > 0
  int64_t* out_block;     // [batch, block_size] contiguous; may be `block` itself (in place)
  bool* out_masked;       // [batch, block_size]: still masked after this step
  int64_t* out_num_committed;  // [batch]
  int64_t* out_prediction;     // [batch, block_size]
  float* out_confidence;       // [batch, block_size]
  float4* partials;  // workspace [batch * block_size * num_splits]: MaskSamplingWorkspaceBytes
  int64_t batch;
  int64_t block_size;
  int64_t vocab;
  int64_t num_splits;  // MaskSamplingSplits
  int64_t split_size;
  int64_t mask_token_id;  // in [0, vocab)
  int64_t steps_per_block;
  float confidence_threshold;
  float temperature;  // <= 0: greedy
  DType dtype;        // of the logits
};

namespace mask_sampling {

constexpr int kPartialThreads = 256;
constexpr int kLoadsInFlight = 4;
constexpr int kMaxBlockSize = 1024;     // positions per sequence: one phase-2 thread each
constexpr int64_t kTargetCtas = 1056;   // 132 SMs x 8 resident 256-thread CTAs
constexpr int64_t kMinSplit = 4096;     // logits per CTA at least (16 KB in fp32)
constexpr int64_t kMaxPositions = INT_MAX / 64;  // batch * block_size; grid = positions * splits
constexpr int64_t kMaxVocab = INT_MAX / 2;       // 32-bit in-row indices
constexpr float kMaskedLogit = -1e12f;           // the reference's forced mask-token logit
constexpr float kLog2e = 1.4426950408889634f;

// Running (max, sum of exp(x - max)) and (best score, its index) over part of a row.
struct Running {
  float max;
  float sum;
  float best;
  int index;
};

__device__ __forceinline__ Running EmptyRunning() { return {-INFINITY, 0.f, -INFINITY, INT_MAX}; }

// Explicit _rn operations: no FMA contraction, so every merge of the same two partials gives the
// same bits whichever side it is computed on.
__device__ __forceinline__ void Merge(Running& a, const Running& b) {
  const float m = fmaxf(a.max, b.max);
  if (m > -INFINITY) {
    const float ea = exp2f(__fmul_rn(__fsub_rn(a.max, m), kLog2e));
    const float eb = exp2f(__fmul_rn(__fsub_rn(b.max, m), kLog2e));
    a.sum = __fadd_rn(__fmul_rn(a.sum, ea), __fmul_rn(b.sum, eb));
  }
  a.max = m;
  if (b.best > a.best || (b.best == a.best && b.index < a.index)) {
    a.best = b.best;
    a.index = b.index;
  }
}

__device__ __forceinline__ Running WarpMerge(Running r) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Running other;
    other.max = __shfl_xor_sync(0xffffffffu, r.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, r.sum, offset);
    other.best = __shfl_xor_sync(0xffffffffu, r.best, offset);
    other.index = __shfl_xor_sync(0xffffffffu, r.index, offset);
    Merge(r, other);
  }
  return r;
}

// Gumbel noise for the N elements starting at v (v % 4 == 0 when N % 4 == 0).
template <int N>
__device__ __forceinline__ void GumbelNoise(uint2 key, uint32_t position, int64_t offset, int v,
                                            float (&g)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const uint4 r = Philox4x32_10(PhiloxCounter(v / 4 + q, position, offset), key);
      g[4 * q + 0] = GumbelFromBits(r.x);
      g[4 * q + 1] = GumbelFromBits(r.y);
      g[4 * q + 2] = GumbelFromBits(r.z);
      g[4 * q + 3] = GumbelFromBits(r.w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const uint4 r = Philox4x32_10(PhiloxCounter((v + i) / 4, position, offset), key);
      g[i] = GumbelFromBits(Word(r, (v + i) % 4));
    }
  }
}

struct NoiseSource {
  uint2 key;
  uint32_t position;
  int64_t offset;
  float inv_temperature;
};

// Folds x[0..N) (elements v..v+N of the row) into r. Elements arrive in increasing v per thread,
// so a strict > keeps the lowest index among equal scores, as torch.argmax does.
template <int N, bool kSample>
__device__ __forceinline__ void Visit(Running& r, float (&x)[N], int v, int mask_token_id,
                                      const NoiseSource& noise) {
  float vmax = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (v + i == mask_token_id) x[i] = kMaskedLogit;
    vmax = fmaxf(vmax, x[i]);
  }
  if (vmax > r.max) {
    r.sum *= exp2f((r.max - vmax) * kLog2e);  // 0 * exp2(-inf) = 0 on the first update
    r.max = vmax;
  }
  if (r.max > -INFINITY) {
#pragma unroll
    for (int i = 0; i < N; ++i) r.sum += exp2f((x[i] - r.max) * kLog2e);
  }
  if constexpr (!kSample) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (x[i] > r.best) {
        r.best = x[i];
        r.index = v + i;
      }
    }
  } else {
    // Gumbel draws are < kGumbelMax: a vector that cannot win needs no random numbers.
    if (vmax * noise.inv_temperature + kGumbelMax >= r.best) {
      float g[N];
      GumbelNoise(noise.key, noise.position, noise.offset, v, g);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float score = x[i] * noise.inv_temperature + g[i];
        if (score > r.best) {
          r.best = score;
          r.index = v + i;
        }
      }
    }
  }
}

template <typename T, int kVec, bool kSample>
__global__ void __launch_bounds__(kPartialThreads) MaskSamplingPartialKernel(
    const MaskSamplingParams p) {
  static_assert(kVec == 1 || sizeof(T) * kVec == 16, "vector loads are 16 bytes");
  static_assert(kVec == 1 || kVec % 4 == 0, "a vector covers whole Philox quads");
  __shared__ Running warp_partials[kPartialThreads / 32];

  const int num_splits = static_cast<int>(p.num_splits);
  const int position_flat = static_cast<int>(blockIdx.x) / num_splits;
  const int split = static_cast<int>(blockIdx.x) - position_flat * num_splits;
  const int block_size = static_cast<int>(p.block_size);
  const int b = position_flat / block_size;
  const int s = position_flat - b * block_size;
  // A committed position needs no prediction (uniform over the CTA: skip the whole slice).
  if (p.block[b * p.block_row_stride + s] != p.mask_token_id) return;

  const T* row =
      static_cast<const T*>(p.logits) + b * p.logits_batch_stride + s * p.logits_position_stride;
  const int vocab = static_cast<int>(p.vocab);
  const int begin = split * static_cast<int>(p.split_size);
  const int end = min(vocab, begin + static_cast<int>(p.split_size));
  const int mask_token_id = static_cast<int>(p.mask_token_id);
  NoiseSource noise{};
  if constexpr (kSample) {
    noise.key = PhiloxKey(p.seed[b]);
    noise.position = static_cast<uint32_t>(s);
    noise.offset = p.offset[b];
    noise.inv_temperature = 1.f / p.temperature;
  }

  Running r = EmptyRunning();
  const int stride = kPartialThreads * kVec;
  const int vec_end = begin + (end - begin) / kVec * kVec;  // begin is a multiple of 8
  int v = begin + static_cast<int>(threadIdx.x) * kVec;
  // kLoadsInFlight independent 16-byte loads before any use: enough bytes in flight per SM to
  // cover HBM latency with 8 CTAs resident.
  for (; v + (kLoadsInFlight - 1) * stride < vec_end; v += kLoadsInFlight * stride) {
    float x[kLoadsInFlight][kVec];
#pragma unroll
    for (int j = 0; j < kLoadsInFlight; ++j) LoadAsFloat(row + v + j * stride, x[j]);
#pragma unroll
    for (int j = 0; j < kLoadsInFlight; ++j) {
      Visit<kVec, kSample>(r, x[j], v + j * stride, mask_token_id, noise);
    }
  }
  for (; v < vec_end; v += stride) {
    float x[kVec];
    LoadAsFloat(row + v, x);
    Visit<kVec, kSample>(r, x, v, mask_token_id, noise);
  }
  if constexpr (kVec > 1) {  // V % kVec tail of the last split
    for (int t = vec_end + static_cast<int>(threadIdx.x); t < end; t += kPartialThreads) {
      float x[1] = {ToFloat(row[t])};
      Visit<1, kSample>(r, x, t, mask_token_id, noise);
    }
  }

  r = WarpMerge(r);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_partials[warp] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    Running total = warp_partials[0];
#pragma unroll
    for (int w = 1; w < kPartialThreads / 32; ++w) Merge(total, warp_partials[w]);
    p.partials[blockIdx.x] =
        make_float4(total.max, total.sum, total.best, __int_as_float(total.index));
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxBlockSize) MaskSamplingCommitKernel(
    const MaskSamplingParams p) {
  __shared__ int64_t prediction_s[kMaxBlockSize];
  __shared__ float confidence_s[kMaxBlockSize];
  __shared__ bool masked_s[kMaxBlockSize];

  const int b = blockIdx.x;
  const int block_size = static_cast<int>(p.block_size);
  const int num_splits = static_cast<int>(p.num_splits);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int64_t* block_row = p.block + b * p.block_row_stride;

  for (int s = warp; s < block_size; s += num_warps) {
    const int64_t token = block_row[s];
    if (token != p.mask_token_id) {
      if (lane == 0) {
        prediction_s[s] = token;
        confidence_s[s] = INFINITY;
      }
      continue;
    }
    const float4* partials = p.partials + (static_cast<int64_t>(b) * block_size + s) * num_splits;
    Running r = EmptyRunning();
    for (int j = lane; j < num_splits; j += 32) {
      const float4 q = partials[j];
      Merge(r, Running{q.x, q.y, q.z, __float_as_int(q.w)});
    }
    r = WarpMerge(r);
    if (lane == 0) {
      // No finite score anywhere (all -inf or NaN logits): token 0, as torch.argmax picks.
      const int index = r.index == INT_MAX ? 0 : r.index;
      const T* row = static_cast<const T*>(p.logits) + b * p.logits_batch_stride +
                     s * p.logits_position_stride;
      const float x = index == p.mask_token_id ? kMaskedLogit : ToFloat(row[index]);
      prediction_s[s] = index;
      confidence_s[s] = exp2f((x - r.max) * kLog2e) / r.sum;
    }
  }

  const int tid = threadIdx.x;
  const bool active = tid < block_size;
  const int64_t token = active ? block_row[tid] : 0;  // read before any write (in place)
  const bool masked = active && token == p.mask_token_id;
  if (active) masked_s[tid] = masked;
  __syncthreads();
  const float confidence = active ? confidence_s[tid] : 0.f;
  const int n_masked = __syncthreads_count(masked);
  const int n_above = __syncthreads_count(masked && confidence > p.confidence_threshold);

  const int64_t step = p.step[b];
  int64_t k = n_masked;
  if (step < p.steps_per_block - 1) {
    const int64_t remaining = p.steps_per_block - step;
    k = std::max<int64_t>(n_above > 0 ? n_above : 1, (n_masked + remaining - 1) / remaining);
    k = std::min<int64_t>(k, n_masked);
  }
  if (active) {
    bool commit = false;
    if (masked) {
      int rank = 0;  // masked positions ranked above this one: more confident, or tied and earlier
      for (int q = 0; q < block_size; ++q) {
        const float c = confidence_s[q];
        rank += masked_s[q] && (c > confidence || (c == confidence && q < tid));
      }
      commit = rank < k;
    }
    const int64_t out = b * block_size + tid;
    p.out_block[out] = commit ? prediction_s[tid] : token;
    p.out_masked[out] = masked && !commit;
    p.out_prediction[out] = prediction_s[tid];
    p.out_confidence[out] = confidence;
  }
  if (tid == 0) p.out_num_committed[b] = k;
}

// Shape-only (so the same on every GPU): about kTargetCtas CTAs, splits of >= kMinSplit logits,
// split_size a multiple of 8 so every split starts 16-byte aligned for fp32 and bf16.
inline void Splits(int64_t positions, int64_t vocab, int64_t* num_splits, int64_t* split_size) {
  int64_t n = (kTargetCtas + positions - 1) / std::max<int64_t>(positions, 1);
  n = std::max<int64_t>(1, std::min<int64_t>(n, vocab / kMinSplit));
  int64_t size = (vocab + n - 1) / n;
  size = (size + 7) / 8 * 8;
  *split_size = size;
  *num_splits = (vocab + size - 1) / size;
}

template <typename T>
bool CanVectorize(const MaskSamplingParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  return IsAligned(p.logits, 16) && p.logits_batch_stride % kVec == 0 &&
         p.logits_position_stride % kVec == 0;
}

template <typename T, int kVec, bool kSample>
cudaError_t Launch(const MaskSamplingParams& p, cudaStream_t stream) {
  const int64_t positions = p.batch * p.block_size;
  MaskSamplingPartialKernel<T, kVec, kSample>
      <<<static_cast<unsigned>(positions * p.num_splits), kPartialThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int threads =
      static_cast<int>(std::min<int64_t>(kMaxBlockSize, std::max<int64_t>(32, 32 * p.block_size)));
  MaskSamplingCommitKernel<T><<<static_cast<unsigned>(p.batch), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mask_sampling

// Bytes of the `partials` workspace for this shape (16 per position and V-split).
inline int64_t MaskSamplingWorkspaceBytes(int64_t batch, int64_t block_size, int64_t vocab) {
  int64_t num_splits = 0, split_size = 0;
  mask_sampling::Splits(batch * block_size, vocab, &num_splits, &split_size);
  return batch * block_size * num_splits * static_cast<int64_t>(sizeof(float4));
}

// Host launcher. Assumes sizes were validated (csrc/mask_sampling.cu does it) and fills in
// num_splits / split_size itself; returns the launch's error, cudaErrorInvalidValue for an unknown
// dtype code or sizes out of range.
inline cudaError_t MaskSampling(MaskSamplingParams p, cudaStream_t stream) {
  if (p.batch == 0 || p.block_size == 0) return cudaSuccess;
  if (p.batch * p.block_size > mask_sampling::kMaxPositions ||
      p.block_size > mask_sampling::kMaxBlockSize || p.vocab > mask_sampling::kMaxVocab ||
      p.vocab <= 0 || p.batch > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  mask_sampling::Splits(p.batch * p.block_size, p.vocab, &p.num_splits, &p.split_size);
  const bool sample = p.temperature > 0.f;
  return TWOTOWER_RT_DTYPE_SWITCH(p.dtype, T, [&] {
    return TWOTOWER_RT_BOOL_SWITCH(sample, kSample, [&] {
      if (mask_sampling::CanVectorize<T>(p)) {
        return mask_sampling::Launch<T, 16 / sizeof(T), kSample>(p, stream);
      }
      return mask_sampling::Launch<T, 1, kSample>(p, stream);
    });
  });
}

}  // namespace twotower_rt
