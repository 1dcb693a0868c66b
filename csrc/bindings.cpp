// twotower_rt._C: the one pybind11 module. It takes raw device pointers as Python ints, sizes,
// strides (in elements), dtype codes and a cudaStream_t as an int; it links no libtorch. CUDA's
// runtime is linked statically and loads the driver on first use, so importing this module needs
// neither a GPU nor a driver; a call without one raises RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "ops.h"

namespace py = pybind11;

#ifndef TWOTOWER_RT_VERSION
#define TWOTOWER_RT_VERSION "unknown"
#endif
#ifndef TWOTOWER_RT_CUDA_VERSION
#define TWOTOWER_RT_CUDA_VERSION "unknown"
#endif
#ifndef TWOTOWER_RT_CUDA_ARCHS
#define TWOTOWER_RT_CUDA_ARCHS ""
#endif
#ifndef TWOTOWER_RT_BUILD_TYPE
#define TWOTOWER_RT_BUILD_TYPE "unknown"
#endif
#ifndef TWOTOWER_RT_CUTLASS_VERSION
#define TWOTOWER_RT_CUTLASS_VERSION ""
#endif
#ifndef TWOTOWER_RT_HOST_COMPILER
#define TWOTOWER_RT_HOST_COMPILER "unknown"
#endif

namespace twotower_rt {

namespace {

py::dict BuildInfo() {
  py::dict info;
  info["version"] = TWOTOWER_RT_VERSION;
  info["cuda_version"] = TWOTOWER_RT_CUDA_VERSION;  // nvcc that compiled the kernels
  info["cudart_version"] = CUDART_VERSION;          // e.g. 13000, linked statically
  py::list archs;
  const std::string arch_list = TWOTOWER_RT_CUDA_ARCHS;  // ";"-separated, e.g. "90a"
  size_t start = 0;
  while (start < arch_list.size()) {
    size_t end = arch_list.find(';', start);
    if (end == std::string::npos) end = arch_list.size();
    if (end > start) archs.append(arch_list.substr(start, end - start));
    start = end + 1;
  }
  info["archs"] = archs;
  info["build_type"] = TWOTOWER_RT_BUILD_TYPE;
#ifdef NDEBUG
  info["ndebug"] = true;
#else
  info["ndebug"] = false;
#endif
  info["cutlass_version"] = TWOTOWER_RT_CUTLASS_VERSION;  // "" when built without CUTLASS
  info["host_compiler"] = TWOTOWER_RT_HOST_COMPILER;
  py::list ops;
  ops.append("rms_norm");
  ops.append("mask_sampling");
  ops.append("sample_tokens");
  ops.append("all_reduce");
  ops.append("ssm_scan");
  ops.append("mamba_decode_step");
#ifdef TWOTOWER_RT_HAVE_BLOCK_ATTENTION
  ops.append("block_attention");
#endif
#ifdef TWOTOWER_RT_HAVE_CUTLASS
  ops.append("moe_grouped_gemm");
  ops.append("moe_grouped_gemm_fp8");
#endif
  info["ops"] = ops;
  return info;
}

// 0 when no driver is installed (the query itself then succeeds).
int DriverVersion() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace
}  // namespace twotower_rt

PYBIND11_MODULE(_C, m) {
  m.doc() = "twotower_rt CUDA kernels (raw pointers; see twotower_rt.ops for the tensor API)";
  // Must match twotower_rt::DType in include/twotower_rt/common.cuh.
  m.attr("DTYPE_FLOAT32") = static_cast<int>(0);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(1);

  m.def("build_info", &twotower_rt::BuildInfo,
        "How this module was built: CUDA version, target archs, build type, CUTLASS version.");
  m.def("cuda_driver_version", &twotower_rt::DriverVersion,
        "CUDA version the installed driver supports (e.g. 13000); 0 without a driver.");

  m.def("rms_norm", &twotower_rt::RMSNormOp,
        "out = rmsnorm(x * silu(gate)) * weight over groups of group_size; see rmsnorm.cuh.",
        py::arg("out"), py::arg("x"), py::arg("gate"), py::arg("weight"), py::arg("rows"),
        py::arg("n"), py::arg("group_size"), py::arg("out_row_stride"), py::arg("x_row_stride"),
        py::arg("gate_row_stride"), py::arg("eps"), py::arg("dtype"), py::arg("weight_dtype"),
        py::arg("device"), py::arg("stream"));

  m.def("mask_sampling_workspace_bytes", &twotower_rt::MaskSamplingWorkspaceOp,
        "Bytes of the workspace mask_sampling needs for this shape.", py::arg("batch"),
        py::arg("block_size"), py::arg("vocab"));
  m.def("mask_sampling", &twotower_rt::MaskSamplingOp,
        "One mask-diffusion step: prediction, confidence and the commit rule; see "
        "mask_sampling.cuh.",
        py::arg("logits"), py::arg("logits_batch_stride"), py::arg("logits_position_stride"),
        py::arg("block"), py::arg("block_row_stride"), py::arg("step"), py::arg("seed"),
        py::arg("offset"), py::arg("out_block"), py::arg("out_masked"),
        py::arg("out_num_committed"), py::arg("out_prediction"), py::arg("out_confidence"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("batch"), py::arg("block_size"),
        py::arg("vocab"), py::arg("mask_token_id"), py::arg("steps_per_block"),
        py::arg("confidence_threshold"), py::arg("temperature"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"));
  m.def("sample_tokens", &twotower_rt::SampleTokensOp,
        "AR sampler: argmax, or a Gumbel-max draw after temperature, top-k and top-p; see "
        "sample_tokens.cuh.",
        py::arg("logits"), py::arg("logits_row_stride"), py::arg("seed"), py::arg("offset"),
        py::arg("out"), py::arg("batch"), py::arg("vocab"), py::arg("top_k"), py::arg("top_p"),
        py::arg("temperature"), py::arg("split_size"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("sample_tokens_split_size", &twotower_rt::SampleTokensSplitSizeOp,
        "Logits per CTA of sample_tokens' split rows on a GPU of sm_count SMs, or 0 (one CTA per "
        "row); splits: 0 automatic, 1 never, k about k slices.",
        py::arg("batch"), py::arg("vocab"), py::arg("splits"), py::arg("sm_count"));
  m.def("sample_tokens_workspace_bytes", &twotower_rt::SampleTokensWorkspaceOp,
        "Workspace bytes of sample_tokens with this split size.", py::arg("batch"),
        py::arg("split_size"));
  m.def("ssm_scan", &twotower_rt::SsmScanOp,
        "Mamba-2 selective scan of a few tokens from a state (decode step, denoiser block); see "
        "ssm_scan.cuh.",
        py::arg("x"), py::arg("x_strides"), py::arg("dt"), py::arg("dt_strides"), py::arg("A"),
        py::arg("D"), py::arg("B"), py::arg("b_strides"), py::arg("C"), py::arg("c_strides"),
        py::arg("n_valid"), py::arg("state"), py::arg("state_out"), py::arg("state_rows"),
        py::arg("y"), py::arg("batch"), py::arg("n"), py::arg("heads"), py::arg("groups"),
        py::arg("head_dim"),
        py::arg("state_size"), py::arg("chunk"), py::arg("dtype"), py::arg("variant"),
        py::arg("device"), py::arg("stream"));
  m.def("ssm_chunk_combine", &twotower_rt::SsmChunkCombineOp,
        "The chunked scan's middle pass: the state entering each chunk; see ssm_scan.cuh.",
        py::arg("states"), py::arg("decay"), py::arg("initial"), py::arg("final_state"),
        py::arg("batch"), py::arg("chunks"), py::arg("heads"), py::arg("head_elems"),
        py::arg("device"), py::arg("stream"));
  m.def("mamba_decode_step", &twotower_rt::MambaDecodeOp,
        "The Mamba-2 mixer's one-token step between in_proj and out_proj (conv, scan, gated "
        "norm), fused; see mamba_decode.cuh.",
        py::arg("zxbcdt"), py::arg("zxbcdt_stride"), py::arg("conv_state"),
        py::arg("conv_state_out"), py::arg("conv_weight"), py::arg("conv_bias"),
        py::arg("dt_bias"), py::arg("A_log"), py::arg("D"), py::arg("ssm_state"),
        py::arg("ssm_state_out"), py::arg("norm_weight"), py::arg("out"), py::arg("batch"),
        py::arg("heads"), py::arg("head_dim"), py::arg("state_size"), py::arg("groups"),
        py::arg("kernel"), py::arg("eps"), py::arg("dt_min"), py::arg("dt_max"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"));
  m.def("all_reduce_signal_bytes", &twotower_rt::AllReduceSignalBytesOp,
        "Bytes of barrier flags before the data in each rank's all-reduce allocation.");
  m.def(
      "all_reduce_allocate",
      [](int64_t buffer_bytes, int device) {
        auto [ptr, handle] = twotower_rt::AllReduceAllocateOp(buffer_bytes, device);
        return py::make_tuple(ptr, py::bytes(handle));
      },
      "A zeroed device allocation (signals + buffer_bytes) and its CUDA IPC handle: (ptr, bytes).",
      py::arg("buffer_bytes"), py::arg("device"));
  m.def(
      "all_reduce_open_handle",
      [](py::bytes handle, int device) {
        return twotower_rt::AllReduceOpenHandleOp(std::string(handle), device);
      },
      "Maps a peer's allocation into this process; returns its address here.", py::arg("handle"),
      py::arg("device"));
  m.def("all_reduce_close_handle", &twotower_rt::AllReduceCloseHandleOp,
        "Unmaps a peer's allocation opened with all_reduce_open_handle.", py::arg("ptr"),
        py::arg("device"));
  m.def("all_reduce_free", &twotower_rt::AllReduceFreeOp,
        "Frees this rank's allocation from all_reduce_allocate.", py::arg("ptr"),
        py::arg("device"));
  m.def("all_reduce", &twotower_rt::AllReduceOp,
        "Custom one-shot / two-shot all-reduce over the ranks' IPC allocations; see "
        "all_reduce.cuh.",
        py::arg("ranks"), py::arg("input"), py::arg("output"), py::arg("numel"),
        py::arg("buffer_bytes"), py::arg("rank"), py::arg("dtype"), py::arg("algo"),
        py::arg("device"), py::arg("stream"));
#ifdef TWOTOWER_RT_HAVE_CUTLASS
  m.def("moe_grouped_gemm_workspace_bytes", &twotower_rt::MoeGemmWorkspaceOp,
        "Workspace bytes of moe_grouped_gemm for this many experts (plus an extra group) on this "
        "device.",
        py::arg("experts"), py::arg("epilogue"), py::arg("device"), py::arg("extra_group") = false);
  m.def("moe_grouped_gemm", &twotower_rt::MoeGroupedGemmOp,
        "Grouped GEMM of the routed experts (rows sorted by expert; relu^2 epilogue optional), "
        "optionally with one extra group (the shared expert); see moe_gemm.cuh.",
        py::arg("a"), py::arg("w"), py::arg("offsets"), py::arg("d"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("experts"), py::arg("n"), py::arg("k"),
        py::arg("epilogue"), py::arg("device"), py::arg("stream"), py::arg("extra_a") = 0,
        py::arg("extra_w") = 0, py::arg("extra_d") = 0, py::arg("extra_rows") = 0,
        py::arg("extra_n") = 0, py::arg("extra_k") = 0, py::arg("extra_lda") = 0,
        py::arg("extra_ldd") = 0);
  m.def("moe_grouped_gemm_fp8_workspace_bytes", &twotower_rt::MoeGemmFp8WorkspaceOp,
        "Workspace bytes of moe_grouped_gemm_fp8 for this many experts (plus an extra group) on "
        "this device.",
        py::arg("experts"), py::arg("epilogue"), py::arg("device"), py::arg("extra_group") = false);
  m.def("moe_grouped_gemm_fp8", &twotower_rt::MoeGroupedGemmFp8Op,
        "Grouped GEMM of the routed experts with FP8 (e4m3) weights and fp32 scales, bf16 tokens "
        "(rows sorted by expert; relu^2 epilogue optional), optionally with one extra group (the "
        "shared expert, its scales at the experts' group_size); see moe_gemm_fp8.cuh.",
        py::arg("a"), py::arg("w"), py::arg("scales"), py::arg("offsets"), py::arg("d"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("experts"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("epilogue"), py::arg("device"),
        py::arg("stream"), py::arg("extra_a") = 0, py::arg("extra_w") = 0,
        py::arg("extra_scales") = 0, py::arg("extra_d") = 0, py::arg("extra_rows") = 0,
        py::arg("extra_n") = 0, py::arg("extra_k") = 0, py::arg("extra_lda") = 0,
        py::arg("extra_ldd") = 0);
#endif
#ifdef TWOTOWER_RT_HAVE_BLOCK_ATTENTION
  m.def("block_attention", &twotower_rt::BlockAttentionOp,
        "Denoiser block attention / AR decode over a lengths-indexed K/V cache, split-KV; see "
        "block_attention.cuh.",
        py::arg("q"), py::arg("q_strides"), py::arg("k_cache"), py::arg("k_cache_strides"),
        py::arg("v_cache"), py::arg("v_cache_strides"), py::arg("context_lens"),
        py::arg("cache_slots"), py::arg("k_block"), py::arg("k_block_strides"), py::arg("v_block"),
        py::arg("v_block_strides"), py::arg("out"), py::arg("out_strides"),
        py::arg("partial_out"), py::arg("partial_lse"), py::arg("batch"), py::arg("seq"),
        py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("block_len"),
        py::arg("num_splits"), py::arg("softmax_scale"), py::arg("variant"), py::arg("device"),
        py::arg("stream"));
#endif
}
