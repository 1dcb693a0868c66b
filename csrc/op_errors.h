// Error handling shared by the csrc/*.cu launchers: argument errors and CUDA errors become C++
// exceptions (pybind11 turns them into ValueError / RuntimeError) that name the op.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace twotower_rt {

[[noreturn]] inline void ThrowInvalid(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": " + what);
}

inline void CheckCuda(const char* op, cudaError_t err, const char* during) {
  if (err == cudaSuccess) return;
  std::string message = std::string(op) + ": CUDA error during " + during + ": " +
                        cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  int driver_version = 0;
  if (err == cudaErrorInsufficientDriver && cudaDriverGetVersion(&driver_version) == cudaSuccess &&
      driver_version == 0) {
    message += "; no NVIDIA driver is installed on this machine";
  } else if (err == cudaErrorInsufficientDriver) {
    message += "; the driver supports CUDA " + std::to_string(driver_version / 1000) + "." +
               std::to_string(driver_version % 1000 / 10) + ", this module was built with " +
               std::to_string(CUDART_VERSION / 1000) + "." +
               std::to_string(CUDART_VERSION % 1000 / 10);
  } else if (err == cudaErrorNoKernelImageForDevice) {
    message += "; twotower_rt._C is built for sm_90a (H100/H200) only";
  }
  throw std::runtime_error(message);
}

// Runs the launch on `device` and puts the caller's current device back afterwards.
class ScopedDevice {
 public:
  ScopedDevice(const char* op, int device) {
    CheckCuda(op, cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) CheckCuda(op, cudaSetDevice(device), "cudaSetDevice");
  }
  ~ScopedDevice() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace twotower_rt
