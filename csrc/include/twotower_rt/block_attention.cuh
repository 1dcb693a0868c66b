// Block attention (TWOTOWER.md section 3): per sequence b and query head h, the S block queries
// attend, with no mask, over the sequence's committed context K/V followed by the block's own K/V:
//
//   keys(b)  = [k_cache[slot(b), :context_lens[b]] ; k_block[b, :block_len]]   (values alike)
//   out[b, s, h] = softmax(q[b, s, h] . keys^T / sqrt(D)) . values      (KV head h / (Hq / Hkv))
//
// With block_len = 0 and S = 1 this is the AR decode step. bf16 in and out, fp32 scores, softmax and
// accumulation; P is rounded to bf16 for the second product (as FlashAttention does). A sequence
// with no keys at all gets zeros. Reference: python/twotower_rt/ops/block_attention.py.
//
// Floor (real model: Hq = 32, Hkv = 2, D = 128, S = 16). Per sequence the context K/V must be read
// once, 2 * Hkv * D * 2 = 1 KB per key, and per KV head the G * S = 256 query rows do
// 2 * 2 * 256 * D FLOPs per key: 256 FLOP per byte, at the H100's balance point, so the tensor cores
// and full bandwidth are both needed. Decode (S = 1) does 16 FLOP per byte: bandwidth-bound.
//
// Mapping. Rows of one KV head: r = s * G + g (position s, group member g). A CTA takes one tile of
// kBlockM = 16 * kRowWarps such rows of one (sequence, KV head) and one split of that sequence's
// keys: grid (row tiles, splits, batch * Hkv), row tiles fastest so the CTAs sharing a K/V split run
// together and the K/V comes from L2 after the first. Keys move in tiles of 64 through a two-stage
// cp.async pipeline into XOR-swizzled shared memory (ldmatrix without bank conflicts); each warp
// owns 16 rows: its Q fragments stay in registers, S = Q K^T and O += P V run on mma.sync m16n8k16
// (bf16 in, fp32 accumulate; CuTe's SM80 atoms), the online softmax in the log2 domain. A split
// covers ceil(tiles / splits) of its own sequence's key tiles, so any length is covered whatever
// split count the host chose. With one split the CTA normalises and writes bf16 out; with several it
// writes fp32 partials and log2-sum-exp, and BlockAttentionCombineKernel merges them in split order
// (deterministic). G * S > 16 (the denoiser): four row warps of 16 rows, each over whole tiles.
// G * S <= 16 (decode): one row warp's worth of rows and four key warps, each over 16 keys of every
// tile with its own softmax state, merged in shared memory at the end. The split count is the
// caller's (ops/block_attention.py plans it from the shape and the SM count).
//
// mma.sync, not wgmma: measured on an H200 (bench/results/2026-11-27-nvidia-h200.json) the
// denoise step at batch 64 runs at ~216 TFLOP/s, compute-bound on mma.sync at 2 CTAs (8 warps) per
// SM and 20% of copy bandwidth, 2.8x faster than SDPA; reaching the bandwidth floor needs wgmma
// (64-row warpgroup tiles, TMA) and softmax overlapped with the MMAs, as FlashAttention-3 does.
// Decode at batch 64 reads K/V at 95-104% of the measured copy bandwidth (8k-32k), within 10% of
// SDPA; at batch 1 it is latency-bound and 1.7x slower than SDPA.
//
// Resources (nvcc 13.0.88, sm_90a, -Xptxas -v): no stack, no spills; D = 128: 215 registers (4 row
// warps, 80 KB shared memory, 2 CTAs/SM) and 162 (decode, 68 KB, 3 CTAs/SM); D = 64: 136 / 92;
// D = 32: 85 / 56; the combine kernel 32-40.
#pragma once

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include <cmath>
#include <cstdint>

#include "twotower_rt/block_attention_common.cuh"

namespace twotower_rt {

namespace block_attention {

template <int kHeadDim>
struct Smem {
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  // Rows that share one 128-byte span of banks, and the chunk bits the swizzle flips: the 8 rows
  // one ldmatrix reads at one logical chunk land in 8 different 16-byte bank groups.
  static constexpr int kRowsPerLine = kChunks >= 8 ? 1 : 8 / kChunks;
  static constexpr int kSwizzleMask = (kChunks >= 8 ? 8 : kChunks) - 1;
  __device__ static __forceinline__ int Offset(int row, int chunk) {
    return row * kHeadDim + ((chunk ^ ((row / kRowsPerLine) & kSwizzleMask)) << 3);
  }
};

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  cute::SM80_16x8x16_F32BF16BF16F32_TN::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1,
                                            d[0], d[1], d[2], d[3]);
}

__device__ __forceinline__ void CopyChunk(const __nv_bfloat16* src, __nv_bfloat16* dst, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst),
      pred);
}

// kRowWarps warps own 16 rows each; kKeyWarps warps share those rows and take a quarter (or so) of
// every key tile each, with their own softmax state, merged through shared memory at the end (the
// decode kernel: 16 rows, four warps, so that one tile costs a warp 32 MMAs instead of 128).
template <int kHeadDim, int kRowWarps, int kKeyWarps>
__global__ void __launch_bounds__(32 * kRowWarps * kKeyWarps)
    BlockAttentionKernel(const BlockAttentionParams p) {
  using S = Smem<kHeadDim>;
  constexpr int kBlockM = 16 * kRowWarps;
  constexpr int kThreads = 32 * kRowWarps * kKeyWarps;
  constexpr int kChunks = S::kChunks;
  constexpr int kWarpKeys = kBlockN / kKeyWarps;  // keys of a tile one warp takes
  constexpr int kKSteps = kHeadDim / 16;          // of Q K^T
  constexpr int kNTilesS = kWarpKeys / 8;         // n-tiles of S
  constexpr int kNTilesO = kHeadDim / 8;          // n-tiles of O
  static_assert(kHeadDim % 16 == 0 && kHeadDim >= 16 && kHeadDim <= 256, "head_dim");
  static_assert(kWarpKeys % 16 == 0, "a warp's keys must fill whole k-steps of P V");
  // The key warps' merge reuses the K/V stages: fp32 O and (max, sum) per warp and row.
  static_assert(kKeyWarps == 1 || kKeyWarps * kBlockM * (kHeadDim + 2) * 4 <=
                                      4 * kBlockN * kHeadDim * 2,
                "merge scratch exceeds the K/V stages");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* smem_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* smem_k = smem_q + kBlockM * kHeadDim;       // [2][kBlockN][kHeadDim]
  __nv_bfloat16* smem_v = smem_k + 2 * kBlockN * kHeadDim;   // [2][kBlockN][kHeadDim]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int row_warp = warp % kRowWarps;
  const int key_warp = warp / kRowWarps;
  const int lane = tid & 31;
  const CtaWork w(p, kBlockM);  // (lambdas below capture these names: no binding)
  const int group = w.group, rows = w.rows, row0 = w.row0, split = w.split, b = w.b;
  const int kv_head = w.kv_head, context_len = w.context_len, num_keys = w.num_keys;
  const int tile_begin = w.tile_begin, tile_end = w.tile_end;
  const __nv_bfloat16 *k_cache = w.k_cache, *v_cache = w.v_cache;
  const __nv_bfloat16 *k_block = w.k_block, *v_block = w.v_block;

  // Key j of this sequence: the cache below context_len, the block after; past the end, zeros.
  auto load_tile = [&](int tile, int stage) {
    __nv_bfloat16* dst_k = smem_k + stage * kBlockN * kHeadDim;
    __nv_bfloat16* dst_v = smem_v + stage * kBlockN * kHeadDim;
#pragma unroll
    for (int i = tid; i < kBlockN * kChunks; i += kThreads) {
      const int row = i / kChunks;
      const int chunk = i % kChunks;
      const int key = tile * kBlockN + row;
      const __nv_bfloat16* src_k = p.k_cache;  // any valid address when nothing is read
      const __nv_bfloat16* src_v = p.v_cache;
      if (key < context_len) {
        src_k = k_cache + key * p.k_cache_token_stride;
        src_v = v_cache + key * p.v_cache_token_stride;
      } else if (key < num_keys) {
        src_k = k_block + (key - context_len) * p.k_block_token_stride;
        src_v = v_block + (key - context_len) * p.v_block_token_stride;
      }
      const bool valid = key < num_keys;
      const int offset = S::Offset(row, chunk);
      CopyChunk(src_k + (valid ? chunk * 8 : 0), dst_k + offset, valid);
      CopyChunk(src_v + (valid ? chunk * 8 : 0), dst_v + offset, valid);
    }
  };

  float o[kNTilesO][4];
#pragma unroll
  for (int n = 0; n < kNTilesO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, already scaled
  float row_sum[2] = {0.f, 0.f};              // this thread's columns only until the end

  if (tile_begin < tile_end) {
    // Q tile: row r of the tile is (s, g) = divmod(row0 + r, group); rows past the end are zeros.
#pragma unroll
    for (int i = tid; i < kBlockM * kChunks; i += kThreads) {
      const int r = i / kChunks;
      const int chunk = i % kChunks;
      const int row = row0 + r;
      const bool valid = row < rows;
      const __nv_bfloat16* src = p.q;
      if (valid) {
        const int s = row / group;
        const int head = kv_head * group + row % group;
        src = p.q + b * p.q_batch_stride + s * p.q_seq_stride + head * p.q_head_stride + chunk * 8;
      }
      CopyChunk(src, smem_q + S::Offset(r, chunk), valid);
    }
    load_tile(tile_begin, 0);
    cute::cp_async_fence();

    uint32_t q_frag[kKSteps][4];
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int stage = (tile - tile_begin) & 1;
      if (tile + 1 < tile_end) {
        load_tile(tile + 1, stage ^ 1);
        cute::cp_async_fence();
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
      __syncthreads();
      if (tile == tile_begin) {
        // A fragments of this warp's 16 rows: matrices (rows lo/hi) x (k lo/hi).
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          const int r = row_warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int chunk = ks * 2 + (lane >> 4);
          cute::SM75_U32x4_LDSM_N::copy(
              *reinterpret_cast<const cute::uint128_t*>(smem_q + S::Offset(r, chunk)),
              q_frag[ks][0], q_frag[ks][1], q_frag[ks][2], q_frag[ks][3]);
        }
      }
      // This warp's keys of the tile.
      const __nv_bfloat16* tile_k = smem_k + (stage * kBlockN + key_warp * kWarpKeys) * kHeadDim;
      const __nv_bfloat16* tile_v = smem_v + (stage * kBlockN + key_warp * kWarpKeys) * kHeadDim;

      // S = Q K^T: B fragments straight from K's rows (keys n, dims k), two n-tiles per ldmatrix.
      float s[kNTilesS][4];
#pragma unroll
      for (int n = 0; n < kNTilesS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kNTilesS / 2; ++np) {
          const int key = np * 16 + (lane & 7) + (lane >> 4) * 8;
          const int chunk = ks * 2 + ((lane >> 3) & 1);
          uint32_t b0, b1, b2, b3;
          cute::SM75_U32x4_LDSM_N::copy(
              *reinterpret_cast<const cute::uint128_t*>(tile_k + S::Offset(key, chunk)), b0, b1,
              b2, b3);
          Mma(s[2 * np], q_frag[ks], b0, b1);
          Mma(s[2 * np + 1], q_frag[ks], b2, b3);
        }
      }

      // Keys past the end (the last tile only) get -inf; their V rows are zeros.
      const int key0 = tile * kBlockN + key_warp * kWarpKeys;
      if (key0 + kWarpKeys > num_keys) {
#pragma unroll
        for (int n = 0; n < kNTilesS; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (key0 + n * 8 + (lane & 3) * 2 + (e & 1) >= num_keys) s[n][e] = -INFINITY;
          }
        }
      }

      // Online softmax; a thread holds rows lane/4 (h = 0) and lane/4 + 8 (h = 1), and the four
      // threads of a quad together hold the row's columns of this warp.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kNTilesS; ++n) {
          tile_max = fmaxf(tile_max, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[h], tile_max * p.softmax_scale_log2);
        const float base = new_max == -INFINITY ? 0.f : new_max;
        const float rescale = exp2f(row_max[h] - base);
        row_max[h] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < kNTilesS; ++n) {
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[n][e] = exp2f(fmaf(s[n][e], p.softmax_scale_log2, -base));
            sum += s[n][e];
          }
        }
        row_sum[h] = row_sum[h] * rescale + sum;
#pragma unroll
        for (int n = 0; n < kNTilesO; ++n) {
          o[n][2 * h] *= rescale;
          o[n][2 * h + 1] *= rescale;
        }
      }

      // O += P V: P's C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k-step kk; V's B
      // fragments by transposed ldmatrix (keys k, dims n), two dim-tiles per ldmatrix.
#pragma unroll
      for (int kk = 0; kk < kWarpKeys / 16; ++kk) {
        const uint32_t a[4] = {PackBf16(s[2 * kk][0], s[2 * kk][1]),
                               PackBf16(s[2 * kk][2], s[2 * kk][3]),
                               PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < kNTilesO / 2; ++dp) {
          const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int chunk = dp * 2 + (lane >> 4);
          uint32_t b0, b1, b2, b3;
          cute::SM75_U16x8_LDSM_T::copy(
              *reinterpret_cast<const cute::uint128_t*>(tile_v + S::Offset(key, chunk)), b0, b1,
              b2, b3);
          Mma(o[2 * dp], a, b0, b1);
          Mma(o[2 * dp + 1], a, b2, b3);
        }
      }
      __syncthreads();  // the next iteration's prefetch overwrites this stage
    }
  }

  // Epilogue: one split normalises and writes bf16 out; several write fp32 partials and the
  // row's log2-sum-exp (-inf for a split without keys) for BlockAttentionCombineKernel.
  auto store = [&](int tile_row, int col, float v0, float v1, float lse) {
    const int row = row0 + tile_row;
    if (row >= rows) return;
    const int s = row / group;
    const int head = kv_head * group + row % group;
    if (p.num_splits == 1) {
      *reinterpret_cast<__nv_bfloat162*>(p.out + b * p.out_batch_stride + s * p.out_seq_stride +
                                         head * p.out_head_stride + col) =
          __floats2bfloat162_rn(v0, v1);
    } else {
      const int64_t out_row =
          ((static_cast<int64_t>(split) * p.batch + b) * p.seq + s) * p.q_heads + head;
      *reinterpret_cast<float2*>(p.partial_out + out_row * kHeadDim + col) = make_float2(v0, v1);
      if (col == 0) p.partial_lse[out_row] = lse;
    }
  };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  const int col = (lane & 3) * 2;
  if constexpr (kKeyWarps == 1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float inv_sum = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
      const float lse = row_sum[h] > 0.f ? row_max[h] + log2f(row_sum[h]) : -INFINITY;
#pragma unroll
      for (int n = 0; n < kNTilesO; ++n) {
        store(row_warp * 16 + (lane >> 2) + 8 * h, n * 8 + col, o[n][2 * h] * inv_sum,
              o[n][2 * h + 1] * inv_sum, lse);
      }
    }
  } else {
    // Merge the key warps: O_w and (max_w, sum_w) to shared memory, then each thread combines
    // pairs of columns of one row over the warps in warp order.
    float* merge_o = reinterpret_cast<float*>(smem_k);  // [kKeyWarps][kBlockM][kHeadDim]
    float* merge_stats = merge_o + kKeyWarps * kBlockM * kHeadDim;  // [kKeyWarps][kBlockM][2]
    __syncthreads();  // every warp is done with the K/V stages
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = key_warp * kBlockM + row_warp * 16 + (lane >> 2) + 8 * h;
#pragma unroll
      for (int n = 0; n < kNTilesO; ++n) {
        *reinterpret_cast<float2*>(merge_o + r * kHeadDim + n * 8 + col) =
            make_float2(o[n][2 * h], o[n][2 * h + 1]);
      }
      if ((lane & 3) == 0) {
        merge_stats[2 * r] = row_max[h];
        merge_stats[2 * r + 1] = row_sum[h];
      }
    }
    __syncthreads();
    for (int i = tid; i < kBlockM * kHeadDim / 2; i += kThreads) {
      const int r = i / (kHeadDim / 2);
      const int c = (i % (kHeadDim / 2)) * 2;
      float max_all = -INFINITY;
#pragma unroll
      for (int w = 0; w < kKeyWarps; ++w) max_all = fmaxf(max_all, merge_stats[2 * (w * kBlockM + r)]);
      const float base = max_all == -INFINITY ? 0.f : max_all;
      float sum = 0.f, v0 = 0.f, v1 = 0.f;
#pragma unroll
      for (int w = 0; w < kKeyWarps; ++w) {
        const int wr = w * kBlockM + r;
        const float scale = exp2f(merge_stats[2 * wr] - base);
        sum += merge_stats[2 * wr + 1] * scale;
        v0 += merge_o[wr * kHeadDim + c] * scale;
        v1 += merge_o[wr * kHeadDim + c + 1] * scale;
      }
      const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
      store(r, c, v0 * inv_sum, v1 * inv_sum, sum > 0.f ? base + log2f(sum) : -INFINITY);
    }
  }
}

template <int kHeadDim, int kRowWarps, int kKeyWarps>
cudaError_t Launch(const BlockAttentionParams& p, cudaStream_t stream) {
  constexpr int kBlockM = 16 * kRowWarps;
  constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kHeadDim * 2;
  auto kernel = BlockAttentionKernel<kHeadDim, kRowWarps, kKeyWarps>;
  if (kSmemBytes > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  const int rows = p.seq * (p.q_heads / p.kv_heads);
  const dim3 grid((rows + kBlockM - 1) / kBlockM, p.num_splits, p.batch * p.kv_heads);
  kernel<<<grid, 32 * kRowWarps * kKeyWarps, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Rows per KV head at or below which the 16-row kernel with four key warps runs.
constexpr int kDecodeRows = 16;

}  // namespace block_attention

// Head dims the kernel is built for.
inline bool BlockAttentionSupportsHeadDim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// Host launcher; the caller checked the arguments (csrc/block_attention.cu). Writes p.out.
inline cudaError_t BlockAttention(const BlockAttentionParams& p, cudaStream_t stream) {
  using namespace block_attention;
  if (p.batch == 0 || p.seq == 0) return cudaSuccess;
  const bool decode = p.seq * (p.q_heads / p.kv_heads) <= kDecodeRows;
  cudaError_t err;
  switch (p.head_dim) {
    case 32:
      err = decode ? Launch<32, 1, 4>(p, stream) : Launch<32, 4, 1>(p, stream);
      break;
    case 64:
      err = decode ? Launch<64, 1, 4>(p, stream) : Launch<64, 4, 1>(p, stream);
      break;
    case 128:
      err = decode ? Launch<128, 1, 4>(p, stream) : Launch<128, 4, 1>(p, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seq * p.q_heads;
  const unsigned blocks = static_cast<unsigned>((rows + 7) / 8);
  switch (p.head_dim) {
    case 32:
      BlockAttentionCombineKernel<32><<<blocks, 256, 0, stream>>>(p);
      break;
    case 64:
      BlockAttentionCombineKernel<64><<<blocks, 256, 0, stream>>>(p);
      break;
    default:
      BlockAttentionCombineKernel<128><<<blocks, 256, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace twotower_rt
