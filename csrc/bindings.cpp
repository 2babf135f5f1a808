// The one bindings file of kernels._cuda. Each op adds its entry points here; the launchers live in
// csrc/<op>.cu and are declared in csrc/<op>.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.h"
#include "warp_occlusion.h"

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

// ---- warp_occlusion ---------------------------------------------------------------------------
namespace warp_bindings {

using avatar::DType;
using Strides3 = std::array<int64_t, 3>;
using Strides4 = std::array<int64_t, 4>;
using Shape4 = std::array<int64_t, 4>;

DType dtype_of(int code, const char* name) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(name) + " must be a dtype code 0 (float32), 1 "
                                "(float16) or 2 (bfloat16), got " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

avatar::WarpShape shape_of(const Shape4& s) {
  for (int64_t v : s) {
    if (v < 0) throw std::invalid_argument("shape must be non-negative [B, H, W, C]");
  }
  // int32 pixel indices (Triton kernels) and int grid sizes
  if (s[0] * s[1] * s[2] >= (int64_t{1} << 31)) {
    throw std::invalid_argument("B*H*W must be below 2**31, got " +
                                std::to_string(s[0] * s[1] * s[2]));
  }
  // int32 footprint keys of the deterministic plan, n_keys = B*(H+1)*(W+1) included
  if (s[0] * (s[1] + 1) * (s[2] + 1) >= (int64_t{1} << 31) - 1) {
    throw std::invalid_argument("B*(H+1)*(W+1) must be below 2**31 - 1, got " +
                                std::to_string(s[0] * (s[1] + 1) * (s[2] + 1)));
  }
  return {s[0], s[1], s[2], s[3]};
}

template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

void require(std::uintptr_t address, const char* name) {
  if (address == 0) {
    throw std::invalid_argument(std::string(name) + " must be a device pointer, got 0");
  }
}

// Make the tensors' device current for the launch (the extension has its own static cudart).
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous) cudaSetDevice(previous);
  }
};

avatar::WarpInputs inputs(const Shape4& shape, int dtype, std::uintptr_t h, const Strides3& hs,
                          std::uintptr_t flow, const Strides4& fs, int flow_dtype,
                          std::uintptr_t occ, const Strides3& os) {
  require(h, "h");
  require(flow, "flow");
  avatar::WarpInputs in;
  in.shape = shape_of(shape);
  in.dtype = dtype_of(dtype, "dtype");
  in.flow_dtype = dtype_of(flow_dtype, "flow_dtype");
  if (in.flow_dtype != in.dtype && in.flow_dtype != DType::kFloat32) {
    throw std::invalid_argument("flow_dtype must equal dtype or be 0 (float32)");
  }
  in.h = ptr<const void>(h);
  in.h_strides = {hs[0], hs[1], hs[2]};
  in.flow = ptr<const void>(flow);
  in.flow_strides = {fs[0], fs[1], fs[2], fs[3]};
  in.occ = ptr<const void>(occ);
  in.occ_strides = {os[0], os[1], os[2]};
  return in;
}

void fwd(int device, std::uintptr_t stream, const Shape4& shape, int dtype, std::uintptr_t h,
         const Strides3& h_strides, std::uintptr_t flow, const Strides4& flow_strides,
         int flow_dtype, std::uintptr_t occ, const Strides3& occ_strides, std::uintptr_t out,
         bool residual) {
  const avatar::WarpInputs in =
      inputs(shape, dtype, h, h_strides, flow, flow_strides, flow_dtype, occ, occ_strides);
  require(out, "out");
  DeviceGuard guard(device);
  check_cuda(avatar::warp_occlusion_fwd(in, ptr<void>(out), residual, avatar::as_stream(stream)),
             "warp_occlusion_fwd");
}

void bwd(int device, std::uintptr_t stream, const Shape4& shape, int dtype, std::uintptr_t dout,
         const Strides3& dout_strides, std::uintptr_t h, const Strides3& h_strides,
         std::uintptr_t flow, const Strides4& flow_strides, int flow_dtype, std::uintptr_t occ,
         const Strides3& occ_strides, std::uintptr_t dh_accum, std::uintptr_t dflow,
         std::uintptr_t docc, std::uintptr_t plan_key, std::uintptr_t plan_wt) {
  const avatar::WarpInputs in =
      inputs(shape, dtype, h, h_strides, flow, flow_strides, flow_dtype, occ, occ_strides);
  require(dout, "dout");
  require(dflow, "dflow");
  require(docc, "docc");
  if ((plan_key == 0) != (plan_wt == 0)) {
    throw std::invalid_argument("plan_key and plan_wt must both be given or both be 0");
  }
  DeviceGuard guard(device);
  check_cuda(avatar::warp_occlusion_bwd(in, ptr<const void>(dout),
                                        {dout_strides[0], dout_strides[1], dout_strides[2]},
                                        ptr<float>(dh_accum), ptr<void>(dflow), ptr<void>(docc),
                                        ptr<int32_t>(plan_key), ptr<float>(plan_wt),
                                        avatar::as_stream(stream)),
             "warp_occlusion_bwd");
}

void gather(int device, std::uintptr_t stream, const Shape4& shape, int dtype,
            std::uintptr_t dout, const Strides3& dout_strides, std::uintptr_t order,
            std::uintptr_t plan_wt, std::uintptr_t row_ptr, std::uintptr_t dh, bool residual) {
  const avatar::WarpShape s = shape_of(shape);
  for (auto [address, name] : {std::pair{dout, "dout"}, std::pair{order, "order"},
                               std::pair{plan_wt, "plan_wt"}, std::pair{row_ptr, "row_ptr"},
                               std::pair{dh, "dh"}}) {
    require(address, name);
  }
  DeviceGuard guard(device);
  check_cuda(avatar::warp_occlusion_gather(
                 s, dtype_of(dtype, "dtype"), ptr<const void>(dout),
                 {dout_strides[0], dout_strides[1], dout_strides[2]}, ptr<const int64_t>(order),
                 ptr<const float>(plan_wt), ptr<const int64_t>(row_ptr), ptr<void>(dh), residual,
                 avatar::as_stream(stream)),
             "warp_occlusion_gather");
}

void bind(py::module_& m) {
  m.def("warp_occlusion_fwd", &fwd,
        "out = (h if residual) + occ * bilinear(h, x + dx, y + dy); out contiguous [B, H, W, C]",
        py::arg("device"), py::arg("stream"), py::arg("shape"), py::arg("dtype"), py::arg("h"),
        py::arg("h_strides"), py::arg("flow"), py::arg("flow_strides"), py::arg("flow_dtype"),
        py::arg("occ"), py::arg("occ_strides"), py::arg("out"), py::arg("residual"));
  m.def("warp_occlusion_bwd", &bwd,
        "dflow, docc and either fp32 atomics into dh_accum or the deterministic plan",
        py::arg("device"), py::arg("stream"), py::arg("shape"), py::arg("dtype"),
        py::arg("dout"), py::arg("dout_strides"), py::arg("h"), py::arg("h_strides"),
        py::arg("flow"), py::arg("flow_strides"), py::arg("flow_dtype"), py::arg("occ"),
        py::arg("occ_strides"), py::arg("dh_accum"), py::arg("dflow"), py::arg("docc"),
        py::arg("plan_key"), py::arg("plan_wt"));
  m.def("warp_occlusion_gather", &gather,
        "deterministic dh from the sorted plan (order, plan_wt, row_ptr)", py::arg("device"),
        py::arg("stream"), py::arg("shape"), py::arg("dtype"), py::arg("dout"),
        py::arg("dout_strides"), py::arg("order"), py::arg("plan_wt"), py::arg("row_ptr"),
        py::arg("dh"), py::arg("residual"));
}

}  // namespace warp_bindings

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "avatar-kernels CUDA extension: framework-agnostic launchers (pointers, strides, stream)";
  m.def("has_device", []() { return device_error().empty(); },
        "True when the CUDA runtime sees at least one device");
  m.def("device_error", &device_error, "Why no CUDA device is usable ('' when one is)");
  m.attr("ops") = py::make_tuple();  // names of the ops compiled in; each op appends below
  warp_bindings::bind(m);
  m.attr("ops") = m.attr("ops").attr("__add__")(py::make_tuple("warp_occlusion"));
}
