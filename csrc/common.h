// Shared helpers for the framework-agnostic CUDA extension.
//
// The extension never links libtorch: every entry point takes raw device pointers (as integers),
// sizes, element strides and a CUDA stream handle, so torch tensors (via data_ptr()) and CuPy
// arrays (via .data.ptr) are served alike. Errors come back as cudaError_t and become Python
// exceptions in bindings.cpp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace avatar {

// Element types the kernels are instantiated for; codes shared with kernels/_cuda_types.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline cudaStream_t as_stream(std::uintptr_t handle) {
  return reinterpret_cast<cudaStream_t>(handle);
}

}  // namespace avatar
