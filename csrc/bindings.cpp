// The one bindings file of kernels._cuda. Each op adds its entry points here; the launchers live in
// csrc/<op>.cu and are declared in csrc/<op>.h.
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"

namespace py = pybind11;

namespace {

// 0 devices and the runtime's own words when there is no usable device (e.g. error 35,
// "CUDA driver version is insufficient", on CPU-only machines with nvcc installed).
std::string device_error() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return std::string("cudaGetDeviceCount failed with error ") + std::to_string(err) + " (" +
           cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "cudaGetDeviceCount returned 0 devices";
  return "";
}

}  // namespace

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "avatar-kernels CUDA extension: framework-agnostic launchers (pointers, strides, stream)";
  m.def("has_device", []() { return device_error().empty(); },
        "True when the CUDA runtime sees at least one device");
  m.def("device_error", &device_error, "Why no CUDA device is usable ('' when one is)");
  m.attr("ops") = py::make_tuple();  // names of the ops compiled in; each op appends below
}
