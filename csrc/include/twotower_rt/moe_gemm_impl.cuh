// The CUTLASS 3 grouped GEMM behind moe_gemm.cuh, as a template over the epilogue. Included by
// exactly one translation unit per epilogue (csrc/moe_gemm_up.cu, csrc/moe_gemm_down.cu): each
// instantiation takes ~30 s of nvcc.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <type_traits>

#include "twotower_rt/moe_gemm.cuh"

namespace twotower_rt {
namespace moe_gemm {

// relu(x)^2 on the fp32 accumulator, scalar and fragment-wise (the epilogue applies it to arrays).
template <class T>
struct Relu2 {
  static const bool kIsHeavy = false;
  CUTLASS_HOST_DEVICE T operator()(T const& x) const {
    const T r = x > T(0) ? x : T(0);
    return r * r;
  }
};

template <class T, int N>
struct Relu2<cutlass::Array<T, N>> {
  static const bool kIsHeavy = false;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x) const {
    cutlass::Array<T, N> y;
    Relu2<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = f(x[i]);
    return y;
  }
};

template <MoeEpilogue kEpilogue>
struct Config {
  using Element = cutlass::bfloat16_t;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;     // tokens x K
  using LayoutB = cutlass::layout::ColumnMajor;  // K x N, i.e. W (N, K) row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 8;  // 16 bytes of bf16
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Fusion = std::conditional_t<
      kEpilogue == MoeEpilogue::kRelu2,
      cutlass::epilogue::fusion::LinCombEltAct<Relu2, Element, float, void>,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void>>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment,
      Element, LayoutD*, kAlignment, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment,
      Element, LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The device-side problem list at the start of the workspace, each array 16-byte aligned, the
// whole padded to 256 bytes (the workspace itself comes 256-byte aligned from the allocator).
template <class C>
struct ProblemList {
  typename C::Shape* sizes;
  const typename C::Element** a;
  const typename C::Element** b;
  typename C::Element** d;
  typename C::StrideA* stride_a;
  typename C::StrideB* stride_b;
  typename C::StrideD* stride_d;
  int64_t bytes;

  ProblemList(void* base, int experts) {
    char* ptr = static_cast<char*>(base);
    int64_t used = 0;
    auto take = [&](int64_t size) {
      char* at = ptr + used;
      used += (size + 15) / 16 * 16;
      return at;
    };
    sizes = reinterpret_cast<typename C::Shape*>(take(sizeof(*sizes) * experts));
    a = reinterpret_cast<const typename C::Element**>(take(sizeof(*a) * experts));
    b = reinterpret_cast<const typename C::Element**>(take(sizeof(*b) * experts));
    d = reinterpret_cast<typename C::Element**>(take(sizeof(*d) * experts));
    stride_a = reinterpret_cast<typename C::StrideA*>(take(sizeof(*stride_a) * experts));
    stride_b = reinterpret_cast<typename C::StrideB*>(take(sizeof(*stride_b) * experts));
    stride_d = reinterpret_cast<typename C::StrideD*>(take(sizeof(*stride_d) * experts));
    bytes = (used + 255) / 256 * 256;  // CUTLASS's workspace after it holds TMA descriptors
  }
};

template <class C>
__global__ void SetupKernel(const MoeGemmParams p, ProblemList<C> list) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < p.experts; e += gridDim.x * blockDim.x) {
    const int64_t start = e > 0 ? p.offsets[e - 1] : 0;
    const int m = static_cast<int>(p.offsets[e] - start);
    list.sizes[e] = typename C::Shape(m, p.n, p.k);
    list.a[e] = reinterpret_cast<const typename C::Element*>(p.a) + start * p.k;
    list.b[e] = reinterpret_cast<const typename C::Element*>(p.w) +
                static_cast<int64_t>(e) * p.n * p.k;
    list.d[e] = reinterpret_cast<typename C::Element*>(p.d) + start * p.n;
    list.stride_a[e] = typename C::StrideA{};
    cute::get<0>(list.stride_a[e]) = p.k;
    list.stride_b[e] = typename C::StrideB{};
    cute::get<0>(list.stride_b[e]) = p.k;
    list.stride_d[e] = typename C::StrideD{};
    cute::get<0>(list.stride_d[e]) = p.n;
  }
}

template <class C>
typename C::Gemm::Arguments MakeArguments(const MoeGemmParams& p, const ProblemList<C>& list) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = p.device;
  hw.sm_count = p.sm_count;
  typename C::Gemm::Arguments args;
  decltype(args.epilogue.thread) fusion;
  fusion.alpha = 1.f;
  fusion.beta = 0.f;
  args = typename C::Gemm::Arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {p.experts, list.sizes, nullptr},
      {list.a, list.stride_a, list.b, list.stride_b},
      {fusion, nullptr, nullptr, list.d, list.stride_d},
      hw};
  return args;
}

template <MoeEpilogue kEpilogue>
int64_t WorkspaceBytes(int experts, int sm_count) {
  using C = Config<kEpilogue>;
  MoeGemmParams p{};
  p.experts = experts;
  p.sm_count = sm_count;
  ProblemList<C> list(nullptr, experts);
  return list.bytes + static_cast<int64_t>(C::Gemm::get_workspace_size(MakeArguments<C>(p, list)));
}

template <MoeEpilogue kEpilogue>
cudaError_t Run(const MoeGemmParams& p, cudaStream_t stream) {
  using C = Config<kEpilogue>;
  ProblemList<C> list(p.workspace, p.experts);
  SetupKernel<C><<<(p.experts + 127) / 128, 128, 0, stream>>>(p, list);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  auto args = MakeArguments<C>(p, list);
  typename C::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (p.workspace_bytes < list.bytes + static_cast<int64_t>(C::Gemm::get_workspace_size(args))) {
    return cudaErrorInvalidValue;
  }
  void* cutlass_workspace = static_cast<char*>(p.workspace) + list.bytes;
  if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    return cudaErrorUnknown;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

}  // namespace moe_gemm
}  // namespace twotower_rt
