// The AR / mock-AR sampler (TWOTOWER.md section 4), one token per row, on the device:
//
//   temperature <= 0:  out[b] = argmax logits[b]                         (lowest index on ties)
//   otherwise, with l = logits[b] / T:  keep the top_k largest (ties at the k-th all kept), then
//   the top_p nucleus of softmax over those (the smallest prefix, by decreasing logit, whose mass
//   reaches top_p), and draw out[b] = argmax over the kept tokens of l + gumbel, with philox.cuh's
//   noise at position 0 (a Gumbel-max draw is a draw from the renormalised kept distribution).
// Reference: python/twotower_rt/ops/sample_tokens.py (sample_tokens_ref).
//
// No sort. The top-k and top-p cut-offs are found by radix selection on the logits'
// order-preserving 32-bit keys: 4 histogram passes of 8 bits each (counts for top-k; probability
// mass for top-p, in 40-bit fixed point so that the sums are exact integers and the result does
// not depend on the order of the atomics), with warp-aggregated shared-memory atomics (the lanes of
// a warp that hit the same bin add once: logits of one binade share their top key bits). Each pass
// re-reads the row, from L2 after the first (512 KB at V = 131072).
//
// Floor: read the logits once, B * V * 4 bytes (0.5 MB per row in fp32, 0.17 us at 3.0 TB/s).
// Greedy and unfiltered sampling are one pass; top-k adds 4, top-p 6 (max, total, 4 selections).
// One CTA per row (SampleTokensKernel) leaves most SMs idle at small batch: measured on an H200 at
// batch 1, V = 131072 fp32, top-k 322 us and top-p 625 us. Rows of small batches are therefore
// split over CTAs (SampleTokensSplitKernel, below; not yet run on a GPU), with the same result.
//
// Resources (nvcc 13.0.88, sm_90a, -Xptxas -v): 51-57 registers at 1024 threads, no stack, no
// spills, 2.3 KB of shared memory.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "twotower_rt/common.cuh"
#include "twotower_rt/philox.cuh"

namespace twotower_rt {

struct SampleTokensParams {
  const void* logits;  // [batch, vocab], row stride logits_row_stride, unit vocab stride
  int64_t logits_row_stride;
  const int64_t* seed;    // [batch]; read only when temperature > 0
  const int64_t* offset;  // [batch]
  int64_t* out;           // [batch]
  int64_t batch;
  int64_t vocab;
  int64_t top_k;      // <= 0 or >= vocab: no top-k
  float top_p;        // >= 1: no top-p; otherwise in (0, 1)
  float temperature;  // <= 0: greedy
  DType dtype;
};

namespace sample_tokens {

constexpr int kThreads = 1024;
constexpr int kBins = 256;
constexpr int64_t kMaxVocab = int64_t{1} << 23;  // 2^23 * 2^40 fixed-point mass fits 64 bits
constexpr float kMassScale = 0x1p40f;
constexpr float kLog2e = 1.4426950408889634f;

// Larger float -> larger key (NaN aside).
__device__ __forceinline__ uint32_t OrderedKey(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Calls f(x, v) for every element v in [begin, end) of the row (begin a multiple of kVec), each
// thread of the kNThreads in increasing v.
template <typename T, int kVec, int kNThreads, typename F>
__device__ __forceinline__ void ForEachIn(const T* row, int begin, int end, F&& f) {
  const int vec_end = begin + (end - begin) / kVec * kVec;
  for (int v = begin + threadIdx.x * kVec; v < vec_end; v += kNThreads * kVec) {
    float x[kVec];
    LoadAsFloat(row + v, x);
#pragma unroll
    for (int i = 0; i < kVec; ++i) f(x[i], v + i);
  }
  for (int v = vec_end + threadIdx.x; v < end; v += kNThreads) f(ToFloat(row[v]), v);
}

template <typename T, int kVec, typename F>
__device__ __forceinline__ void ForEach(const T* row, int vocab, F&& f) {
  ForEachIn<T, kVec, kThreads>(row, 0, vocab, static_cast<F&&>(f));
}

struct SharedState {
  unsigned long long hist[kBins];
  unsigned long long total;
  float warp_best[kThreads / 32];
  int warp_index[kThreads / 32];
  float max;
  uint32_t digit;
  unsigned long long above;
};

// Warp-wide (max, lowest index on ties), in every lane.
__device__ __forceinline__ void WarpArgMax(float& best, int& index) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, index, o);
    if (ob > best || (ob == best && oi < index)) {
      best = ob;
      index = oi;
    }
  }
}

// Block-wide (max, lowest index on ties) of every thread's (best, index); the result is valid in
// thread 0 only. Every thread of the block must call it (it synchronises).
__device__ __forceinline__ void BlockArgMax(SharedState& sh, float& best, int& index) {
  WarpArgMax(best, index);
  if ((threadIdx.x & 31) == 0) {
    sh.warp_best[threadIdx.x >> 5] = best;
    sh.warp_index[threadIdx.x >> 5] = index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      if (sh.warp_best[w] > best || (sh.warp_best[w] == best && sh.warp_index[w] < index)) {
        best = sh.warp_best[w];
        index = sh.warp_index[w];
      }
    }
  }
}

// Adds `amount` to hist[bin] for the lanes with bin < kBins, one atomic per distinct bin per warp:
// logits of one binade share the top key bits, so unaggregated atomics would serialise.
__device__ __forceinline__ void AggregatedAdd(unsigned long long* hist, uint32_t bin,
                                              unsigned long long amount) {
  const unsigned active = __activemask();
  const unsigned group = __match_any_sync(active, bin);
  if (bin >= kBins) return;
  // 64-bit amounts < 2^41 split in 21-bit parts: a 32-lane sum of each stays below 2^26.
  const unsigned lo = __reduce_add_sync(group, static_cast<unsigned>(amount & 0x1fffffu));
  const unsigned mid = __reduce_add_sync(group, static_cast<unsigned>((amount >> 21) & 0x1fffffu));
  const unsigned hi = __reduce_add_sync(group, static_cast<unsigned>(amount >> 42));
  if ((threadIdx.x & 31) == __ffs(group) - 1) {
    atomicAdd(&hist[bin], (static_cast<unsigned long long>(hi) << 42) +
                              (static_cast<unsigned long long>(mid) << 21) + lo);
  }
}

// Warp 0: the first bin from the top where above + (sum of bins >= it) reaches need; else the
// lowest non-empty bin. Leaves the digit and above + (sum of bins over it) in shared memory.
__device__ __forceinline__ void FindDigit(SharedState& sh, unsigned long long above,
                                          unsigned long long need) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  const int top = kBins - 1 - 8 * lane;  // this lane's bins: top, top - 1, ..., top - 7
  unsigned long long local = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) local += sh.hist[top - j];
  unsigned long long inclusive = local;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned long long other = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  const unsigned crossing = __ballot_sync(0xffffffffu, above + inclusive >= need);
  const unsigned nonempty = __ballot_sync(0xffffffffu, local > 0);
  const bool found = crossing != 0;
  const int owner = found ? __ffs(crossing) - 1 : 31 - __clz(nonempty);
  if (lane == owner) {
    unsigned long long running = above + inclusive - local;  // bins above this lane's
    int digit = top;
    if (found) {
      for (int j = 0; j < 8; ++j) {
        const unsigned long long h = sh.hist[top - j];
        if (running + h >= need) {
          digit = top - j;
          break;
        }
        running += h;
      }
    } else {  // rounding left the whole prefix short of need: everything in it is kept
      unsigned long long acc = running;
      for (int j = 0; j < 8; ++j) {
        const unsigned long long h = sh.hist[top - j];
        if (h > 0) {
          digit = top - j;
          running = acc;
        }
        acc += h;
      }
    }
    sh.digit = static_cast<uint32_t>(digit);
    sh.above = running;
  }
}

// Radix selection of a key threshold: 4 passes of 8 bits. kMass: weights are the fixed-point
// probabilities exp((x - max) / T), else counts. Returns the key of the boundary element; every
// key >= it is kept. Only keys >= floor_key take part.
template <typename T, int kVec, bool kMass>
__device__ uint32_t RadixSelect(SharedState& sh, const T* row, int vocab, uint32_t floor_key,
                                unsigned long long need, float scale) {
  uint32_t prefix = 0, prefix_mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < kBins; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    const float max = sh.max;
    ForEach<T, kVec>(row, vocab, [&](float x, int) {
      const uint32_t key = OrderedKey(x);
      const bool in = key >= floor_key && (key & prefix_mask) == prefix;
      unsigned long long amount = 1;
      if constexpr (kMass) amount = __float2ull_rn(exp2f((x - max) * scale) * kMassScale);
      AggregatedAdd(sh.hist, in ? (key >> shift) & (kBins - 1) : kBins, amount);
    });
    __syncthreads();
    FindDigit(sh, above, need);
    __syncthreads();
    prefix |= sh.digit << shift;
    prefix_mask |= static_cast<uint32_t>(kBins - 1) << shift;
    above = sh.above;
    __syncthreads();  // sh.digit / sh.above are rewritten next pass
  }
  return prefix;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) SampleTokensKernel(const SampleTokensParams p) {
  static_assert(kVec == 1 || sizeof(T) * kVec == 16, "vector loads are 16 bytes");
  __shared__ SharedState sh;
  const int b = blockIdx.x;
  const int vocab = static_cast<int>(p.vocab);
  const T* row = static_cast<const T*>(p.logits) + b * p.logits_row_stride;
  const bool greedy = !(p.temperature > 0.f);
  const float inv_t = greedy ? 1.f : 1.f / p.temperature;
  const bool top_k = !greedy && p.top_k > 0 && p.top_k < p.vocab;
  const bool top_p = !greedy && p.top_p < 1.f;

  // Pass 1 (greedy, or top-p's max): argmax / max of the row.
  uint32_t floor_key = 0;
  if (greedy || top_p) {
    float best = -INFINITY;
    int index = INT_MAX;
    ForEach<T, kVec>(row, vocab, [&](float x, int v) {
      if (x > best) {
        best = x;
        index = v;
      }
    });
    BlockArgMax(sh, best, index);
    if (threadIdx.x == 0) {
      sh.max = best;
      if (greedy) p.out[b] = index == INT_MAX ? 0 : index;
    }
    __syncthreads();
    if (greedy) return;
  }

  if (top_k) {
    floor_key = RadixSelect<T, kVec, false>(sh, row, vocab, 0u,
                                            static_cast<unsigned long long>(p.top_k), 0.f);
  }
  if (top_p) {
    const float scale = inv_t * kLog2e;
    if (threadIdx.x == 0) sh.total = 0;
    __syncthreads();
    unsigned long long local = 0;
    const float max = sh.max;
    ForEach<T, kVec>(row, vocab, [&](float x, int) {
      if (OrderedKey(x) >= floor_key) {
        local += __float2ull_rn(exp2f((x - max) * scale) * kMassScale);
      }
    });
    atomicAdd(&sh.total, local);  // integer sum: the same whatever the order
    __syncthreads();
    const auto need = static_cast<unsigned long long>(static_cast<double>(p.top_p) *
                                                      static_cast<double>(sh.total));
    const uint32_t nucleus_key =
        RadixSelect<T, kVec, true>(sh, row, vocab, floor_key, need > 0 ? need : 1, scale);
    floor_key = nucleus_key > floor_key ? nucleus_key : floor_key;
  }

  // The draw: Gumbel-max over the kept tokens.
  const uint2 key = PhiloxKey(p.seed[b]);
  const int64_t offset = p.offset[b];
  float best = -INFINITY;
  int index = INT_MAX;
  ForEach<T, kVec>(row, vocab, [&](float x, int v) {
    if (OrderedKey(x) < floor_key || x * inv_t + kGumbelMax < best) return;
    const uint4 r = Philox4x32_10(PhiloxCounter(v / 4, 0u, offset), key);
    const float score = x * inv_t + GumbelFromBits(Word(r, v % 4));
    if (score > best) {
      best = score;
      index = v;
    }
  });
  BlockArgMax(sh, best, index);
  if (threadIdx.x == 0) {
    p.out[b] = index == INT_MAX ? 0 : index;
  }
}

// --- Split rows ---------------------------------------------------------------------------------
// One CTA per row leaves most SMs idle at small batch (measured on an H200 at batch 1, V = 131072:
// top-k 322 us, top-p 625 us). The split path cuts each row into `splits` slices of split_size
// logits, one CTA each, and runs every pass of SampleTokensKernel as a launch of its own: a CTA adds
// its slice's histogram into the row's histogram in a global workspace with 64-bit integer atomics
// (exact, so every sum and selection is bitwise the single CTA's whatever the order), and each CTA
// of the next launch replays the finished selections from those histograms (2 KB each, from L2).
// The draw ends in a 64-bit atomicMax of (ordered score, ~index): the highest score, the lowest
// index on ties, as BlockArgMax decides; a last launch writes the token. Launches: a memset, then
// greedy 1, or [max] + [4 top-k] + [total + 4 top-p] + draw, then the finish. Not yet run on a GPU.

constexpr int kSplitThreads = 256;
constexpr int kMinSplit = 2048;  // logits per CTA at least, when the split count is automatic
constexpr int kTopKHist = 0;
constexpr int kTopPHist = 4 * kBins;
constexpr int kTotalWord = 8 * kBins;
constexpr int kMaxWord = kTotalWord + 1;
constexpr int kResultWord = kTotalWord + 2;
constexpr int kWorkspaceWords = kTotalWord + 4;  // per row, 64-bit words

enum SplitPhase : int { kPhaseGreedy, kPhaseMax, kPhaseTopK, kPhaseTotal, kPhaseTopP, kPhaseDraw };

struct SplitParams {
  SampleTokensParams p;
  unsigned long long* workspace;  // [batch, kWorkspaceWords], zeroed before the first launch
  int split_size;                 // a multiple of 8, so slices keep 16-byte vector alignment
  int phase;                      // SplitPhase
  int pass;                       // 0..3: the radix pass of kPhaseTopK / kPhaseTopP
};

__device__ __forceinline__ float FromOrderedKey(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

// (score, index) as one 64-bit word whose unsigned order is: higher score, then lower index.
__device__ __forceinline__ unsigned long long PackBest(float score, int index) {
  return (static_cast<unsigned long long>(OrderedKey(score)) << 32) |
         (0xffffffffu - static_cast<uint32_t>(index));
}

// Warp-reduces (best, lowest index on ties); lane 0 folds it into *word when it names an element.
__device__ __forceinline__ void WarpArgMaxToGlobal(float best, int index, unsigned long long* word) {
  WarpArgMax(best, index);
  if ((threadIdx.x & 31) == 0 && index != INT_MAX) atomicMax(word, PackBest(best, index));
}

// The key prefix selected by the first `passes` radix passes, replayed from their histograms
// exactly as RadixSelect decided it (every thread of the CTA calls it; it synchronises).
__device__ uint32_t ReplaySelect(SharedState& sh, const unsigned long long* hists, int passes,
                                 unsigned long long need) {
  uint32_t prefix = 0;
  unsigned long long above = 0;
  for (int q = 0; q < passes; ++q) {
    for (int i = threadIdx.x; i < kBins; i += kSplitThreads) sh.hist[i] = hists[q * kBins + i];
    __syncthreads();
    FindDigit(sh, above, need);
    __syncthreads();
    prefix |= sh.digit << (24 - 8 * q);
    above = sh.above;
    __syncthreads();
  }
  return prefix;
}

// Radix pass `pass` over the slice: RadixSelect's histogram, added into the row's `hist`.
template <typename T, int kVec, bool kMass>
__device__ void SliceHistogram(SharedState& sh, const T* row, int begin, int end, uint32_t floor_key,
                               uint32_t prefix, int pass, float max, float scale,
                               unsigned long long* hist) {
  const int shift = 24 - 8 * pass;
  const uint32_t prefix_mask = pass == 0 ? 0u : ~0u << (shift + 8);
  for (int i = threadIdx.x; i < kBins; i += kSplitThreads) sh.hist[i] = 0;
  __syncthreads();
  ForEachIn<T, kVec, kSplitThreads>(row, begin, end, [&](float x, int) {
    const uint32_t key = OrderedKey(x);
    const bool in = key >= floor_key && (key & prefix_mask) == prefix;
    unsigned long long amount = 1;
    if constexpr (kMass) amount = __float2ull_rn(exp2f((x - max) * scale) * kMassScale);
    AggregatedAdd(sh.hist, in ? (key >> shift) & (kBins - 1) : kBins, amount);
  });
  __syncthreads();
  for (int i = threadIdx.x; i < kBins; i += kSplitThreads) {
    if (sh.hist[i] != 0) atomicAdd(&hist[i], sh.hist[i]);
  }
}

// One phase of the split path over slice blockIdx.x of row blockIdx.y.
template <typename T, int kVec>
__global__ void __launch_bounds__(kSplitThreads) SampleTokensSplitKernel(const SplitParams sp) {
  static_assert(kVec == 1 || sizeof(T) * kVec == 16, "vector loads are 16 bytes");
  __shared__ SharedState sh;
  const SampleTokensParams& p = sp.p;
  const int b = blockIdx.y;
  const int vocab = static_cast<int>(p.vocab);
  const int begin = blockIdx.x * sp.split_size;
  const int end = min(vocab, begin + sp.split_size);
  const T* row = static_cast<const T*>(p.logits) + b * p.logits_row_stride;
  unsigned long long* ws = sp.workspace + static_cast<int64_t>(b) * kWorkspaceWords;
  const float inv_t = 1.f / p.temperature;  // unused when greedy
  const bool top_k = p.top_k > 0 && p.top_k < p.vocab;
  const bool top_p = p.top_p < 1.f;

  if (sp.phase == kPhaseGreedy || sp.phase == kPhaseMax) {
    float best = -INFINITY;
    int index = INT_MAX;
    ForEachIn<T, kVec, kSplitThreads>(row, begin, end, [&](float x, int v) {
      if (x > best) {
        best = x;
        index = v;
      }
    });
    if (sp.phase == kPhaseGreedy) {
      WarpArgMaxToGlobal(best, index, ws + kResultWord);
      return;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, o));
    if ((threadIdx.x & 31) == 0) atomicMax(ws + kMaxWord, OrderedKey(best));
    return;
  }

  uint32_t floor_key = 0;
  if (top_k) {
    const auto need = static_cast<unsigned long long>(p.top_k);
    const int done = sp.phase == kPhaseTopK ? sp.pass : 4;
    const uint32_t prefix = ReplaySelect(sh, ws + kTopKHist, done, need);
    if (sp.phase == kPhaseTopK) {
      SliceHistogram<T, kVec, false>(sh, row, begin, end, 0u, prefix, sp.pass, 0.f, 0.f,
                                     ws + kTopKHist + sp.pass * kBins);
      return;
    }
    floor_key = prefix;
  }
  if (top_p) {
    const float max = FromOrderedKey(static_cast<uint32_t>(ws[kMaxWord]));
    const float scale = inv_t * kLog2e;
    if (sp.phase == kPhaseTotal) {
      unsigned long long local = 0;
      ForEachIn<T, kVec, kSplitThreads>(row, begin, end, [&](float x, int) {
        if (OrderedKey(x) >= floor_key) {
          local += __float2ull_rn(exp2f((x - max) * scale) * kMassScale);
        }
      });
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(0xffffffffu, local, o);
      if ((threadIdx.x & 31) == 0) atomicAdd(ws + kTotalWord, local);
      return;
    }
    auto need = static_cast<unsigned long long>(static_cast<double>(p.top_p) *
                                                static_cast<double>(ws[kTotalWord]));
    need = need > 0 ? need : 1;
    const int done = sp.phase == kPhaseTopP ? sp.pass : 4;
    const uint32_t prefix = ReplaySelect(sh, ws + kTopPHist, done, need);
    if (sp.phase == kPhaseTopP) {
      SliceHistogram<T, kVec, true>(sh, row, begin, end, floor_key, prefix, sp.pass, max, scale,
                                    ws + kTopPHist + sp.pass * kBins);
      return;
    }
    floor_key = prefix > floor_key ? prefix : floor_key;
  }

  // kPhaseDraw: Gumbel-max over the slice's kept tokens.
  const uint2 key = PhiloxKey(p.seed[b]);
  const int64_t offset = p.offset[b];
  float best = -INFINITY;
  int index = INT_MAX;
  ForEachIn<T, kVec, kSplitThreads>(row, begin, end, [&](float x, int v) {
    if (OrderedKey(x) < floor_key || x * inv_t + kGumbelMax < best) return;
    const uint4 r = Philox4x32_10(PhiloxCounter(v / 4, 0u, offset), key);
    const float score = x * inv_t + GumbelFromBits(Word(r, v % 4));
    if (score > best) {
      best = score;
      index = v;
    }
  });
  WarpArgMaxToGlobal(best, index, ws + kResultWord);
}

__global__ void SampleTokensFinishKernel(const unsigned long long* workspace, int64_t* out,
                                         int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const unsigned long long word = workspace[b * kWorkspaceWords + kResultWord];
  out[b] = word == 0 ? 0 : static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(word));
}

template <typename T>
bool CanVectorize(const SampleTokensParams& p) {
  return IsAligned(p.logits, 16) && p.logits_row_stride % (16 / sizeof(T)) == 0;
}

}  // namespace sample_tokens

// The split plan: logits per CTA (a multiple of 8) for `splits` CTAs per row, or 0 for the one-CTA
// kernel. requested: 1 forces one CTA per row; > 1 asks for that many slices; 0 chooses: a split
// only where the rows alone leave SMs idle (2 * batch <= SMs), about 2 CTAs per SM, slices of at
// least kMinSplit logits.
inline int64_t SampleTokensSplitSize(int64_t batch, int64_t vocab, int sm_count,
                                     int64_t requested) {
  if (requested == 1 || batch <= 0 || vocab <= 0 || batch > 65535) return 0;
  int64_t splits = requested;
  if (requested <= 0) {
    if (2 * batch > sm_count) return 0;
    const int64_t wanted = (2 * static_cast<int64_t>(sm_count) + batch - 1) / batch;
    splits = std::min(wanted, (vocab + sample_tokens::kMinSplit - 1) / sample_tokens::kMinSplit);
  }
  if (splits <= 1) return 0;
  const int64_t size = ((vocab + splits - 1) / splits + 7) / 8 * 8;
  return size < vocab ? size : 0;
}

inline size_t SampleTokensWorkspaceBytes(int64_t batch, int64_t split_size) {
  return split_size > 0 ? static_cast<size_t>(batch) * sample_tokens::kWorkspaceWords * 8 : 0;
}

// Host launcher. Assumes sizes were validated (csrc/mask_sampling.cu does it); returns the
// launch's error, cudaErrorInvalidValue for an unknown dtype code or sizes out of range.
// split_size 0 runs one CTA per row; otherwise `workspace` holds SampleTokensWorkspaceBytes.
inline cudaError_t SampleTokens(const SampleTokensParams& p, int64_t split_size, void* workspace,
                                cudaStream_t stream) {
  using namespace sample_tokens;
  if (p.batch == 0) return cudaSuccess;
  if (p.vocab <= 0 || p.vocab > kMaxVocab || p.batch > INT_MAX) return cudaErrorInvalidValue;
  if (split_size > 0 && (split_size % 8 != 0 || workspace == nullptr || p.batch > 65535)) {
    return cudaErrorInvalidValue;
  }
  return TWOTOWER_RT_DTYPE_SWITCH(p.dtype, T, [&]() -> cudaError_t {
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = CanVectorize<T>(p);
    if (split_size == 0) {
      if (vec) {
        SampleTokensKernel<T, kVec><<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p);
      } else {
        SampleTokensKernel<T, 1><<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    }
    SplitParams sp{};
    sp.p = p;
    sp.workspace = static_cast<unsigned long long*>(workspace);
    sp.split_size = static_cast<int>(split_size);
    cudaError_t err = cudaMemsetAsync(workspace, 0, SampleTokensWorkspaceBytes(p.batch, split_size),
                                      stream);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((p.vocab + split_size - 1) / split_size),
                    static_cast<unsigned>(p.batch));
    auto launch = [&](int phase, int pass) {
      sp.phase = phase;
      sp.pass = pass;
      if (vec) {
        SampleTokensSplitKernel<T, kVec><<<grid, kSplitThreads, 0, stream>>>(sp);
      } else {
        SampleTokensSplitKernel<T, 1><<<grid, kSplitThreads, 0, stream>>>(sp);
      }
      return cudaGetLastError();
    };
    const bool greedy = !(p.temperature > 0.f);
    const bool top_k = !greedy && p.top_k > 0 && p.top_k < p.vocab;
    const bool top_p = !greedy && p.top_p < 1.f;
    if (greedy) {
      err = launch(kPhaseGreedy, 0);
    } else {
      if (top_p) err = launch(kPhaseMax, 0);
      for (int pass = 0; top_k && pass < 4 && err == cudaSuccess; ++pass) {
        err = launch(kPhaseTopK, pass);
      }
      if (top_p && err == cudaSuccess) err = launch(kPhaseTotal, 0);
      for (int pass = 0; top_p && pass < 4 && err == cudaSuccess; ++pass) {
        err = launch(kPhaseTopP, pass);
      }
      if (err == cudaSuccess) err = launch(kPhaseDraw, 0);
    }
    if (err != cudaSuccess) return err;
    const auto blocks = static_cast<unsigned>((p.batch + 255) / 256);
    SampleTokensFinishKernel<<<blocks, 256, 0, stream>>>(sp.workspace, p.out, p.batch);
    return cudaGetLastError();
  });
}

}  // namespace twotower_rt
