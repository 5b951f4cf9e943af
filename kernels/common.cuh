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

// Multiprocessors of the current device (cached per device).
inline int multiprocessors() {
  static int sms[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  int& count = sms[device & 63];
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count <= 0) count = 1;
  }
  return count;
}

// Blocks for a grid-stride loop over n items: enough to fill every multiprocessor a few times over,
// no more (the loop covers the rest).
inline int grid_for(int64_t n, int threads = kThreads) {
  const int64_t wanted = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(multiprocessors()) * 8;
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

// W consecutive T moved as one access (16 bytes for W = Pack<T>::kSize; W = 1: plain scalars).
template <typename T, int W>
struct alignas(sizeof(T) * W) Vec {
  T v[W];
};

// Blocks of `threads` for a grid-stride loop over `items` (one per thread per pass): at most as many
// as are resident at once (Kernel's registers and shared memory decide how many fit a multiprocessor),
// so the loop runs in one wave and every thread gets the same share (no half-empty second wave).
template <auto Kernel>
inline int resident_grid(int64_t items, int threads = kThreads) {
  static int fits[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  int& fit = fits[device & 63];
  if (fit == 0) {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads, 0) != cudaSuccess || blocks < 1) {
      cudaGetLastError();  // not the launch's error
      blocks = 1;
    }
    fit = blocks;
  }
  const int64_t wanted = (items + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(multiprocessors()) * fit;
  const int64_t blocks = wanted < cap ? wanted : cap;
  return static_cast<int>(blocks > 0 ? blocks : 1);
}

// Where flat element e of a dense [B, C, S] (NCHW) or [B, S, C] (NHWC) tensor sits: gate g = b * C + c,
// channel c, position s. Built once per thread (a few divisions), then moved by one element or by a
// fixed stride with carries only: a 64-bit division per element costs more than the bytes it indexes.
template <bool kNhwc>
struct Where {
  int64_t g, c, s;

  __host__ __device__ __forceinline__ static Where at(int64_t e, int64_t channels, int64_t spatial) {
    Where w;
    if constexpr (kNhwc) {
      const int64_t m = e / channels, b = m / spatial;
      w.c = e - m * channels;
      w.s = m - b * spatial;
      w.g = b * channels + w.c;
    } else {
      w.g = e / spatial;
      w.s = e - w.g * spatial;
      w.c = w.g % channels;
    }
    return w;
  }

  __host__ __device__ __forceinline__ void next(int64_t channels, int64_t spatial) {
    if constexpr (kNhwc) {
      ++g;
      if (++c == channels) {
        c = 0;
        g -= channels;
        if (++s == spatial) {
          s = 0;
          g += channels;
        }
      }
    } else if (++s == spatial) {
      s = 0;
      ++g;
      if (++c == channels) c = 0;
    }
  }

  // Moves on by the element count `step` was built from (step.c < C, step.s < S: one carry each).
  __host__ __device__ __forceinline__ void advance(const Where& step, int64_t channels, int64_t spatial) {
    if constexpr (kNhwc) {
      c += step.c;
      g += step.g;
      if (c >= channels) {
        c -= channels;
        g -= channels;
        ++s;
      }
      s += step.s;
      if (s >= spatial) {
        s -= spatial;
        g += channels;
      }
    } else {
      s += step.s;
      g += step.g;
      c += step.c;
      if (s >= spatial) {
        s -= spatial;
        ++g;
        ++c;
      }
      if (c >= channels) c -= channels;
    }
  }
};

// Elementwise kernels over a dense [B, C, S] / [B, S, C] tensor x of n elements, in accesses of V
// elements (16-byte packs when every pointer allows, else V = 1), U accesses in flight per thread.
// Op: kNhwc, Data (T), member x, and apply<W>(e, in, where, channels, spatial) computing and storing
// elements e..e+W-1 from their inputs `in` (where: element e's place). A pack may straddle rows or
// examples: apply walks `where` element by element. The n % V last elements go one by one.
template <int V, int U, typename Op>
__global__ void __launch_bounds__(kThreads) walk(const Op op, int64_t n, int64_t channels, int64_t spatial) {
  using T = typename Op::Data;
  using W = Where<Op::kNhwc>;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t packs = n / V;
  W where = W::at(first * V, channels, spatial);
  const W step = W::at(threads * V, channels, spatial);
  for (int64_t q = first; q < packs; q += U * threads) {
    Vec<T, V> in[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (q + u * threads < packs) in[u] = reinterpret_cast<const Vec<T, V>*>(op.x)[q + u * threads];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (q + u * threads < packs) {
        op.template apply<V>((q + u * threads) * V, in[u], where, channels, spatial);
        where.advance(step, channels, spatial);
      }
    }
  }
  if (V > 1 && first < n - packs * V) {
    const int64_t e = packs * V + first;
    const Vec<T, 1> in = {op.x[e]};
    op.template apply<1>(e, in, W::at(e, channels, spatial), channels, spatial);
  }
}

// Runs walk over op's tensor: 16-byte packs when `packed` (the caller checked every pointer).
template <typename Op>
cudaError_t launch_walk(const Op& op, int64_t n, int64_t channels, int64_t spatial, bool packed, cudaStream_t cs) {
  using T = typename Op::Data;
  if (packed) {
    constexpr int V = Pack<T>::kSize, U = 2;
    constexpr auto kernel = walk<V, U, Op>;
    kernel<<<resident_grid<kernel>((n / V + U - 1) / U), kThreads, 0, cs>>>(op, n, channels, spatial);
  } else {
    constexpr int U = 4;
    constexpr auto kernel = walk<1, U, Op>;
    kernel<<<resident_grid<kernel>((n + U - 1) / U), kThreads, 0, cs>>>(op, n, channels, spatial);
  }
  return cudaGetLastError();
}

// Sums v[0..N) over the threads of the block that share threadIdx.x % lanes (lanes: a power of two),
// in a fixed order, so bit-reproducible run to run (no atomics): butterfly shuffles inside each warp,
// then the warps' (lanes < 32) or position groups' (lanes >= 32) partials in index order. The totals
// land in v of threads threadIdx.x < lanes. Every thread of the block calls; scratch holds N * blockDim.x.
template <int N, typename A>
__device__ __forceinline__ void group_sum(A (&v)[N], int lanes, A* scratch) {
  for (int offset = lanes; offset < 32; offset <<= 1) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
  }
  __syncthreads();  // the previous call's readers are done with scratch
#pragma unroll
  for (int j = 0; j < N; ++j) scratch[j * blockDim.x + threadIdx.x] = v[j];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < lanes) {
    const int stride = lanes < 32 ? 32 : lanes;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A total = 0;
      for (int i = threadIdx.x; i < static_cast<int>(blockDim.x); i += stride) total += scratch[j * blockDim.x + i];
      v[j] = total;
    }
  }
}

// NHWC reductions over each (b, c)'s positions: a block item is (example, tile of `lanes` channel packs),
// all its positions; `lanes` threads run across a position's packs (coalesced runs of >= 64 bytes),
// kThreads / lanes position groups run down the positions. Few positions: more lanes, so that each
// thread still has >= 4 positions to sum.
inline int channels_last_lanes(int64_t packs, int64_t spatial, int pack_bytes) {
  int lanes = 4;
  while (lanes * pack_bytes < 64) lanes *= 2;
  while (lanes < kThreads && lanes < packs && spatial * lanes < 4 * kThreads) lanes *= 2;
  return lanes;
}

inline int channels_last_blocks(int64_t items) { return static_cast<int>(items < (1 << 20) ? items : (1 << 20)); }

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
