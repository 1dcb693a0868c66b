// twotower_rt._C: the one pybind11 module. It takes raw device pointers as Python ints, sizes,
// strides (in elements), dtype codes and a cudaStream_t as an int; it links no libtorch. CUDA's
// runtime is linked statically and loads the driver on first use, so importing this module needs
// neither a GPU nor a driver; a call without one raises RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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

// csrc/rmsnorm.cu
void RMSNormOp(std::uintptr_t out, std::uintptr_t x, std::uintptr_t gate, std::uintptr_t weight,
               int64_t rows, int64_t n, int64_t group_size, int64_t out_row_stride,
               int64_t x_row_stride, int64_t gate_row_stride, double eps, int dtype,
               int weight_dtype, int device, std::uintptr_t stream);

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
}
