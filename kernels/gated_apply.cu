// gated apply: out = x * keep[b, c] and its backward (design.md "The op set": gated apply).
// keep [B, C] comes from pgnas_gate_keep (regenerated in backward, never stored beyond [B, C]).
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

// Gate of flat element e (the first of a pack when vectorised: a pack never straddles gates).
__device__ __forceinline__ int64_t gate_index(int64_t e, int64_t channels, int64_t spatial, int layout) {
  if (layout == PGNAS_NCHW) return e / spatial;
  return (e / (spatial * channels)) * channels + e % channels;
}

// out = x * keep, one thread per element (scale-only: also grad_x = grad * keep).
template <typename T, typename G>
__global__ void apply_scalar(T* __restrict__ out, const T* __restrict__ x, const G* __restrict__ keep, int64_t n,
                             int64_t channels, int64_t spatial, int layout) {
  using A = typename AccOf<T, G>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = narrow<T>(widen<A>(x[e]) * static_cast<A>(keep[gate_index(e, channels, spatial, layout)]));
}

// The same with 16-byte packs: NCHW with S a multiple of the pack size (a pack shares one gate), or
// NHWC with C a multiple of it (a pack covers consecutive channels of one example).
template <typename T, typename G>
__global__ void apply_packed(T* __restrict__ out, const T* __restrict__ x, const G* __restrict__ keep, int64_t n,
                             int64_t channels, int64_t spatial, int layout) {
  using A = typename AccOf<T, G>::type;
  constexpr int V = Pack<T>::kSize;
  const int64_t packs = n / V;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < packs;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = q * V;
    const Pack<T> in = reinterpret_cast<const Pack<T>*>(x)[q];
    Pack<T> res;
    const int64_t g = gate_index(e, channels, spatial, layout);
    if (layout == PGNAS_NCHW) {
      const A k = static_cast<A>(keep[g]);
#pragma unroll
      for (int v = 0; v < V; ++v) res.v[v] = narrow<T>(widen<A>(in.v[v]) * k);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) res.v[v] = narrow<T>(widen<A>(in.v[v]) * static_cast<A>(keep[g + v]));
    }
    reinterpret_cast<Pack<T>*>(out)[q] = res;
  }
}

// NCHW backward: one warp per (b, c) row: grad_x = grad * keep and grad_keep = sum_s grad * x.
template <typename T, typename G>
__global__ void backward_rows(T* __restrict__ grad_x, G* __restrict__ grad_keep, const T* __restrict__ grad,
                              const T* __restrict__ x, const G* __restrict__ keep, int64_t rows, int64_t spatial,
                              bool packed) {
  using A = typename AccOf<T, G>::type;
  constexpr int V = Pack<T>::kSize;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const A k = static_cast<A>(keep[r]);
    const int64_t base = r * spatial;
    A dot = 0;
    if (packed) {
      const Pack<T>* g4 = reinterpret_cast<const Pack<T>*>(grad + base);
      const Pack<T>* x4 = reinterpret_cast<const Pack<T>*>(x + base);
      Pack<T>* o4 = reinterpret_cast<Pack<T>*>(grad_x + base);
      for (int64_t q = lane; q < spatial / V; q += 32) {
        const Pack<T> g = g4[q], xv = x4[q];
        Pack<T> o;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const A gv = widen<A>(g.v[v]);
          o.v[v] = narrow<T>(gv * k);
          dot += gv * widen<A>(xv.v[v]);
        }
        o4[q] = o;
      }
    } else {
      for (int64_t s = lane; s < spatial; s += 32) {
        const A gv = widen<A>(grad[base + s]);
        grad_x[base + s] = narrow<T>(gv * k);
        dot += gv * widen<A>(x[base + s]);
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_keep[r] = static_cast<G>(dot);
  }
}

// NHWC backward: threads over channels (coalesced), each summing a slice of the positions of one
// example; partial sums meet in grad_keep (zeroed by the launcher) through atomics.
template <typename T, typename G>
__global__ void backward_channels_last(T* __restrict__ grad_x, G* __restrict__ grad_keep, const T* __restrict__ grad,
                                       const T* __restrict__ x, const G* __restrict__ keep, int64_t batch,
                                       int64_t channels, int64_t spatial, int64_t slices) {
  using A = typename AccOf<T, G>::type;
  for (int64_t item = blockIdx.x; item < channels_last_items(batch, channels, slices); item += gridDim.x) {
    const ChannelsLastItem it = channels_last_item(item, channels, spatial, slices);
    const int64_t b = it.b, c = it.c;
    if (c >= channels) continue;
    const A k = static_cast<A>(keep[b * channels + c]);
    A dot = 0;
    for (int64_t s = it.s_begin; s < it.s_end; ++s) {
      const int64_t e = (b * spatial + s) * channels + c;
      const A gv = widen<A>(grad[e]);
      grad_x[e] = narrow<T>(gv * k);
      dot += gv * widen<A>(x[e]);
    }
    atomicAdd(grad_keep + b * channels + c, static_cast<G>(dot));
  }
}

template <typename T, typename G>
cudaError_t launch_apply(T* out, const T* x, const G* keep, int64_t batch, int64_t channels, int64_t spatial,
                         int layout, cudaStream_t cs) {
  const int64_t n = batch * channels * spatial;
  constexpr int V = Pack<T>::kSize;
  const bool packed = aligned16(out) && aligned16(x) && (layout == PGNAS_NCHW ? spatial % V == 0 : channels % V == 0);
  if (packed) {
    apply_packed<T, G><<<grid_for(n / V), kThreads, 0, cs>>>(out, x, keep, n, channels, spatial, layout);
  } else {
    apply_scalar<T, G><<<grid_for(n), kThreads, 0, cs>>>(out, x, keep, n, channels, spatial, layout);
  }
  return last_error();
}

template <typename T, typename G>
cudaError_t launch_backward(T* grad_x, G* grad_keep, const T* grad, const T* x, const G* keep, int64_t batch,
                            int64_t channels, int64_t spatial, int layout, cudaStream_t cs) {
  if (grad_keep == nullptr) return launch_apply<T, G>(grad_x, grad, keep, batch, channels, spatial, layout, cs);
  if (layout == PGNAS_NCHW) {
    constexpr int V = Pack<T>::kSize;
    const bool packed = aligned16(grad_x) && aligned16(grad) && aligned16(x) && spatial % V == 0;
    const int64_t rows = batch * channels;
    backward_rows<T, G><<<grid_for(rows * 32), kThreads, 0, cs>>>(grad_x, grad_keep, grad, x, keep, rows, spatial,
                                                                  packed);
    return last_error();
  }
  cudaError_t err = cudaMemsetAsync(grad_keep, 0, sizeof(G) * batch * channels, cs);
  if (err != cudaSuccess) return err;
  const ChannelsLastGrid g = channels_last_grid(batch, channels, spatial);
  backward_channels_last<T, G><<<g.blocks, g.threads, 0, cs>>>(
      grad_x, grad_keep, grad, x, keep, batch, channels, spatial, g.slices);
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
