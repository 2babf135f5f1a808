// Flow warping with occlusion: host launchers (type dispatch, vector width, lanes per pixel,
// grid) for the kernels in warp_occlusion_kernels.cuh.
#include "warp_occlusion.h"

#include <cstdint>

#include "warp_occlusion_kernels.cuh"

namespace avatar {
namespace {

using namespace warp_detail;

const dim3 kBlock(kWarpSize, kWarpsPerBlock);

// Launches kernel<VEC> (16-byte vectors) when `vectorize`, else kernel<1>, with the lanes per
// pixel and the grid that go with that width; params.lanes is set here.
template <int kVec, typename Params, typename Vector, typename Scalar>
cudaError_t launch(bool vectorize, int64_t n_pix, int64_t channels, Params params,
                   Vector vector_kernel, Scalar scalar_kernel, cudaStream_t stream) {
  const int vec = vectorize ? kVec : 1;
  params.lanes = lanes_per_pixel(channels, vec);
  const dim3 grid(static_cast<unsigned>(block_count(n_pix, params.lanes)));
  if (vectorize) {
    vector_kernel<<<grid, kBlock, 0, stream>>>(params);
  } else {
    scalar_kernel<<<grid, kBlock, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

// float4 atomics (sm_90+) on the current device.
cudaError_t has_vector_atomics(bool* result) {
  int device = 0;
  int major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                                       device);
  *result = major >= 9;
  return err;
}

}  // namespace

cudaError_t warp_occlusion_fwd(const WarpInputs& in, void* out, bool residual,
                               cudaStream_t stream) {
  if (pixel_count(in.shape) == 0 || in.shape.channels == 0) return cudaSuccess;
  return dispatch(in.dtype, in.flow_dtype, [&](auto tag, auto flow_tag) {
    using T = typename decltype(tag)::type;
    using TF = typename decltype(flow_tag)::type;
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    FwdParams<T, TF> p{in.shape, static_cast<const T*>(in.h), in.h_strides,
                       static_cast<const TF*>(in.flow), in.flow_strides,
                       static_cast<const T*>(in.occ), in.occ_strides, static_cast<T*>(out),
                       residual, 1};
    const PixelStrides out_strides{in.shape.height * in.shape.width * in.shape.channels,
                                   in.shape.width * in.shape.channels, in.shape.channels};
    const bool vectorize =
        can_vectorize<T>(in.shape.channels, {in.h, out}, {in.h_strides, out_strides});
    return launch<kVec>(vectorize, pixel_count(in.shape), in.shape.channels, p,
                        warp_occlusion_fwd_kernel<T, TF, kVec>,
                        warp_occlusion_fwd_kernel<T, TF, 1>, stream);
  });
}

cudaError_t warp_occlusion_bwd(const WarpInputs& in, const void* dout, PixelStrides dout_strides,
                               float* dh_accum, void* dflow, void* docc, int32_t* plan_key,
                               float* plan_wt, cudaStream_t stream) {
  if (pixel_count(in.shape) == 0) return cudaSuccess;
  bool vector_atomics = false;
  if (dh_accum != nullptr) {
    const cudaError_t err = has_vector_atomics(&vector_atomics);
    if (err != cudaSuccess) return err;
  }
  return dispatch(in.dtype, in.flow_dtype, [&](auto tag, auto flow_tag) {
    using T = typename decltype(tag)::type;
    using TF = typename decltype(flow_tag)::type;
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    BwdParams<T, TF> p{in.shape, static_cast<const T*>(dout), dout_strides,
                       static_cast<const T*>(in.h), in.h_strides,
                       static_cast<const TF*>(in.flow), in.flow_strides,
                       static_cast<const T*>(in.occ), in.occ_strides, dh_accum,
                       static_cast<TF*>(dflow), static_cast<T*>(docc), plan_key, plan_wt, 1};
    // The atomic scatter stays coalesced only with float4 atomics (sm_90) or scalar access.
    const bool vectorize =
        can_vectorize<T>(in.shape.channels, {in.h, dout, dh_accum == nullptr ? in.h : dh_accum},
                         {in.h_strides, dout_strides}) &&
        (dh_accum == nullptr || vector_atomics);
    return launch<kVec>(vectorize, pixel_count(in.shape), in.shape.channels, p,
                        warp_occlusion_bwd_kernel<T, TF, kVec>,
                        warp_occlusion_bwd_kernel<T, TF, 1>, stream);
  });
}

cudaError_t warp_occlusion_gather(WarpShape shape, DType dtype, const void* dout,
                                  PixelStrides dout_strides, const int64_t* order,
                                  const float* plan_wt, const int64_t* row_ptr, void* dh,
                                  bool residual, cudaStream_t stream) {
  if (pixel_count(shape) == 0 || shape.channels == 0) return cudaSuccess;
  const DType flow_dtype = DType::kFloat32;  // irrelevant here: dispatch on dtype only
  return dispatch(dtype, flow_dtype, [&](auto tag, auto) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    GatherParams<T> p{shape, static_cast<const T*>(dout), dout_strides, order, plan_wt, row_ptr,
                      static_cast<T*>(dh), residual, 1};
    const PixelStrides dh_strides{shape.height * shape.width * shape.channels,
                                  shape.width * shape.channels, shape.channels};
    const bool vectorize =
        can_vectorize<T>(shape.channels, {dout, dh}, {dout_strides, dh_strides});
    return launch<kVec>(vectorize, pixel_count(shape), shape.channels, p,
                        warp_occlusion_gather_kernel<T, kVec>,
                        warp_occlusion_gather_kernel<T, 1>, stream);
  });
}

}  // namespace avatar
