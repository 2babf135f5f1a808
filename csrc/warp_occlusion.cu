// Flow warping with occlusion: host launchers (type dispatch, vector width, grid) for the kernels
// in warp_occlusion_kernels.cuh.
#include "warp_occlusion.h"

#include <cstdint>

#include "warp_occlusion_kernels.cuh"

namespace avatar {
namespace {

using namespace warp_detail;

dim3 grid_for(const WarpShape& s) {
  return dim3(static_cast<unsigned>((pixel_count(s) + kPixelsPerBlock - 1) / kPixelsPerBlock));
}

const dim3 kBlock(kWarpSize, kPixelsPerBlock);

}  // namespace

cudaError_t warp_occlusion_fwd(const WarpInputs& in, void* out, bool residual,
                               cudaStream_t stream) {
  if (pixel_count(in.shape) == 0 || in.shape.channels == 0) return cudaSuccess;
  return dispatch(in.dtype, in.flow_dtype, [&](auto tag, auto flow_tag) {
    using T = typename decltype(tag)::type;
    using TF = typename decltype(flow_tag)::type;
    FwdParams<T, TF> p{in.shape, static_cast<const T*>(in.h), in.h_strides,
                       static_cast<const TF*>(in.flow), in.flow_strides,
                       static_cast<const T*>(in.occ), in.occ_strides, static_cast<T*>(out),
                       residual};
    const PixelStrides out_strides{in.shape.height * in.shape.width * in.shape.channels,
                                   in.shape.width * in.shape.channels, in.shape.channels};
    if (can_vectorize<T>(in.shape.channels, {in.h, out}, {in.h_strides, out_strides})) {
      warp_occlusion_fwd_kernel<T, TF, static_cast<int>(16 / sizeof(T))>
          <<<grid_for(in.shape), kBlock, 0, stream>>>(p);
    } else {
      warp_occlusion_fwd_kernel<T, TF, 1><<<grid_for(in.shape), kBlock, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t warp_occlusion_bwd(const WarpInputs& in, const void* dout, PixelStrides dout_strides,
                               float* dh_accum, void* dflow, void* docc, int32_t* plan_tgt,
                               float* plan_wt, cudaStream_t stream) {
  if (pixel_count(in.shape) == 0) return cudaSuccess;
  return dispatch(in.dtype, in.flow_dtype, [&](auto tag, auto flow_tag) {
    using T = typename decltype(tag)::type;
    using TF = typename decltype(flow_tag)::type;
    BwdParams<T, TF> p{in.shape, static_cast<const T*>(dout), dout_strides,
                       static_cast<const T*>(in.h), in.h_strides,
                       static_cast<const TF*>(in.flow), in.flow_strides,
                       static_cast<const T*>(in.occ), in.occ_strides, dh_accum,
                       static_cast<TF*>(dflow), static_cast<T*>(docc), plan_tgt, plan_wt};
    if (can_vectorize<T>(in.shape.channels, {in.h, dout}, {in.h_strides, dout_strides})) {
      warp_occlusion_bwd_kernel<T, TF, static_cast<int>(16 / sizeof(T))>
          <<<grid_for(in.shape), kBlock, 0, stream>>>(p);
    } else {
      warp_occlusion_bwd_kernel<T, TF, 1><<<grid_for(in.shape), kBlock, 0, stream>>>(p);
    }
    return cudaGetLastError();
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
    GatherParams<T> p{shape, static_cast<const T*>(dout), dout_strides, order, plan_wt, row_ptr,
                      static_cast<T*>(dh), residual};
    const PixelStrides dh_strides{shape.height * shape.width * shape.channels,
                                  shape.width * shape.channels, shape.channels};
    if (can_vectorize<T>(shape.channels, {dout, dh}, {dout_strides, dh_strides})) {
      warp_occlusion_gather_kernel<T, static_cast<int>(16 / sizeof(T))>
          <<<grid_for(shape), kBlock, 0, stream>>>(p);
    } else {
      warp_occlusion_gather_kernel<T, 1><<<grid_for(shape), kBlock, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace avatar
