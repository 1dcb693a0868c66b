// Block attention on Hopper warpgroup MMAs (wgmma): the S > 1 (denoise) path of
// block_attention.cuh, selected with variant "wgmma" (ops/block_attention.py); OFF by default.
// Same inputs, outputs, split-KV partials and merge (BlockAttentionCombineKernel) as the mma.sync
// kernel, so the Python split planner and the combine are shared.
//
// UNVERIFIED: this kernel has been compiled (nvcc 13.0, sm_90a) but never run on a GPU. Its tests
// (tests/test_block_attention_kernel.py, variant "wgmma") and bench rows exist; run them before
// making it the default.
//
// Floor (real model: Hq = 32, Hkv = 2, D = 128, S = 16): per sequence the context K/V is read once,
// 2 * Hkv * D * 2 B = 1 KB per key, and per KV head the G * S = 256 rows do 2 * 2 * 256 * D = 128K
// FLOPs per key: 256 FLOP/byte, at the H100's balance point. At 8k context and batch 64 that is
// 538 MB (128 us at 4.2 TB/s) and 138 GFLOP (182 us at 755 TFLOP/s): the tensor cores bound it, so
// what matters is wgmma issue efficiency, not the loads.
//
// Design (one CTA = one warpgroup of 128 threads = 64 rows of one (sequence, KV head), one split of
// the keys; grid and key splits exactly as the mma.sync kernel, row tiles fastest):
//   - Rows r = s * G + g as in block_attention.cuh; the 256 rows of the real model are 4 CTAs that
//     run side by side and read each K/V tile from L2 after the first.
//   - K and V tiles of kBlockN = 64 keys go through a two-stage cp.async ring filled by all 128
//     threads (16-byte zero-filling copies: a tile may straddle the cache/block boundary, run past
//     the keys, or come from any cache slot; TMA would need one descriptor per source and fills
//     zeros only past a tensor's bounds, not past a sequence's length, where stale V rows could
//     hold NaN that a zero probability would not cancel). Each thread fences its copies into the
//     async proxy (fence.proxy.async) before the barrier that hands the stage to the wgmmas.
//   - Shared memory in the GMMA canonical 128-byte-swizzled layouts: Q (64 x D) and K (keys x D)
//     K-major, V viewed as the (D x keys) B operand, MN-major, so nothing is transposed.
//   - S = Q K^T: SM90 64x64x16 SS wgmma (both operands from shared memory), fp32 accumulators.
//     Online softmax in registers, log2 domain, identical arithmetic to the mma.sync kernel. P is
//     rounded to bf16 in registers, where the accumulator layout of S is already the A-operand
//     layout of the second product: O += P V is a 64x128x16 RS wgmma (A from registers).
//   - 81 KB of shared memory (Q 16 KB, K and V 2 x 16 KB each, 1 KB to align to the swizzle's
//     1024-byte period), so 2 CTAs per SM: one CTA's softmax overlaps the other's wgmmas (the
//     hardware interleaves them; no explicit ping-pong yet).
//   - Registers: O 64 fp32, S 32 fp32, P 16 x bf16x2 per thread; see the resource line below.
//
// Not done (next steps, in order): a producer warp with mbarriers and a 3-4 stage ring so the
// consumer never waits on its own copies; two consumer warpgroups per CTA (128 rows) with
// setmaxnreg and an explicit ping-pong of softmax against the other warpgroup's GEMMs, as
// FlashAttention-3 does; issuing QK^T of tile t+1 before the softmax of tile t.
//
// Resources (nvcc 13.0.88, sm_90a, -Xptxas -v), D = 128: 160 registers, no stack, no spills; 81 KB
// of dynamic shared memory. The combine kernel: 40 registers.
#pragma once

#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

#include "twotower_rt/block_attention_common.cuh"

namespace twotower_rt {
namespace block_attention_sm90 {

constexpr int kBlockM = 64;   // rows per CTA: one warpgroup's wgmma M
constexpr int kBlockN = 64;   // keys per tile; must match block_attention::kBlockN (the splits)
constexpr int kStages = 2;    // K/V ring depth
constexpr int kThreads = 128;  // one warpgroup
static_assert(kBlockN == block_attention::kBlockN,
              "the split planner and the combine assume the mma.sync kernel's key tiles");

template <int kHeadDim>
struct Traits {
  using Element = cute::bfloat16_t;
  static_assert(kHeadDim % 64 == 0, "128-byte swizzled rows: head_dim must be a multiple of 64");
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // V as the B operand of O = P V: (N = head dim, K = keys), head dim contiguous (MN-major).
  using SmemLayoutV = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{}));
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>,
                                             cute::Int<kHeadDim>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::K>()));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>,
                                             cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));
  static constexpr int kQElems = cute::cosize_v<SmemLayoutQ>;
  static constexpr int kKElems = cute::cosize_v<SmemLayoutK>;
  static constexpr int kVElems = cute::cosize_v<SmemLayoutV>;
  static_assert(kQElems == kBlockM * kHeadDim && kKElems == kStages * kBlockN * kHeadDim &&
                    kVElems == kKElems,
                "compact shared-memory layouts expected");
  // Each buffer is a multiple of 1024 bytes, so every one starts on the swizzle period.
  static_assert((kQElems * 2) % 1024 == 0 && (kKElems * 2) % 1024 == 0, "1024-byte buffers");
  static constexpr int kSmemBytes = (kQElems + kKElems + kVElems) * 2 + 1024;  // + alignment
};

// Makes this thread's completed generic-proxy writes to shared memory (cp.async included) visible
// to the async proxy, which is where wgmma reads its shared-memory operands.
__device__ __forceinline__ void FenceProxyAsyncShared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void CopyChunk(const void* src, void* dst, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst),
      pred);
}

// One warpgroup GEMM C (+)= A B over all k-blocks, issued as one wgmma batch and waited for. The
// operand fences around the batch keep the compiler from moving register reads or writes of C (and
// of A, when kARegisters: an RS wgmma reading P from registers) across the asynchronous MMAs.
template <bool kZeroInit, bool kARegisters, class TiledMma, class TensorA, class TensorB,
          class TensorC>
__device__ __forceinline__ void WarpgroupGemm(TiledMma& mma, TensorA& a, const TensorB& b,
                                              TensorC& c) {
  cute::warpgroup_fence_operand(c);
  if constexpr (kARegisters) cute::warpgroup_fence_operand(a);
  cute::warpgroup_arrive();  // wgmma.fence: prior register writes to C and A are seen
  if constexpr (kZeroInit) mma.accumulate_ = cute::GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < cute::size<2>(a); ++k) {
    cute::gemm(mma, a(cute::_, cute::_, k), b(cute::_, cute::_, k), c);
    mma.accumulate_ = cute::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_wait<0>();
  cute::warpgroup_fence_operand(c);
  if constexpr (kARegisters) cute::warpgroup_fence_operand(a);
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2)
    BlockAttentionSm90Kernel(const BlockAttentionParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = Traits<kHeadDim>;
  using Element = typename T::Element;
  constexpr int kChunks = kHeadDim / 8;           // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kChunks;  // rows one pass of the 128 threads copies
  static_assert(kThreads % kChunks == 0 && kBlockN % kRowsPerPass == 0, "copy mapping");

  // The swizzle acts on shared-memory address bits 4-9: start the buffers on a 1024-byte boundary.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = cast_smem_ptr_to_uint(smem_raw);
  unsigned char* smem_base = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
  Element* smem_q = reinterpret_cast<Element*>(smem_base);
  Element* smem_k = smem_q + T::kQElems;
  Element* smem_v = smem_k + T::kKElems;
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename T::SmemLayoutQ{});  // (M, D)
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename T::SmemLayoutK{});  // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename T::SmemLayoutV{});  // (D, N, stage)

  const int tid = threadIdx.x;
  const block_attention::CtaWork w(p, kBlockM);  // (lambdas below capture these names: no binding)
  const int group = w.group, rows = w.rows, row0 = w.row0, split = w.split, b = w.b;
  const int kv_head = w.kv_head, context_len = w.context_len, num_keys = w.num_keys;
  const int tile_begin = w.tile_begin, tile_end = w.tile_end;
  const __nv_bfloat16 *k_cache = w.k_cache, *v_cache = w.v_cache;
  const __nv_bfloat16 *k_block = w.k_block, *v_block = w.v_block;

  // Thread tid copies chunk tid % kChunks of rows tid / kChunks + kRowsPerPass * i.
  const int chunk = tid % kChunks;
  const int row_in_pass = tid / kChunks;

  // Key j of this sequence: the cache below context_len, the block after; past the end, zeros.
  auto load_tile = [&](int tile, int stage) {
    CUTE_UNROLL
    for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
      const int row = row_in_pass + i * kRowsPerPass;
      const int key = tile * kBlockN + row;
      const __nv_bfloat16* src_k = p.k_cache;  // any valid address when nothing is read
      const __nv_bfloat16* src_v = p.v_cache;
      if (key < context_len) {
        src_k = k_cache + key * p.k_cache_token_stride + chunk * 8;
        src_v = v_cache + key * p.v_cache_token_stride + chunk * 8;
      } else if (key < num_keys) {
        src_k = k_block + (key - context_len) * p.k_block_token_stride + chunk * 8;
        src_v = v_block + (key - context_len) * p.v_block_token_stride + chunk * 8;
      }
      const bool valid = key < num_keys;
      CopyChunk(src_k, &sK(row, chunk * 8, stage), valid);
      CopyChunk(src_v, &sV(chunk * 8, row, stage), valid);
    }
  };

  typename T::TiledMmaQK mma_qk;
  typename T::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);  // smem descriptors (MMA, 1, D / 16)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);  // (MMA, 1, D / 16, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sV);  // (MMA, 1, kBlockN / 16, stage)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  // P as the A operand of P V: ((2, 2, 2), 1, kBlockN / 16) bf16, compact.
  Tensor tOrP =
      make_tensor<Element>(partition_shape_A(mma_pv, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  // Accumulator layout (CLayout_64xN): warp w, lane l holds rows 16w + l/4 + 8h (h = 0, 1) and
  // columns 8j + 2(l%4) + c (c = 0, 1) as value c + 2h + 4j. The A-operand layout of a 64x16
  // k-block kk holds the same (row, column) pairs of columns 16kk..16kk+15 as value
  // c + 2h + 4(j - 2kk), so flat value i of S is flat value i of P.
  static_assert(size(tSrS) == kBlockN / 2 && size(tOrO) == kHeadDim / 2, "64-row accumulators");
  static_assert(size(tOrP) == size(tSrS) && size<2>(tOrP) == kBlockN / 16, "P fragment");
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_qk.partition_C(cS);  // (row, key) of each value of tSrS

  clear(tOrO);
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, already scaled
  float row_sum[2] = {0.f, 0.f};              // this thread's columns only until the end

  if (tile_begin < tile_end) {
    // Q tile: row r is (s, g) = divmod(row0 + r, group); rows past the end are zeros.
    CUTE_UNROLL
    for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
      const int r = row_in_pass + i * kRowsPerPass;
      const int row = row0 + r;
      const bool valid = row < rows;
      const __nv_bfloat16* src = p.q;
      if (valid) {
        const int s = row / group;
        const int head = kv_head * group + row % group;
        src = p.q + b * p.q_batch_stride + s * p.q_seq_stride + head * p.q_head_stride + chunk * 8;
      }
      CopyChunk(src, &sQ(r, chunk * 8), valid);
    }
    load_tile(tile_begin, 0);
    cute::cp_async_fence();

    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int stage = (tile - tile_begin) & 1;
      if (tile + 1 < tile_end) {
        load_tile(tile + 1, stage ^ 1);
        cute::cp_async_fence();
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
      FenceProxyAsyncShared();
      __syncthreads();

      // S = Q K^T.
      WarpgroupGemm</*kZeroInit=*/true, /*kARegisters=*/false>(mma_qk, tSrQ,
                                                                tSrK(_, _, _, stage), tSrS);

      // Keys past the end (the last tile only) get -inf; their V rows are zeros.
      if ((tile + 1) * kBlockN > num_keys) {
        CUTE_UNROLL
        for (int i = 0; i < size(tSrS); ++i) {
          if (tile * kBlockN + get<1>(tScS(i)) >= num_keys) tSrS(i) = -INFINITY;
        }
      }

      // Online softmax over this thread's two rows; the 4 lanes of a quad share a row.
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
        CUTE_UNROLL
        for (int j = 0; j < kBlockN / 8; ++j) {
          tile_max = fmaxf(tile_max, fmaxf(tSrS(4 * j + 2 * h), tSrS(4 * j + 2 * h + 1)));
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[h], tile_max * p.softmax_scale_log2);
        const float base = new_max == -INFINITY ? 0.f : new_max;
        const float rescale = exp2f(row_max[h] - base);
        row_max[h] = new_max;
        float sum = 0.f;
        CUTE_UNROLL
        for (int j = 0; j < kBlockN / 8; ++j) {
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) {
            float& x = tSrS(4 * j + 2 * h + c);
            x = exp2f(fmaf(x, p.softmax_scale_log2, -base));
            sum += x;
          }
        }
        row_sum[h] = row_sum[h] * rescale + sum;
        CUTE_UNROLL
        for (int j = 0; j < kHeadDim / 8; ++j) {
          tOrO(4 * j + 2 * h) *= rescale;
          tOrO(4 * j + 2 * h + 1) *= rescale;
        }
      }

      // P to bf16 (pairs of adjacent columns of one row), then O += P V.
      Tensor tOrP_pairs = recast<__nv_bfloat162>(tOrP);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrP_pairs); ++i) {
        tOrP_pairs(i) = __floats2bfloat162_rn(tSrS(2 * i), tSrS(2 * i + 1));
      }
      WarpgroupGemm</*kZeroInit=*/false, /*kARegisters=*/true>(mma_pv, tOrP,
                                                                tOrV(_, _, _, stage), tOrO);
      __syncthreads();  // the next iteration's prefetch overwrites this stage
    }
  }

  // Epilogue: one split normalises and writes bf16 out; several write fp32 partials and the
  // row's log2-sum-exp (-inf for a split without keys) for BlockAttentionCombineKernel.
  CUTE_UNROLL
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tOcO = thr_pv.partition_C(cO);  // (row, column) of each value of tOrO
  CUTE_UNROLL
  for (int i = 0; i < size(tOrO); i += 2) {
    const int h = (i / 2) % 2;
    const int tile_row = get<0>(tOcO(i));
    const int col = get<1>(tOcO(i));
    const int row = row0 + tile_row;
    if (row >= rows) continue;
    const int s = row / group;
    const int head = kv_head * group + row % group;
    const float inv_sum = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    const float v0 = tOrO(i) * inv_sum;
    const float v1 = tOrO(i + 1) * inv_sum;
    if (p.num_splits == 1) {
      *reinterpret_cast<__nv_bfloat162*>(p.out + b * p.out_batch_stride + s * p.out_seq_stride +
                                         head * p.out_head_stride + col) =
          __floats2bfloat162_rn(v0, v1);
    } else {
      const int64_t out_row =
          ((static_cast<int64_t>(split) * p.batch + b) * p.seq + s) * p.q_heads + head;
      *reinterpret_cast<float2*>(p.partial_out + out_row * kHeadDim + col) = make_float2(v0, v1);
      if (col == 0) {
        p.partial_lse[out_row] =
            row_sum[h] > 0.f ? row_max[h] + log2f(row_sum[h]) : -INFINITY;
      }
    }
  }
#else
  __trap();  // built for sm_90a only (wgmma); the host launcher never gets here elsewhere
#endif
}

template <int kHeadDim>
cudaError_t Launch(const BlockAttentionParams& p, cudaStream_t stream) {
  constexpr int kSmemBytes = Traits<kHeadDim>::kSmemBytes;
  auto kernel = BlockAttentionSm90Kernel<kHeadDim>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const int rows = p.seq * (p.q_heads / p.kv_heads);
  const dim3 grid((rows + kBlockM - 1) / kBlockM, p.num_splits, p.batch * p.kv_heads);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t all_rows = static_cast<int64_t>(p.batch) * p.seq * p.q_heads;
  const unsigned blocks = static_cast<unsigned>((all_rows + 7) / 8);
  block_attention::BlockAttentionCombineKernel<kHeadDim><<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace block_attention_sm90

// Host launcher; the caller checked the arguments (csrc/block_attention.cu). Writes p.out.
inline cudaError_t BlockAttentionSm90(const BlockAttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seq == 0) return cudaSuccess;
  switch (p.head_dim) {
    case 128:
      return block_attention_sm90::Launch<128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace twotower_rt
