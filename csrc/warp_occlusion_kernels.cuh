// Device code of the flow-warp kernels: element access, the bilinear taps and the three kernels.
// Included by warp_occlusion.cu (the launchers) and, with a small host shim, by the CPU emulation
// test (tests/kernels/cuda_emulation/), which runs these exact kernels thread by thread without a
// GPU. Keep it free of host-launch syntax.
//
// A group of `lanes` lanes (a power of two <= 32, chosen by lanes_per_pixel from C) per pixel, so a
// warp serves 32 / lanes pixels: the lanes stride over the pixel's C channels, VEC contiguous
// channels per lane (16-byte loads when C, the strides and the pointers allow it, scalar loads
// otherwise). Small C no longer leaves most of a warp idle (C = 64 bf16: 8 lanes, 4 pixels per
// warp; C = 320 bf16: 8 lanes, 5 full passes instead of 2 passes at 62% occupancy). The
// per-pixel reductions of the backward (dflow, docc) are a lane-local sum followed by a butterfly
// shuffle within the group: a fixed order, so they are reproducible. The coordinate math, tap
// order and weights are those of kernels/flow_warp/triton_impl.py, line for line.
//
// dh scatter (default backward): fp32 atomics whose lanes cover consecutive channels. With
// vector access on sm_90 each lane issues float4 atomicAdds (AVATAR_VECTOR_ATOMICS), so a
// warp-wide atomic covers 16 contiguous bytes per lane; elsewhere the launcher runs the atomic
// backward with scalar access, so each warp-wide scalar atomic covers 32 consecutive floats
// (VEC consecutive scalar atomics per lane would touch addresses VEC floats apart).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

#include "warp_occlusion.h"

namespace avatar {
namespace warp_detail {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;  // blockDim = (32, 8): warp threadIdx.y serves 32 / lanes pixels

// float4 atomicAdd exists on sm_90 and newer (global memory). The CPU emulation defines the
// macro itself to run the vector path.
#ifndef AVATAR_VECTOR_ATOMICS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define AVATAR_VECTOR_ATOMICS 1
#else
#define AVATAR_VECTOR_ATOMICS 0
#endif
#endif

// ---------------------------------------------------------------------------------------------
// element conversion and vector access

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC values at ptr as fp32, or zeros when pred is false (ptr is then never dereferenced).
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* ptr, bool pred, float (&dst)[VEC]) {
  if (pred) {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = to_f32(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = 0.0f;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* ptr, const float (&src)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_f32<T>(src[i]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

// Sum over the `lanes` lanes of one pixel's group (aligned, power of two): every lane of the warp
// must call it, with the same `lanes`.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// dst[i] += w * d[i] for i < VEC with fp32 atomics: float4 atomics where available.
template <int VEC>
__device__ __forceinline__ void scatter_add(float* dst, float w, const float (&d)[VEC]) {
  constexpr bool kFloat4 = AVATAR_VECTOR_ATOMICS && VEC % 4 == 0;
  if constexpr (kFloat4) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i),
                make_float4(w * d[i], w * d[i + 1], w * d[i + 2], w * d[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, w * d[i]);
  }
}

// The pixel this thread's lane group serves and the lane's index within the group.
struct LaneSlot {
  int64_t pix;
  int64_t lane;
};

__device__ __forceinline__ LaneSlot lane_slot(int lanes) {
  const int64_t pixels_per_warp = kWarpSize / lanes;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  return {warp * pixels_per_warp + threadIdx.x / static_cast<unsigned>(lanes),
          static_cast<int64_t>(threadIdx.x % static_cast<unsigned>(lanes))};
}

// ---------------------------------------------------------------------------------------------
// the bilinear taps of one output pixel (mirror of _bilinear_taps in triton_impl.py)

struct Pixel {
  int64_t b, y, x;
};

// 32-bit division (the bindings guarantee B*H*W < 2**31): no 64-bit division subroutine.
__device__ __forceinline__ Pixel split_pixel(int64_t pix, const WarpShape& s) {
  const uint32_t hw = static_cast<uint32_t>(s.height * s.width);
  const uint32_t width = static_cast<uint32_t>(s.width);
  const uint32_t q = static_cast<uint32_t>(pix);
  const uint32_t b = q / hw;
  const uint32_t rem = q - b * hw;
  const uint32_t y = rem / width;
  return {static_cast<int64_t>(b), static_cast<int64_t>(y), static_cast<int64_t>(rem - y * width)};
}

__device__ __forceinline__ int64_t pixel_offset(const Pixel& p, const PixelStrides& st) {
  return p.b * st.b + p.y * st.y + p.x * st.x;
}

struct Taps {
  bool valid;         // finite displacement
  float fx, fy;       // fractional parts of the sampling coordinate
  int64_t t00;        // flat source pixel of tap 00, (b*H + y0)*W + x0 (garbage when outside)
  int64_t off00;      // element offset of tap 00 in h
  int64_t corner;     // footprint key of the deterministic plan (plan.py), if any tap is inside
  bool m[4];          // tap k = (00, 01, 10, 11) lies inside the image (and valid)
};

template <typename TF>
__device__ __forceinline__ Taps bilinear_taps(const TF* flow, const FlowStrides& fs,
                                              const Pixel& p, const WarpShape& s,
                                              const PixelStrides& hs) {
  const TF* f = flow + p.b * fs.b + p.y * fs.y + p.x * fs.x;
  float sx = static_cast<float>(p.x) + to_f32(f[0]);
  float sy = static_cast<float>(p.y) + to_f32(f[fs.c]);
  Taps t;
  t.valid = isfinite(sx) && isfinite(sy);
  // Far-away coordinates are clamped to just outside the image: every tap stays outside, so
  // nothing changes, and the int conversion below cannot overflow.
  sx = fminf(fmaxf(t.valid ? sx : 0.0f, -2.0f), static_cast<float>(s.width) + 1.0f);
  sy = fminf(fmaxf(t.valid ? sy : 0.0f, -2.0f), static_cast<float>(s.height) + 1.0f);
  const float x0f = floorf(sx);
  const float y0f = floorf(sy);
  t.fx = sx - x0f;
  t.fy = sy - y0f;
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const bool in_x0 = x0 >= 0 && x0 < s.width;
  const bool in_x1 = x0 + 1 >= 0 && x0 + 1 < s.width;
  const bool in_y0 = t.valid && y0 >= 0 && y0 < s.height;
  const bool in_y1 = t.valid && y0 + 1 >= 0 && y0 + 1 < s.height;
  t.m[0] = in_y0 && in_x0;
  t.m[1] = in_y0 && in_x1;
  t.m[2] = in_y1 && in_x0;
  t.m[3] = in_y1 && in_x1;
  t.t00 = (p.b * s.height + y0) * s.width + x0;
  t.corner = (p.b * (s.height + 1) + y0 + 1) * (s.width + 1) + x0 + 1;
  t.off00 = p.b * hs.b + y0 * hs.y + x0 * hs.x;
  return t;
}

// ---------------------------------------------------------------------------------------------
// kernels

template <typename T, typename TF>
struct FwdParams {
  WarpShape shape;
  const T* h;
  PixelStrides hs;
  const TF* flow;
  FlowStrides fs;
  const T* occ;  // nullptr: ones
  PixelStrides os;
  T* out;        // contiguous
  bool residual;
  int lanes;     // lanes per pixel (lanes_per_pixel)
};

template <typename T, typename TF, int VEC>
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
    warp_occlusion_fwd_kernel(FwdParams<T, TF> p) {
  const int64_t n_pix = p.shape.batch * p.shape.height * p.shape.width;
  const LaneSlot slot = lane_slot(p.lanes);
  if (slot.pix >= n_pix) return;  // no shuffles below: lanes may leave independently
  const int64_t pix = slot.pix;
  const int64_t channels = p.shape.channels;
  const Pixel px = split_pixel(pix, p.shape);
  const Taps t = bilinear_taps(p.flow, p.fs, px, p.shape, p.hs);
  const float occ = p.occ != nullptr ? to_f32(p.occ[pixel_offset(px, p.os)]) : 1.0f;
  const float gx = 1.0f - t.fx;
  const float gy = 1.0f - t.fy;
  const float w00 = gx * gy, w01 = t.fx * gy, w10 = gx * t.fy, w11 = t.fx * t.fy;
  const T* tap00 = p.h + t.off00;
  const T* tap01 = tap00 + p.hs.x;
  const T* tap10 = tap00 + p.hs.y;
  const T* tap11 = tap10 + p.hs.x;
  const T* self = p.h + pixel_offset(px, p.hs);
  T* out = p.out + pix * channels;
  for (int64_t c = slot.lane * VEC; c < channels; c += p.lanes * VEC) {
    float v00[VEC], v01[VEC], v10[VEC], v11[VEC], res[VEC];
    load_f32<T, VEC>(tap00 + c, t.m[0], v00);
    load_f32<T, VEC>(tap01 + c, t.m[1], v01);
    load_f32<T, VEC>(tap10 + c, t.m[2], v10);
    load_f32<T, VEC>(tap11 + c, t.m[3], v11);
    load_f32<T, VEC>(self + c, p.residual, res);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float s = w00 * v00[i] + w01 * v01[i] + w10 * v10[i] + w11 * v11[i];
      res[i] = occ * s + res[i];
    }
    store_f32<T, VEC>(out + c, res);
  }
}

template <typename T, typename TF>
struct BwdParams {
  WarpShape shape;
  const T* dout;
  PixelStrides ds;
  const T* h;
  PixelStrides hs;
  const TF* flow;
  FlowStrides fs;
  const T* occ;       // nullptr: ones
  PixelStrides os;
  float* dh_accum;    // contiguous [N, C] or nullptr
  TF* dflow;          // contiguous [N, 2]
  T* docc;            // contiguous [N]
  int32_t* plan_key;  // [N] or nullptr
  float* plan_wt;     // [4N] or nullptr
  int lanes;          // lanes per pixel (lanes_per_pixel)
};

template <typename T, typename TF, int VEC>
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
    warp_occlusion_bwd_kernel(BwdParams<T, TF> p) {
  const int64_t n_pix = p.shape.batch * p.shape.height * p.shape.width;
  const LaneSlot slot = lane_slot(p.lanes);
  // Lanes of a pixel past the end stay (with no channels to visit) for the group shuffles.
  const bool active = slot.pix < n_pix;
  const int64_t pix = active ? slot.pix : 0;
  const int64_t channels = active ? p.shape.channels : 0;
  const int64_t width = p.shape.width;
  const Pixel px = split_pixel(pix, p.shape);
  const Taps t = bilinear_taps(p.flow, p.fs, px, p.shape, p.hs);
  const float occ = p.occ != nullptr ? to_f32(p.occ[pixel_offset(px, p.os)]) : 1.0f;
  const float gx = 1.0f - t.fx;
  const float gy = 1.0f - t.fy;
  const float w00 = gx * gy, w01 = t.fx * gy, w10 = gx * t.fy, w11 = t.fx * t.fy;
  // occlusion-scaled tap weights: the coefficient of dout in each tap's dh contribution
  const float ow[4] = {occ * gx * gy, occ * t.fx * gy, occ * gx * t.fy, occ * t.fx * t.fy};
  const int64_t tgt[4] = {t.t00, t.t00 + 1, t.t00 + width, t.t00 + width + 1};
  const T* tap00 = p.h + t.off00;
  const T* tap01 = tap00 + p.hs.x;
  const T* tap10 = tap00 + p.hs.y;
  const T* tap11 = tap10 + p.hs.x;
  const T* dself = p.dout + pixel_offset(px, p.ds);
  float docc = 0.0f, dsx = 0.0f, dsy = 0.0f;
  for (int64_t c = slot.lane * VEC; c < channels; c += p.lanes * VEC) {
    float d[VEC], v00[VEC], v01[VEC], v10[VEC], v11[VEC];
    load_f32<T, VEC>(dself + c, true, d);
    load_f32<T, VEC>(tap00 + c, t.m[0], v00);
    load_f32<T, VEC>(tap01 + c, t.m[1], v01);
    load_f32<T, VEC>(tap10 + c, t.m[2], v10);
    load_f32<T, VEC>(tap11 + c, t.m[3], v11);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float s = w00 * v00[i] + w01 * v01[i] + w10 * v10[i] + w11 * v11[i];
      const float g = occ * d[i];
      docc += d[i] * s;
      dsx += g * (gy * (v01[i] - v00[i]) + t.fy * (v11[i] - v10[i]));
      dsy += g * (gx * (v10[i] - v00[i]) + t.fx * (v11[i] - v01[i]));
    }
    if (p.dh_accum != nullptr) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (t.m[k]) scatter_add<VEC>(p.dh_accum + tgt[k] * p.shape.channels + c, ow[k], d);
      }
    }
  }
  docc = group_sum(docc, p.lanes);
  dsx = group_sum(dsx, p.lanes);
  dsy = group_sum(dsy, p.lanes);
  if (!active || slot.lane != 0) return;
  p.dflow[2 * pix] = from_f32<TF>(t.valid ? dsx : 0.0f);
  p.dflow[2 * pix + 1] = from_f32<TF>(t.valid ? dsy : 0.0f);
  p.docc[pix] = from_f32<T>(docc);
  if (p.plan_key != nullptr) {
    // one footprint key per pixel (n_keys, which sorts last, when no tap is inside)
    const int64_t n_keys = p.shape.batch * (p.shape.height + 1) * (p.shape.width + 1);
    const bool any_inside = t.m[0] || t.m[1] || t.m[2] || t.m[3];
    p.plan_key[pix] = static_cast<int32_t>(any_inside ? t.corner : n_keys);
#pragma unroll
    for (int k = 0; k < 4; ++k) p.plan_wt[4 * pix + k] = ow[k];
  }
}

template <typename T>
struct GatherParams {
  WarpShape shape;
  const T* dout;
  PixelStrides ds;
  const int64_t* order;    // [N]: pixels grouped by footprint (plan.gather_plan)
  const float* wt;         // [4N]
  const int64_t* row_ptr;  // [B (H+1) (W+1) + 1]
  T* dh;                   // contiguous
  bool residual;
  int lanes;               // lanes per pixel (lanes_per_pixel)
};

// dh[s] = (dout[s] if residual) + for tap k = (dy, dx) in order 00, 01, 10, 11, for each pixel q
// of footprint group (y - dy, x - dx) front to back: wt[4q + k] * dout[q]. Fixed order: bitwise
// reproducible.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
    warp_occlusion_gather_kernel(GatherParams<T> p) {
  const int64_t n_pix = p.shape.batch * p.shape.height * p.shape.width;
  const LaneSlot slot = lane_slot(p.lanes);
  if (slot.pix >= n_pix) return;
  const int64_t src = slot.pix;
  const int64_t channels = p.shape.channels;
  const Pixel px = split_pixel(src, p.shape);
  const T* dself = p.dout + pixel_offset(px, p.ds);
  T* dh = p.dh + src * channels;
  int64_t begin[4], end[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // footprint whose tap (k / 2, k % 2) is this source pixel
    const int64_t group = (px.b * (p.shape.height + 1) + px.y + 1 - k / 2) * (p.shape.width + 1) +
                          px.x + 1 - k % 2;
    begin[k] = p.row_ptr[group];
    end[k] = p.row_ptr[group + 1];
  }
  for (int64_t c = slot.lane * VEC; c < channels; c += p.lanes * VEC) {
    float acc[VEC], d[VEC];
    load_f32<T, VEC>(dself + c, p.residual, acc);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      for (int64_t j = begin[k]; j < end[k]; ++j) {
        const int64_t q = p.order[j];
        const float w = p.wt[4 * q + k];
        load_f32<T, VEC>(p.dout + pixel_offset(split_pixel(q, p.shape), p.ds) + c, true, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += w * d[i];
      }
    }
    store_f32<T, VEC>(dh + c, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// host-side helpers shared by the launchers and the CPU emulation: type dispatch, vector width

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}, Tag<TF>{}) for the (h dtype, flow dtype) pair; flow is h's dtype or fp32.
template <typename Fn>
cudaError_t dispatch(DType dtype, DType flow_dtype, Fn&& fn) {
  const bool flow_f32 = flow_dtype == DType::kFloat32;
  switch (dtype) {
    case DType::kFloat32:
      if (flow_f32) return fn(Tag<float>{}, Tag<float>{});
      break;
    case DType::kFloat16:
      if (flow_f32) return fn(Tag<__half>{}, Tag<float>{});
      if (flow_dtype == DType::kFloat16) return fn(Tag<__half>{}, Tag<__half>{});
      break;
    case DType::kBFloat16:
      if (flow_f32) return fn(Tag<__nv_bfloat16>{}, Tag<float>{});
      if (flow_dtype == DType::kBFloat16) return fn(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// 16-byte vectors when every channel row is 16-byte aligned, else scalar access.
template <typename T>
bool can_vectorize(int64_t channels, std::initializer_list<const void*> ptrs,
                   std::initializer_list<PixelStrides> strides) {
  constexpr int64_t kVec = 16 / sizeof(T);
  if (channels % kVec != 0) return false;
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  }
  for (const PixelStrides& s : strides) {
    if (s.b % kVec != 0 || s.y % kVec != 0 || s.x % kVec != 0) return false;
  }
  return true;
}

inline int64_t pixel_count(const WarpShape& s) { return s.batch * s.height * s.width; }

// Lanes per pixel for C channels read VEC at a time: among 8, 16 and 32 lanes (at least 8, so a
// pass over a row still covers >= 8 * 16 contiguous bytes with vectors) the one that leaves the
// fewest lanes idle in the last pass, the larger on ties; fewer than 8 when the whole row has
// fewer than 8 vectors.
inline int lanes_per_pixel(int64_t channels, int vec) {
  const int64_t vectors = (channels + vec - 1) / vec;
  if (vectors < 8) {
    int lanes = 1;
    while (lanes < vectors) lanes *= 2;
    return lanes;
  }
  int best = kWarpSize;
  int64_t best_idle = (kWarpSize - vectors % kWarpSize) % kWarpSize;
  for (int lanes = kWarpSize / 2; lanes >= 8; lanes /= 2) {
    const int64_t idle = (lanes - vectors % lanes) % lanes;
    if (idle < best_idle) {
      best = lanes;
      best_idle = idle;
    }
  }
  return best;
}

// Blocks of kWarpsPerBlock warps for n_pix pixels at `lanes` lanes per pixel.
inline int64_t block_count(int64_t n_pix, int lanes) {
  const int64_t per_block = kWarpsPerBlock * (kWarpSize / lanes);
  return (n_pix + per_block - 1) / per_block;
}

}  // namespace warp_detail
}  // namespace avatar
