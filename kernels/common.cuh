// Helpers shared by kernels/*.cu: data type conversion, 16-byte packs, grid sizing, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "pgnas_kernels.h"
#include "philox.h"

namespace pgnas {
namespace cuda {

constexpr int kThreads = 256;

// Widen to the math type A and narrow back.
template <typename A, typename T>
__device__ __forceinline__ A widen(T v) {
  return static_cast<A>(v);
}
template <>
__device__ __forceinline__ float widen<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ double widen<double, __half>(__half v) {
  return static_cast<double>(__half2float(v));
}
template <>
__device__ __forceinline__ float widen<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ double widen<double, __nv_bfloat16>(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

template <typename T, typename A>
__device__ __forceinline__ T narrow(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half narrow<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __half narrow<__half, double>(double v) {
  return __double2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16, double>(double v) {
  return __double2bfloat16(v);
}

// Element i of a buffer of the gate dtype chosen at run time (float32, or float64 when is_double), as
// double: the whole-network kernels' drop logits, log alphas, gradient scalars, results and gradients.
__device__ __forceinline__ double load_gate(const void* p, int is_double, int64_t i) {
  return is_double ? static_cast<const double*>(p)[i] : static_cast<double>(static_cast<const float*>(p)[i]);
}
__device__ __forceinline__ void store_gate(void* p, int is_double, int64_t i, double v) {
  if (is_double) {
    static_cast<double*>(p)[i] = v;
  } else {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// Math type: float, or double when the data or the gates are double (the reference's promotion).
template <typename T, typename G>
struct AccOf {
  using type = float;
};
template <typename G>
struct AccOf<double, G> {
  using type = double;
};
template <typename T>
struct AccOf<T, double> {
  using type = double;
};
template <>
struct AccOf<double, double> {
  using type = double;
};

// 16 bytes of T, for vectorised loads and stores.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__host__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Blocks for a grid-stride loop over n items: enough to fill every multiprocessor a few times over,
// no more (the loop covers the rest).
inline int grid_for(int64_t n, int threads = kThreads) {
  static int sms[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  int& count = sms[device & 63];
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) count = 1;
  }
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(count) * 8;
  const int64_t blocks = wanted < cap ? wanted : cap;
  return static_cast<int>(blocks > 0 ? blocks : 1);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (every thread passes its value; thread 0 gets the total).
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
  __shared__ A partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < warps) ? partial[lane] : A(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();
  return v;
}

// NHWC reductions over each (b, c)'s positions: threads run over channels (coalesced loads); a block
// item is (example, channel tile, slice of the positions), with enough slices to fill the device.
// Partial sums of the slices of one (b, c) meet through atomics.
struct ChannelsLastGrid {
  int threads;
  int64_t slices;
  int blocks;
};

inline ChannelsLastGrid channels_last_grid(int64_t batch, int64_t channels, int64_t spatial) {
  ChannelsLastGrid g;
  g.threads = channels >= 128 ? 128 : 32;
  const int64_t tiles = batch * ((channels + g.threads - 1) / g.threads);
  const int64_t target = static_cast<int64_t>(grid_for(INT64_MAX / 2)) * 4;  // blocks that fill the device
  g.slices = (target + tiles - 1) / tiles;
  if (g.slices > spatial) g.slices = spatial;
  if (g.slices < 1) g.slices = 1;
  const int64_t items = tiles * g.slices;
  g.blocks = static_cast<int>(items < target ? items : target);
  return g;
}

struct ChannelsLastItem {
  int64_t b, c, s_begin, s_end;  // this thread's channel c of example b, positions [s_begin, s_end)
};

__device__ __forceinline__ int64_t channels_last_items(int64_t batch, int64_t channels, int64_t slices) {
  return batch * ((channels + blockDim.x - 1) / blockDim.x) * slices;
}

__device__ __forceinline__ ChannelsLastItem channels_last_item(int64_t item, int64_t channels, int64_t spatial,
                                                               int64_t slices) {
  const int64_t channel_tiles = (channels + blockDim.x - 1) / blockDim.x;
  const int64_t per_slice = (spatial + slices - 1) / slices;
  const int64_t slice = item % slices;
  ChannelsLastItem it;
  it.b = item / (slices * channel_tiles);
  it.c = ((item / slices) % channel_tiles) * blockDim.x + threadIdx.x;
  it.s_begin = slice * per_slice;
  it.s_end = (slice + 1) * per_slice < spatial ? (slice + 1) * per_slice : spatial;
  return it;
}

inline cudaError_t last_error() { return cudaGetLastError(); }

}  // namespace cuda
}  // namespace pgnas

// Calls F<T>(args...) for the data type `dtype`; returns cudaErrorInvalidValue for an unknown code.
#define PGNAS_DISPATCH_DATA(dtype, CALL)       \
  switch (dtype) {                             \
    case PGNAS_F32: {                          \
      using data_t = float;                    \
      CALL;                                    \
    } break;                                   \
    case PGNAS_F64: {                          \
      using data_t = double;                   \
      CALL;                                    \
    } break;                                   \
    case PGNAS_F16: {                          \
      using data_t = __half;                   \
      CALL;                                    \
    } break;                                   \
    case PGNAS_BF16: {                         \
      using data_t = __nv_bfloat16;            \
      CALL;                                    \
    } break;                                   \
    default:                                   \
      return cudaErrorInvalidValue;            \
  }

#define PGNAS_DISPATCH_GATE(dtype, CALL) \
  switch (dtype) {                       \
    case PGNAS_F32: {                    \
      using gate_t = float;              \
      CALL;                              \
    } break;                             \
    case PGNAS_F64: {                    \
      using gate_t = double;             \
      CALL;                              \
    } break;                             \
    default:                             \
      return cudaErrorInvalidValue;      \
  }
