// Flow warping with occlusion: out = (h if residual) + occ * bilinear(h, x + dx, y + dy).
//
// Mirrors kernels/flow_warp/triton_impl.py exactly (same coordinate math in fp32, same tap order, same
// NaN rule, same deterministic gather plan); kernels/flow_warp/README.md has the formula.
//
// Tensors are [B, H, W, *] with pixel p = (b*H + y)*W + x. Inputs are read through element
// strides (channel stride 1 for h and dout); the outputs the caller allocates are contiguous.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common.h"

namespace avatar {

struct WarpShape {
  int64_t batch, height, width, channels;
};

// Element strides of the pixel axes of a [B, H, W, C] tensor whose channel axis has stride 1.
struct PixelStrides {
  int64_t b, y, x;
};

// Element strides of flow [B, H, W, 2]; c is the stride between dx and dy.
struct FlowStrides {
  int64_t b, y, x, c;
};

struct WarpInputs {
  WarpShape shape;
  DType dtype;                 // of h, occlusion, out, dout, dh, docc
  const void* h;               // [B, H, W, C]
  PixelStrides h_strides;
  const void* flow;            // [B, H, W, 2], in dtype or float32
  FlowStrides flow_strides;
  DType flow_dtype;
  const void* occ;             // [B, H, W, 1] or nullptr (ones)
  PixelStrides occ_strides;
};

// out: contiguous [B, H, W, C] in dtype.
cudaError_t warp_occlusion_fwd(const WarpInputs& in, void* out, bool residual,
                               cudaStream_t stream);

// Per-pixel backward. Always writes dflow (contiguous [N, 2], flow_dtype; zero where the flow is
// non-finite) and docc (contiguous [N], dtype; written even when occ is nullptr). Then either
//   dh_accum != nullptr: fp32 atomics add occ*w_k*dout into dh_accum (contiguous [N, C], which
//                        the caller initialised to dout or zeros), or
//   plan_key/plan_wt != nullptr: writes each pixel's footprint key ([N]; B*(H+1)*(W+1) when no
//                        tap is inside the image or the flow is non-finite; see
//                        kernels/flow_warp/plan.py) and its 4 tap weights occ*w_k ([4N]), for
//                        warp_occlusion_gather after a stable sort of the keys.
cudaError_t warp_occlusion_bwd(const WarpInputs& in, const void* dout, PixelStrides dout_strides,
                               float* dh_accum, void* dflow, void* docc, int32_t* plan_key,
                               float* plan_wt, cudaStream_t stream);

// Deterministic dh (contiguous [N, C], dtype): for each source pixel s = (b, y, x) and tap
// k = (dy, dx) in order 00, 01, 10, 11, with f = (b*(H+1) + y + 1 - dy)*(W+1) + x + 1 - dx,
//   dh[s] = (dout[s] if residual) + sum over k, then j in [row_ptr[f], row_ptr[f+1]) in
//           increasing j, of plan_wt[4q + k] * dout[q],  q = order[j].
cudaError_t warp_occlusion_gather(WarpShape shape, DType dtype, const void* dout,
                                  PixelStrides dout_strides, const int64_t* order,
                                  const float* plan_wt, const int64_t* row_ptr, void* dh,
                                  bool residual, cudaStream_t stream);

}  // namespace avatar
