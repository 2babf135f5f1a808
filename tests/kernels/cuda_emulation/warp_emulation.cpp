// CPU emulation of the CUDA warp kernels (csrc/warp_occlusion_kernels.cuh), for machines without
// a GPU. The kernels are compiled unchanged by the host compiler; this file supplies the CUDA
// built-ins they use (threadIdx, blockIdx, __shfl_xor_sync, atomicAdd on float and float4) and
// runs every launch as 32 std::threads, one per lane, each walking the same sequence of
// (block, warp) pairs so that the shuffles, emulated with a barrier, line up as on a real warp.
// AVATAR_VECTOR_ATOMICS is set, so the sm_90 float4-atomic path is the one emulated. What this
// cannot show: races between real warps, memory alignment faults, and anything about speed.
//
// Built by tests/kernels/test_warp.py with g++ -std=c++20 and driven through ctypes.
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#define __launch_bounds__(...)
#define AVATAR_VECTOR_ATOMICS 1

struct EmuIndex {
  unsigned x = 0, y = 0, z = 0;
};
thread_local EmuIndex threadIdx;
thread_local EmuIndex blockIdx;

namespace emu {
std::barrier<>* warp_barrier = nullptr;
float exchange[32];
}  // namespace emu

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  emu::exchange[threadIdx.x] = value;
  emu::warp_barrier->arrive_and_wait();
  const float other = emu::exchange[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
  emu::warp_barrier->arrive_and_wait();
  return other;
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

// sm_90's vector atomic: atomic per component (which is all the CUDA one guarantees either).
inline float4 atomicAdd(float4* address, float4 value) {
  float* f = reinterpret_cast<float*>(address);
  return make_float4(atomicAdd(f, value.x), atomicAdd(f + 1, value.y), atomicAdd(f + 2, value.z),
                     atomicAdd(f + 3, value.w));
}

using std::isfinite;

#include "warp_occlusion_kernels.cuh"

namespace {

using namespace avatar;
using namespace avatar::warp_detail;

// Runs body() for every thread of a launch of block_count(...) blocks of (32, kWarpsPerBlock),
// the launchers' grid at `lanes` lanes per pixel.
template <typename Body>
void emulate(const WarpShape& shape, int lanes, Body body) {
  const int64_t blocks = block_count(pixel_count(shape), lanes);
  std::barrier<> barrier(kWarpSize);
  emu::warp_barrier = &barrier;
  std::vector<std::thread> threads;
  for (unsigned lane = 0; lane < kWarpSize; ++lane) {
    threads.emplace_back([&, lane] {
      threadIdx.x = lane;
      for (int64_t b = 0; b < blocks; ++b) {
        blockIdx.x = static_cast<unsigned>(b);
        for (unsigned w = 0; w < kWarpsPerBlock; ++w) {
          threadIdx.y = w;
          body();
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  emu::warp_barrier = nullptr;
}

WarpShape shape_of(const int64_t* s) { return {s[0], s[1], s[2], s[3]}; }
PixelStrides pixel_strides(const int64_t* s) { return {s[0], s[1], s[2]}; }
PixelStrides contiguous(const WarpShape& s) {
  return {s.height * s.width * s.channels, s.width * s.channels, s.channels};
}

}  // namespace

extern "C" {

int emu_lanes_per_pixel(int64_t channels, int vec) { return lanes_per_pixel(channels, vec); }

// Returns the vector width used (1 or 16 / sizeof(T)), or -1 for an unsupported dtype pair.
int emu_warp_fwd(int dtype, int flow_dtype, const int64_t* shape, const void* h,
                 const int64_t* h_strides, const void* flow, const int64_t* flow_strides,
                 const void* occ, const int64_t* occ_strides, void* out, int residual,
                 int allow_vec) {
  const WarpShape s = shape_of(shape);
  int used = -1;
  dispatch(static_cast<DType>(dtype), static_cast<DType>(flow_dtype), [&](auto tag, auto ftag) {
    using T = typename decltype(tag)::type;
    using TF = typename decltype(ftag)::type;
    FwdParams<T, TF> p{s, static_cast<const T*>(h), pixel_strides(h_strides),
                       static_cast<const TF*>(flow),
                       {flow_strides[0], flow_strides[1], flow_strides[2], flow_strides[3]},
                       static_cast<const T*>(occ), pixel_strides(occ_strides),
                       static_cast<T*>(out), residual != 0, 1};
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    if (allow_vec && can_vectorize<T>(s.channels, {h, out}, {p.hs, contiguous(s)})) {
      p.lanes = lanes_per_pixel(s.channels, kVec);
      emulate(s, p.lanes, [&] { warp_occlusion_fwd_kernel<T, TF, kVec>(p); });
      used = kVec;
    } else {
      p.lanes = lanes_per_pixel(s.channels, 1);
      emulate(s, p.lanes, [&] { warp_occlusion_fwd_kernel<T, TF, 1>(p); });
      used = 1;
    }
    return cudaSuccess;
  });
  return used;
}

int emu_warp_bwd(int dtype, int flow_dtype, const int64_t* shape, const void* dout,
                 const int64_t* dout_strides, const void* h, const int64_t* h_strides,
                 const void* flow, const int64_t* flow_strides, const void* occ,
                 const int64_t* occ_strides, float* dh_accum, void* dflow, void* docc,
                 int32_t* plan_key, float* plan_wt, int allow_vec) {
  const WarpShape s = shape_of(shape);
  int used = -1;
  dispatch(static_cast<DType>(dtype), static_cast<DType>(flow_dtype), [&](auto tag, auto ftag) {
    using T = typename decltype(tag)::type;
    using TF = typename decltype(ftag)::type;
    BwdParams<T, TF> p{s, static_cast<const T*>(dout), pixel_strides(dout_strides),
                       static_cast<const T*>(h), pixel_strides(h_strides),
                       static_cast<const TF*>(flow),
                       {flow_strides[0], flow_strides[1], flow_strides[2], flow_strides[3]},
                       static_cast<const T*>(occ), pixel_strides(occ_strides), dh_accum,
                       static_cast<TF*>(dflow), static_cast<T*>(docc), plan_key, plan_wt, 1};
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    if (allow_vec && can_vectorize<T>(s.channels, {h, dout}, {p.hs, p.ds})) {
      p.lanes = lanes_per_pixel(s.channels, kVec);
      emulate(s, p.lanes, [&] { warp_occlusion_bwd_kernel<T, TF, kVec>(p); });
      used = kVec;
    } else {
      p.lanes = lanes_per_pixel(s.channels, 1);
      emulate(s, p.lanes, [&] { warp_occlusion_bwd_kernel<T, TF, 1>(p); });
      used = 1;
    }
    return cudaSuccess;
  });
  return used;
}

int emu_warp_gather(int dtype, const int64_t* shape, const void* dout,
                    const int64_t* dout_strides, const int64_t* order, const float* plan_wt,
                    const int64_t* row_ptr, void* dh, int residual, int allow_vec) {
  const WarpShape s = shape_of(shape);
  int used = -1;
  dispatch(static_cast<DType>(dtype), DType::kFloat32, [&](auto tag, auto) {
    using T = typename decltype(tag)::type;
    GatherParams<T> p{s, static_cast<const T*>(dout), pixel_strides(dout_strides), order,
                      plan_wt, row_ptr, static_cast<T*>(dh), residual != 0, 1};
    constexpr int kVec = static_cast<int>(16 / sizeof(T));
    if (allow_vec && can_vectorize<T>(s.channels, {dout, dh}, {p.ds, contiguous(s)})) {
      p.lanes = lanes_per_pixel(s.channels, kVec);
      emulate(s, p.lanes, [&] { warp_occlusion_gather_kernel<T, kVec>(p); });
      used = kVec;
    } else {
      p.lanes = lanes_per_pixel(s.channels, 1);
      emulate(s, p.lanes, [&] { warp_occlusion_gather_kernel<T, 1>(p); });
      used = 1;
    }
    return cudaSuccess;
  });
  return used;
}

}  // extern "C"
