// gated apply: out = x * keep[b, c] and its backward (design.md "The op set": gated apply).
// keep [B, C] comes from pgnas_gate_keep (regenerated in backward, never stored beyond [B, C]).
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

// out = x * keep (scale-only: also grad_x = grad * keep), through common.cuh's walk.
template <typename T, typename G, bool NHWC>
struct ApplyOp {
  static constexpr bool kNhwc = NHWC;
  using Data = T;
  T* out;
  const T* x;
  const G* keep;

  template <int W>
  __device__ __forceinline__ void apply(int64_t e, const Vec<T, W>& in, Where<kNhwc> w, int64_t channels,
                                        int64_t spatial) const {
    using A = typename AccOf<T, G>::type;
    Vec<T, W> res;
    A k = static_cast<A>(keep[w.g]);
#pragma unroll
    for (int v = 0; v < W; ++v) {
      if (v > 0) {
        w.next(channels, spatial);
        if (kNhwc || w.s == 0) k = static_cast<A>(keep[w.g]);  // NCHW: a new gate only on a new row
      }
      res.v[v] = narrow<T>(widen<A>(in.v[v]) * k);
    }
    *reinterpret_cast<Vec<T, W>*>(out + e) = res;
  }
};

// NCHW backward: one warp per (b, c) row: grad_x = grad * keep and grad_keep = sum_s grad * x. Lane l
// sums accesses l, l + 32, ... in order (V elements each; V = 1 unless S is a multiple of the pack),
// then warp_sum; U accesses are loaded before any is used (bytes in flight, same sums).
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads) backward_rows(T* __restrict__ grad_x, G* __restrict__ grad_keep,
                                                          const T* __restrict__ grad, const T* __restrict__ x,
                                                          const G* __restrict__ keep, int64_t rows, int64_t spatial) {
  using A = typename AccOf<T, G>::type;
  constexpr int U = 4;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5), per_row = spatial / V;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const A k = static_cast<A>(keep[r]);
    const Vec<T, V>* g4 = reinterpret_cast<const Vec<T, V>*>(grad + r * spatial);
    const Vec<T, V>* x4 = reinterpret_cast<const Vec<T, V>*>(x + r * spatial);
    Vec<T, V>* o4 = reinterpret_cast<Vec<T, V>*>(grad_x + r * spatial);
    A dot = 0;
    for (int64_t q0 = lane; q0 < per_row; q0 += 32 * U) {
      Vec<T, V> g[U], xv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (q0 + 32 * u < per_row) {
          g[u] = g4[q0 + 32 * u];
          xv[u] = x4[q0 + 32 * u];
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (q0 + 32 * u < per_row) {
          Vec<T, V> o;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const A gv = widen<A>(g[u].v[v]);
            o.v[v] = narrow<T>(gv * k);
            dot += gv * widen<A>(xv[u].v[v]);
          }
          o4[q0 + 32 * u] = o;
        }
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_keep[r] = static_cast<G>(dot);
  }
}

// NHWC backward: a block item is (example b, a tile of `lanes` packs of V channels) over all positions
// (common.cuh channels_last_lanes); each thread sums its channels' positions in order, group_sum adds
// the position groups in a fixed order: deterministic, no atomics.
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads) backward_channels_last(T* __restrict__ grad_x, G* __restrict__ grad_keep,
                                                                   const T* __restrict__ grad, const T* __restrict__ x,
                                                                   const G* __restrict__ keep, int64_t batch,
                                                                   int64_t channels, int64_t spatial, int lanes) {
  using A = typename AccOf<T, G>::type;
  constexpr int U = 4;
  __shared__ A scratch[V * kThreads];
  const int groups = blockDim.x / lanes, group = threadIdx.x / lanes;
  const int64_t tiles = (channels / V + lanes - 1) / lanes;
  for (int64_t item = blockIdx.x; item < batch * tiles; item += gridDim.x) {
    const int64_t b = item / tiles;
    const int64_t c0 = ((item - b * tiles) * lanes + (threadIdx.x & (lanes - 1))) * V;  // this thread's V channels
    const bool live = c0 < channels;
    A k[V], dot[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      k[v] = live ? static_cast<A>(keep[b * channels + c0 + v]) : A(0);
      dot[v] = A(0);
    }
    if (live) {
      const int64_t base = b * spatial * channels + c0;
      for (int64_t s0 = group; s0 < spatial; s0 += static_cast<int64_t>(U) * groups) {
        Vec<T, V> g[U], xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t s = s0 + static_cast<int64_t>(u) * groups;
          if (s < spatial) {
            g[u] = *reinterpret_cast<const Vec<T, V>*>(grad + base + s * channels);
            xv[u] = *reinterpret_cast<const Vec<T, V>*>(x + base + s * channels);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t s = s0 + static_cast<int64_t>(u) * groups;
          if (s < spatial) {
            Vec<T, V> o;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const A gv = widen<A>(g[u].v[v]);
              o.v[v] = narrow<T>(gv * k[v]);
              dot[v] += gv * widen<A>(xv[u].v[v]);
            }
            *reinterpret_cast<Vec<T, V>*>(grad_x + base + s * channels) = o;
          }
        }
      }
    }
    group_sum(dot, lanes, scratch);
    if (live && static_cast<int>(threadIdx.x) < lanes) {
#pragma unroll
      for (int v = 0; v < V; ++v) grad_keep[b * channels + c0 + v] = static_cast<G>(dot[v]);
    }
  }
}

template <typename T, typename G>
cudaError_t launch_apply(T* out, const T* x, const G* keep, int64_t batch, int64_t channels, int64_t spatial,
                         int layout, cudaStream_t cs) {
  const int64_t n = batch * channels * spatial;
  const bool packed = aligned16(out) && aligned16(x);  // packs may straddle rows: any S, any C
  if (layout == PGNAS_NCHW) return launch_walk(ApplyOp<T, G, false>{out, x, keep}, n, channels, spatial, packed, cs);
  return launch_walk(ApplyOp<T, G, true>{out, x, keep}, n, channels, spatial, packed, cs);
}

template <typename T, typename G>
cudaError_t launch_backward(T* grad_x, G* grad_keep, const T* grad, const T* x, const G* keep, int64_t batch,
                            int64_t channels, int64_t spatial, int layout, cudaStream_t cs) {
  if (grad_keep == nullptr) return launch_apply<T, G>(grad_x, grad, keep, batch, channels, spatial, layout, cs);
  constexpr int V = Pack<T>::kSize;
  const bool aligned = aligned16(grad_x) && aligned16(grad) && aligned16(x);
  if (layout == PGNAS_NCHW) {
    const int64_t rows = batch * channels;
    if (aligned && spatial % V == 0) {
      constexpr auto kernel = backward_rows<T, G, V>;
      kernel<<<resident_grid<kernel>(rows * 32), kThreads, 0, cs>>>(grad_x, grad_keep, grad, x, keep, rows, spatial);
    } else {
      constexpr auto kernel = backward_rows<T, G, 1>;
      kernel<<<resident_grid<kernel>(rows * 32), kThreads, 0, cs>>>(grad_x, grad_keep, grad, x, keep, rows, spatial);
    }
    return last_error();
  }
  if (aligned && channels % V == 0) {
    const int lanes = channels_last_lanes(channels / V, spatial, 16);
    const int blocks = channels_last_blocks(batch * ((channels / V + lanes - 1) / lanes));
    backward_channels_last<T, G, V><<<blocks, kThreads, 0, cs>>>(grad_x, grad_keep, grad, x, keep, batch, channels,
                                                                 spatial, lanes);
  } else {
    const int lanes = channels_last_lanes(channels, spatial, static_cast<int>(sizeof(T)));
    const int blocks = channels_last_blocks(batch * ((channels + lanes - 1) / lanes));
    backward_channels_last<T, G, 1><<<blocks, kThreads, 0, cs>>>(grad_x, grad_keep, grad, x, keep, batch, channels,
                                                                 spatial, lanes);
  }
  return last_error();
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_gated_apply(void* out, const void* x, pgnas_dtype data, const void* keep, pgnas_dtype gate,
                                         int64_t batch, int64_t channels, int64_t spatial, pgnas_layout layout,
                                         cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(gate, return (launch_apply<data_t, gate_t>(
                                                          static_cast<data_t*>(out), static_cast<const data_t*>(x),
                                                          static_cast<const gate_t*>(keep), batch, channels, spatial,
                                                          static_cast<int>(layout), cuda_stream))));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_gated_apply_backward(void* grad_x, void* grad_keep, const void* grad, const void* x,
                                                  pgnas_dtype data, const void* keep, pgnas_dtype gate, int64_t batch,
                                                  int64_t channels, int64_t spatial, pgnas_layout layout,
                                                  cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(gate, return (launch_backward<data_t, gate_t>(
                                                          static_cast<data_t*>(grad_x), static_cast<gate_t*>(grad_keep),
                                                          static_cast<const data_t*>(grad),
                                                          static_cast<const data_t*>(x),
                                                          static_cast<const gate_t*>(keep), batch, channels, spatial,
                                                          static_cast<int>(layout), cuda_stream))));
  return cudaSuccess;
}
