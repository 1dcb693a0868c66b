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
  // SetupKernel writes the one dynamic stride (the row stride) of each.
  static_assert(std::is_same_v<StrideA, cute::Stride<int64_t, cute::_1, cute::_0>>);
  static_assert(std::is_same_v<StrideB, cute::Stride<int64_t, cute::_1, cute::_0>>);
  static_assert(std::is_same_v<StrideD, cute::Stride<int64_t, cute::_1, cute::_0>>);
};

// Cuts a workspace into the device-side problem list's arrays, each 16-byte aligned; `bytes` is
// where CUTLASS's own workspace starts (256-byte aligned: it holds TMA descriptors).
struct WorkspaceCarver {
  char* base;
  int64_t used = 0;
  explicit WorkspaceCarver(void* workspace) : base(static_cast<char*>(workspace)) {}
  template <class T>
  T* take(int count) {
    T* at = reinterpret_cast<T*>(base + used);
    used += (static_cast<int64_t>(sizeof(T)) * count + 15) / 16 * 16;
    return at;
  }
  int64_t bytes() const { return (used + 255) / 256 * 256; }
};

// Checks, initialises and runs a CUTLASS grouped GEMM whose problem list fills the first
// `list_bytes` of the workspace.
template <class Gemm>
cudaError_t RunGrouped(const typename Gemm::Arguments& args, void* workspace,
                       int64_t workspace_bytes, int64_t list_bytes, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (workspace_bytes < list_bytes + static_cast<int64_t>(Gemm::get_workspace_size(args))) {
    return cudaErrorInvalidValue;
  }
  void* cutlass_workspace = static_cast<char*>(workspace) + list_bytes;
  if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    return cudaErrorUnknown;
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

// The device-side problem list at the start of the workspace (which comes 256-byte aligned from
// the allocator).
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

  ProblemList(void* base, int groups) {
    WorkspaceCarver carve(base);
    sizes = carve.take<typename C::Shape>(groups);
    a = carve.take<const typename C::Element*>(groups);
    b = carve.take<const typename C::Element*>(groups);
    d = carve.take<typename C::Element*>(groups);
    stride_a = carve.take<typename C::StrideA>(groups);
    stride_b = carve.take<typename C::StrideB>(groups);
    stride_d = carve.take<typename C::StrideD>(groups);
    bytes = carve.bytes();
  }
};

// Group e < experts: expert e's rows of A and D, its slice of W. Group `experts` (when p.extra.w
// is set): the extra group's own buffers, sizes and row strides.
template <class C>
__global__ void SetupKernel(const MoeGemmParams p, ProblemList<C> list) {
  const int groups = MoeGemmGroups(p);
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < groups; e += gridDim.x * blockDim.x) {
    list.stride_a[e] = typename C::StrideA{};
    list.stride_b[e] = typename C::StrideB{};
    list.stride_d[e] = typename C::StrideD{};
    if (e == p.experts) {
      const MoeGemmExtraGroup& x = p.extra;
      list.sizes[e] = typename C::Shape(x.rows, x.n, x.k);
      list.a[e] = reinterpret_cast<const typename C::Element*>(x.a);
      list.b[e] = reinterpret_cast<const typename C::Element*>(x.w);
      list.d[e] = reinterpret_cast<typename C::Element*>(x.d);
      cute::get<0>(list.stride_a[e]) = x.lda;
      cute::get<0>(list.stride_b[e]) = x.k;
      cute::get<0>(list.stride_d[e]) = x.ldd;
      continue;
    }
    const int64_t start = e > 0 ? p.offsets[e - 1] : 0;
    const int m = static_cast<int>(p.offsets[e] - start);
    list.sizes[e] = typename C::Shape(m, p.n, p.k);
    list.a[e] = reinterpret_cast<const typename C::Element*>(p.a) + start * p.k;
    list.b[e] = reinterpret_cast<const typename C::Element*>(p.w) +
                static_cast<int64_t>(e) * p.n * p.k;
    list.d[e] = reinterpret_cast<typename C::Element*>(p.d) + start * p.n;
    cute::get<0>(list.stride_a[e]) = p.k;
    cute::get<0>(list.stride_b[e]) = p.k;
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
      {MoeGemmGroups(p), list.sizes, nullptr},
      {list.a, list.stride_a, list.b, list.stride_b},
      {fusion, nullptr, nullptr, list.d, list.stride_d},
      hw};
  return args;
}

template <MoeEpilogue kEpilogue>
int64_t WorkspaceBytes(int groups, int sm_count) {
  using C = Config<kEpilogue>;
  MoeGemmParams p{};
  p.experts = groups;
  p.sm_count = sm_count;
  ProblemList<C> list(nullptr, groups);
  return list.bytes + static_cast<int64_t>(C::Gemm::get_workspace_size(MakeArguments<C>(p, list)));
}

template <MoeEpilogue kEpilogue>
cudaError_t Run(const MoeGemmParams& p, cudaStream_t stream) {
  using C = Config<kEpilogue>;
  const int groups = MoeGemmGroups(p);
  ProblemList<C> list(p.workspace, groups);
  SetupKernel<C><<<(groups + 127) / 128, 128, 0, stream>>>(p, list);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return RunGrouped<typename C::Gemm>(MakeArguments<C>(p, list), p.workspace, p.workspace_bytes,
                                     list.bytes, stream);
}

}  // namespace moe_gemm
}  // namespace twotower_rt
