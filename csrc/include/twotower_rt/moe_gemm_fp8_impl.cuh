// The CUTLASS 3 mixed-input grouped GEMM behind moe_gemm_fp8.cuh, as a template over the
// epilogue. Included by exactly one translation unit per epilogue (csrc/moe_gemm_fp8_up.cu,
// csrc/moe_gemm_fp8_down.cu). Operand roles are swapped (see moe_gemm_fp8.cuh): the GEMM's
// (M, N, K) is (n, rows of the expert, k), its A the FP8 weight, its B the bf16 tokens.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/float8.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <type_traits>

#include "twotower_rt/moe_gemm_fp8.cuh"
#include "twotower_rt/moe_gemm_impl.cuh"  // moe_gemm::Relu2, WorkspaceCarver, RunGrouped

namespace twotower_rt {
namespace moe_gemm_fp8 {

template <MoeEpilogue kEpilogue>
struct Config {
  using ElementW = cutlass::float_e4m3_t;
  using ElementScale = float;  // fp32 times fp32, then one rounding to bf16: Fp8Linear's order
  using ElementX = cutlass::bfloat16_t;
  using ElementD = cutlass::bfloat16_t;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutW = cutlass::layout::RowMajor;     // GEMM A: W (n, k), K-major
  using LayoutX = cutlass::layout::ColumnMajor;  // GEMM B: tokens^T (k, rows), i.e. (rows, k)
  using LayoutD = cutlass::layout::ColumnMajor;  // D^T (n, rows) column-major is D (rows, n)
  static constexpr int kAlignmentW = 16;         // 16 bytes of e4m3
  static constexpr int kAlignmentX = 8;          // 16 bytes of bf16
  static constexpr int kAlignmentD = 8;
  // 128 output channels (two consumer warpgroups of 64) x 64 tokens: an expert with <= 64 rows
  // streams its weights once. k tile 64: 64-byte e4m3 rows, 128-byte bf16 rows.
  using TileShape = cute::Shape<cute::_128, cute::_64, cute::Int<kMoeFp8TileK>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Fusion = std::conditional_t<
      kEpilogue == MoeEpilogue::kRelu2,
      cutlass::epilogue::fusion::LinCombEltAct<moe_gemm::Relu2, ElementD, float, void>,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, void>>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignmentD,
      ElementD, LayoutD*, kAlignmentD, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      Fusion>::CollectiveOp;
  // The tuple (operand, scale) makes the builder pick the mixed-input collective in
  // ConvertAndScale mode, with the weight as the register-sourced, converted operand.
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementW, ElementScale>,
      LayoutW*, kAlignmentW, ElementX, LayoutX*, kAlignmentX, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using StrideW = typename Kernel::InternalStrideA;
  using StrideX = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using StrideScale = typename CollectiveMainloop::StrideScale;

  static_assert(CollectiveMainloop::KernelConversionMode ==
                    cutlass::detail::ConversionMode::ConvertAndScale,
                "the weight must be converted and scaled in the mainloop");
  static_assert(!CollectiveMainloop::SwapAB, "the FP8 weight must already be the GEMM's A");
  // SetupKernel writes the one dynamic stride of each; these are the layouts it assumes.
  static_assert(std::is_same_v<StrideW, cute::Stride<int64_t, cute::_1, cute::_0>>);
  static_assert(std::is_same_v<StrideX, cute::Stride<int64_t, cute::_1, cute::_0>>);
  static_assert(std::is_same_v<StrideD, cute::Stride<cute::_1, int64_t, cute::_0>>);
  static_assert(std::is_same_v<StrideScale, cute::Stride<cute::_1, int64_t, int64_t>>);
};

// The device-side problem list at the start of the workspace (as moe_gemm::ProblemList).
template <class C>
struct ProblemList {
  typename C::Shape* sizes;
  const typename C::ElementW** w;
  const typename C::ElementX** x;
  const typename C::ElementScale** scales;
  typename C::ElementD** d;
  typename C::StrideW* stride_w;
  typename C::StrideX* stride_x;
  typename C::StrideScale* stride_scale;
  typename C::StrideD* stride_d;
  int64_t bytes;

  ProblemList(void* base, int groups) {
    moe_gemm::WorkspaceCarver carve(base);
    sizes = carve.take<typename C::Shape>(groups);
    w = carve.take<const typename C::ElementW*>(groups);
    x = carve.take<const typename C::ElementX*>(groups);
    scales = carve.take<const typename C::ElementScale*>(groups);
    d = carve.take<typename C::ElementD*>(groups);
    stride_w = carve.take<typename C::StrideW>(groups);
    stride_x = carve.take<typename C::StrideX>(groups);
    stride_scale = carve.take<typename C::StrideScale>(groups);
    stride_d = carve.take<typename C::StrideD>(groups);
    bytes = carve.bytes();
  }
};

// Group e < experts: expert e's rows, weight and scales. Group `experts` (when p.extra.w is set):
// the extra group's own buffers, sizes, row strides and scales.
template <class C>
__global__ void SetupKernel(const MoeGemmFp8Params p, ProblemList<C> list) {
  const int64_t scale_k = (p.k + p.group_size - 1) / p.group_size;
  const int groups = MoeGemmFp8Groups(p);
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < groups; e += gridDim.x * blockDim.x) {
    if (e == p.experts) {
      const MoeGemmFp8ExtraGroup& x = p.extra;
      list.sizes[e] = typename C::Shape(x.n, x.rows, x.k);
      list.w[e] = reinterpret_cast<const typename C::ElementW*>(x.w);
      list.x[e] = reinterpret_cast<const typename C::ElementX*>(x.a);
      list.scales[e] = x.scales;
      list.d[e] = reinterpret_cast<typename C::ElementD*>(x.d);
      list.stride_w[e] = typename C::StrideW{};
      cute::get<0>(list.stride_w[e]) = x.k;
      list.stride_x[e] = typename C::StrideX{};
      cute::get<0>(list.stride_x[e]) = x.lda;
      list.stride_scale[e] = typename C::StrideScale{};
      cute::get<1>(list.stride_scale[e]) = x.n;
      cute::get<2>(list.stride_scale[e]) = (x.k + p.group_size - 1) / p.group_size * x.n;
      list.stride_d[e] = typename C::StrideD{};
      cute::get<1>(list.stride_d[e]) = x.ldd;
      continue;
    }
    const int64_t start = e > 0 ? p.offsets[e - 1] : 0;
    const int rows = static_cast<int>(p.offsets[e] - start);
    list.sizes[e] = typename C::Shape(p.n, rows, p.k);  // D^T = Wq . A^T
    list.w[e] = reinterpret_cast<const typename C::ElementW*>(p.w) +
                static_cast<int64_t>(e) * p.n * p.k;
    list.x[e] = reinterpret_cast<const typename C::ElementX*>(p.a) + start * p.k;
    list.scales[e] = p.scales + static_cast<int64_t>(e) * scale_k * p.n;
    list.d[e] = reinterpret_cast<typename C::ElementD*>(p.d) + start * p.n;
    list.stride_w[e] = typename C::StrideW{};
    cute::get<0>(list.stride_w[e]) = p.k;
    list.stride_x[e] = typename C::StrideX{};
    cute::get<0>(list.stride_x[e]) = p.k;
    list.stride_scale[e] = typename C::StrideScale{};
    cute::get<1>(list.stride_scale[e]) = p.n;
    cute::get<2>(list.stride_scale[e]) = scale_k * p.n;
    list.stride_d[e] = typename C::StrideD{};
    cute::get<1>(list.stride_d[e]) = p.n;
  }
}

template <class C>
typename C::Gemm::Arguments MakeArguments(const MoeGemmFp8Params& p, const ProblemList<C>& list) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = p.sm_count;
  typename C::Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 1.f;
  fusion.beta = 0.f;
  typename C::CollectiveMainloop::Arguments mainloop{};
  mainloop.ptr_A = list.w;
  mainloop.dA = list.stride_w;
  mainloop.ptr_B = list.x;
  mainloop.dB = list.stride_x;
  mainloop.ptr_S = list.scales;
  mainloop.dS = list.stride_scale;
  mainloop.chunk_size = p.group_size;
  args = typename C::Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                     {MoeGemmFp8Groups(p), list.sizes, nullptr},
                                     mainloop,
                                     {fusion, nullptr, nullptr, list.d, list.stride_d},
                                     hw};
  return args;
}

template <MoeEpilogue kEpilogue>
int64_t WorkspaceBytes(int groups, int sm_count) {
  using C = Config<kEpilogue>;
  MoeGemmFp8Params p{};
  p.experts = groups;
  p.sm_count = sm_count;
  p.group_size = kMoeFp8TileK;
  ProblemList<C> list(nullptr, groups);
  return list.bytes + static_cast<int64_t>(C::Gemm::get_workspace_size(MakeArguments<C>(p, list)));
}

template <MoeEpilogue kEpilogue>
cudaError_t Run(const MoeGemmFp8Params& p, cudaStream_t stream) {
  using C = Config<kEpilogue>;
  if (p.group_size <= 0 || (p.group_size != p.k && p.group_size % kMoeFp8TileK != 0)) {
    return cudaErrorInvalidValue;
  }
  // One chunk_size for all groups: the extra group's scale row for k tile t is
  // t / ceil(group_size / 64), a group_size-wide chunk only when group_size is a multiple of 64.
  if (p.extra.w != nullptr && p.extra.k > p.group_size && p.group_size % kMoeFp8TileK != 0) {
    return cudaErrorInvalidValue;
  }
  const int groups = MoeGemmFp8Groups(p);
  ProblemList<C> list(p.workspace, groups);
  SetupKernel<C><<<(groups + 127) / 128, 128, 0, stream>>>(p, list);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return moe_gemm::RunGrouped<typename C::Gemm>(MakeArguments<C>(p, list), p.workspace,
                                               p.workspace_bytes, list.bytes, stream);
}

}  // namespace moe_gemm_fp8
}  // namespace twotower_rt
