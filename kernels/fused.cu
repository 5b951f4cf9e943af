// Fused variants (design.md "The op set"): BN affine -> ReLU -> gate and one input -> K gated copies,
// forward and backward.
//   forward:  out = relu(x * scale[c] + shift[c]) * keep[b, c]
//   backward: with pre = x * scale + shift and live = grad * keep where pre > 0:
//             grad_x = live * scale; per (b, c): row_scale = sum_s live * x, row_shift = sum_s live,
//             grad_keep = sum_s grad * relu(pre) (relaxed only). The caller reduces rows over b.
// keep [B, C] comes from pgnas_gate_keep; scale and shift [C] have the gate dtype.
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

__device__ __forceinline__ int64_t row_of(int64_t e, int64_t channels, int64_t spatial, int layout) {
  if (layout == PGNAS_NCHW) return e / spatial;
  return (e / (spatial * channels)) * channels + e % channels;
}

template <typename A>
__device__ __forceinline__ A relu_affine(A x, A a, A b) {
  const A pre = x * a + b;
  return pre > A(0) ? pre : A(0);
}

template <typename T, typename G>
__global__ void forward_scalar(T* __restrict__ out, const T* __restrict__ x, const G* __restrict__ scale,
                               const G* __restrict__ shift, const G* __restrict__ keep, int64_t n, int64_t channels,
                               int64_t spatial, int layout) {
  using A = typename AccOf<T, G>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_of(e, channels, spatial, layout);
    const int64_t c = r % channels;
    out[e] = narrow<T>(relu_affine(widen<A>(x[e]), static_cast<A>(scale[c]), static_cast<A>(shift[c])) *
                       static_cast<A>(keep[r]));
  }
}

// 16-byte packs: NCHW with S a multiple of the pack (one row per pack) or NHWC with C a multiple of it.
template <typename T, typename G>
__global__ void forward_packed(T* __restrict__ out, const T* __restrict__ x, const G* __restrict__ scale,
                               const G* __restrict__ shift, const G* __restrict__ keep, int64_t n, int64_t channels,
                               int64_t spatial, int layout) {
  using A = typename AccOf<T, G>::type;
  constexpr int V = Pack<T>::kSize;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < n / V;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_of(q * V, channels, spatial, layout);
    const Pack<T> in = reinterpret_cast<const Pack<T>*>(x)[q];
    Pack<T> res;
    if (layout == PGNAS_NCHW) {
      const int64_t c = r % channels;
      const A a = static_cast<A>(scale[c]), b = static_cast<A>(shift[c]), k = static_cast<A>(keep[r]);
#pragma unroll
      for (int v = 0; v < V; ++v) res.v[v] = narrow<T>(relu_affine(widen<A>(in.v[v]), a, b) * k);
    } else {
      const int64_t c0 = r % channels;
#pragma unroll
      for (int v = 0; v < V; ++v)
        res.v[v] = narrow<T>(relu_affine(widen<A>(in.v[v]), static_cast<A>(scale[c0 + v]),
                                         static_cast<A>(shift[c0 + v])) *
                             static_cast<A>(keep[r + v]));
    }
    reinterpret_cast<Pack<T>*>(out)[q] = res;
  }
}

// The three per-element contributions of the backward pass, accumulated in A.
template <typename A>
struct Sums {
  A scale = 0, shift = 0, keep = 0;
  __device__ __forceinline__ void add(A g, A xv, A a, A b, A k, A* dx) {
    const A pre = xv * a + b;
    const A live = pre > A(0) ? g * k : A(0);
    *dx = live * a;
    scale += live * xv;
    shift += live;
    keep += g * (pre > A(0) ? pre : A(0));
  }
};

// NCHW: one warp per (b, c) row.
template <typename T, typename G>
__global__ void backward_rows(T* __restrict__ grad_x, G* __restrict__ row_scale, G* __restrict__ row_shift,
                              G* __restrict__ grad_keep, const T* __restrict__ grad, const T* __restrict__ x,
                              const G* __restrict__ scale, const G* __restrict__ shift, const G* __restrict__ keep,
                              int64_t rows, int64_t channels, int64_t spatial, bool packed) {
  using A = typename AccOf<T, G>::type;
  constexpr int V = Pack<T>::kSize;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t c = r % channels;
    const A a = static_cast<A>(scale[c]), b = static_cast<A>(shift[c]), k = static_cast<A>(keep[r]);
    const int64_t base = r * spatial;
    Sums<A> sums;
    if (packed) {
      const Pack<T>* g4 = reinterpret_cast<const Pack<T>*>(grad + base);
      const Pack<T>* x4 = reinterpret_cast<const Pack<T>*>(x + base);
      Pack<T>* o4 = reinterpret_cast<Pack<T>*>(grad_x + base);
      for (int64_t q = lane; q < spatial / V; q += 32) {
        const Pack<T> g = g4[q], xv = x4[q];
        Pack<T> o;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          A dx;
          sums.add(widen<A>(g.v[v]), widen<A>(xv.v[v]), a, b, k, &dx);
          o.v[v] = narrow<T>(dx);
        }
        o4[q] = o;
      }
    } else {
      for (int64_t s = lane; s < spatial; s += 32) {
        A dx;
        sums.add(widen<A>(grad[base + s]), widen<A>(x[base + s]), a, b, k, &dx);
        grad_x[base + s] = narrow<T>(dx);
      }
    }
    const A total_scale = warp_sum(sums.scale), total_shift = warp_sum(sums.shift), total_keep = warp_sum(sums.keep);
    if (lane == 0) {
      row_scale[r] = static_cast<G>(total_scale);
      row_shift[r] = static_cast<G>(total_shift);
      if (grad_keep != nullptr) grad_keep[r] = static_cast<G>(total_keep);
    }
  }
}

// NHWC: threads over channels (coalesced), each summing a slice of one example's positions; the
// slices meet in the row buffers (zeroed by the launcher) through atomics.
template <typename T, typename G>
__global__ void backward_channels_last(T* __restrict__ grad_x, G* __restrict__ row_scale, G* __restrict__ row_shift,
                                       G* __restrict__ grad_keep, const T* __restrict__ grad, const T* __restrict__ x,
                                       const G* __restrict__ scale, const G* __restrict__ shift,
                                       const G* __restrict__ keep, int64_t batch, int64_t channels, int64_t spatial,
                                       int64_t slices) {
  using A = typename AccOf<T, G>::type;
  for (int64_t item = blockIdx.x; item < channels_last_items(batch, channels, slices); item += gridDim.x) {
    const ChannelsLastItem it = channels_last_item(item, channels, spatial, slices);
    const int64_t b = it.b, c = it.c;
    if (c >= channels) continue;
    const int64_t r = b * channels + c;
    const A a = static_cast<A>(scale[c]), sh = static_cast<A>(shift[c]), k = static_cast<A>(keep[r]);
    Sums<A> sums;
    for (int64_t s = it.s_begin; s < it.s_end; ++s) {
      const int64_t e = (b * spatial + s) * channels + c;
      A dx;
      sums.add(widen<A>(grad[e]), widen<A>(x[e]), a, sh, k, &dx);
      grad_x[e] = narrow<T>(dx);
    }
    atomicAdd(row_scale + r, static_cast<G>(sums.scale));
    atomicAdd(row_shift + r, static_cast<G>(sums.shift));
    if (grad_keep != nullptr) atomicAdd(grad_keep + r, static_cast<G>(sums.keep));
  }
}

template <typename T, typename G>
cudaError_t launch_forward(T* out, const T* x, const G* scale, const G* shift, const G* keep, int64_t batch,
                           int64_t channels, int64_t spatial, int layout, cudaStream_t cs) {
  const int64_t n = batch * channels * spatial;
  constexpr int V = Pack<T>::kSize;
  const bool packed = aligned16(out) && aligned16(x) && (layout == PGNAS_NCHW ? spatial % V == 0 : channels % V == 0);
  if (packed) {
    forward_packed<T, G><<<grid_for(n / V), kThreads, 0, cs>>>(out, x, scale, shift, keep, n, channels, spatial, layout);
  } else {
    forward_scalar<T, G><<<grid_for(n), kThreads, 0, cs>>>(out, x, scale, shift, keep, n, channels, spatial, layout);
  }
  return last_error();
}

template <typename T, typename G>
cudaError_t launch_backward(T* grad_x, G* row_scale, G* row_shift, G* grad_keep, const T* grad, const T* x,
                            const G* scale, const G* shift, const G* keep, int64_t batch, int64_t channels,
                            int64_t spatial, int layout, cudaStream_t cs) {
  const int64_t rows = batch * channels;
  if (layout == PGNAS_NCHW) {
    constexpr int V = Pack<T>::kSize;
    const bool packed = aligned16(grad_x) && aligned16(grad) && aligned16(x) && spatial % V == 0;
    backward_rows<T, G><<<grid_for(rows * 32), kThreads, 0, cs>>>(grad_x, row_scale, row_shift, grad_keep, grad, x,
                                                                  scale, shift, keep, rows, channels, spatial, packed);
    return last_error();
  }
  for (G* buffer : {row_scale, row_shift, grad_keep}) {
    if (buffer == nullptr) continue;
    const cudaError_t err = cudaMemsetAsync(buffer, 0, sizeof(G) * rows, cs);
    if (err != cudaSuccess) return err;
  }
  const ChannelsLastGrid g = channels_last_grid(batch, channels, spatial);
  backward_channels_last<T, G><<<g.blocks, g.threads, 0, cs>>>(
      grad_x, row_scale, row_shift, grad_keep, grad, x, scale, shift, keep, batch, channels, spatial, g.slices);
  return last_error();
}

// ---- one input -> K gated copies ----------------------------------------------------------------
constexpr int kMaxCopies = PGNAS_MAX_COPIES;

template <typename T, typename G>
__global__ void copies_forward(T* __restrict__ out, const T* __restrict__ x, const G* __restrict__ keeps, int copies,
                               int64_t n, int64_t channels, int64_t spatial, bool relu, int layout) {
  using A = typename AccOf<T, G>::type;
  const int64_t rows = n / spatial;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = row_of(e, channels, spatial, layout);
    A src = widen<A>(x[e]);
    if (relu && !(src > A(0))) src = A(0);
    for (int k = 0; k < copies; ++k) out[k * n + e] = narrow<T>(src * static_cast<A>(keeps[k * rows + r]));
  }
}

// Element e of row r (both layouts): grad_x[e] = relu'(x) sum_k grad_k keep_k, and dot[k] += grad_k src.
template <typename A, typename T, typename G>
__device__ __forceinline__ void copies_backward_element(T* __restrict__ grad_x, const T* __restrict__ grad,
                                                        const T* __restrict__ x, const G* __restrict__ keeps,
                                                        int copies, int64_t n, int64_t rows, int64_t r, int64_t e,
                                                        bool relu, A* dot) {
  const A v = widen<A>(x[e]);
  const bool dead = relu && !(v > A(0));
  const A src = dead ? A(0) : v;
  A acc = 0;
  for (int k = 0; k < copies; ++k) {
    const A g = widen<A>(grad[k * n + e]);
    acc += g * static_cast<A>(keeps[k * rows + r]);
    dot[k] += g * src;
  }
  grad_x[e] = narrow<T>(dead ? A(0) : acc);
}

// NCHW: one warp per (b, c) row; dx = relu'(x) sum_k grad_k keep_k, grad_keeps[k] = sum_s grad_k src.
template <typename T, typename G>
__global__ void copies_backward_rows(T* __restrict__ grad_x, G* __restrict__ grad_keeps, const T* __restrict__ grad,
                                     const T* __restrict__ x, const G* __restrict__ keeps, int copies, int64_t rows,
                                     int64_t spatial, bool relu) {
  using A = typename AccOf<T, G>::type;
  const int64_t n = rows * spatial;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    A dot[kMaxCopies];
    for (int k = 0; k < copies; ++k) dot[k] = A(0);
    for (int64_t s = lane; s < spatial; s += 32) {
      const int64_t e = r * spatial + s;
      copies_backward_element(grad_x, grad, x, keeps, copies, n, rows, r, e, relu, dot);
    }
    for (int k = 0; k < copies; ++k) {
      const A total = warp_sum(dot[k]);
      if (lane == 0 && grad_keeps != nullptr) grad_keeps[k * rows + r] = static_cast<G>(total);
    }
  }
}

// NHWC: threads over channels, each summing a slice of one example's positions; the slices meet in
// grad_keeps (zeroed by the launcher) through atomics.
template <typename T, typename G>
__global__ void copies_backward_channels_last(T* __restrict__ grad_x, G* __restrict__ grad_keeps,
                                              const T* __restrict__ grad, const T* __restrict__ x,
                                              const G* __restrict__ keeps, int copies, int64_t batch,
                                              int64_t channels, int64_t spatial, int64_t slices, bool relu) {
  using A = typename AccOf<T, G>::type;
  const int64_t rows = batch * channels, n = rows * spatial;
  for (int64_t item = blockIdx.x; item < channels_last_items(batch, channels, slices); item += gridDim.x) {
    const ChannelsLastItem it = channels_last_item(item, channels, spatial, slices);
    const int64_t b = it.b, c = it.c;
    if (c >= channels) continue;
    const int64_t r = b * channels + c;
    A dot[kMaxCopies];
    for (int k = 0; k < copies; ++k) dot[k] = A(0);
    for (int64_t s = it.s_begin; s < it.s_end; ++s) {
      const int64_t e = (b * spatial + s) * channels + c;
      copies_backward_element(grad_x, grad, x, keeps, copies, n, rows, r, e, relu, dot);
    }
    if (grad_keeps != nullptr)
      for (int k = 0; k < copies; ++k) atomicAdd(grad_keeps + k * rows + r, static_cast<G>(dot[k]));
  }
}

template <typename T, typename G>
cudaError_t launch_copies(T* out, const T* x, const G* keeps, int copies, int64_t batch, int64_t channels,
                          int64_t spatial, bool relu, int layout, cudaStream_t cs) {
  if (copies < 1 || copies > kMaxCopies) return cudaErrorInvalidValue;
  const int64_t n = batch * channels * spatial;
  copies_forward<T, G><<<grid_for(n), kThreads, 0, cs>>>(out, x, keeps, copies, n, channels, spatial, relu, layout);
  return last_error();
}

template <typename T, typename G>
cudaError_t launch_copies_backward(T* grad_x, G* grad_keeps, const T* grad, const T* x, const G* keeps, int copies,
                                   int64_t batch, int64_t channels, int64_t spatial, bool relu, int layout,
                                   cudaStream_t cs) {
  if (copies < 1 || copies > kMaxCopies) return cudaErrorInvalidValue;
  const int64_t rows = batch * channels;
  if (layout == PGNAS_NCHW) {
    copies_backward_rows<T, G><<<grid_for(rows * 32), kThreads, 0, cs>>>(grad_x, grad_keeps, grad, x, keeps, copies,
                                                                         rows, spatial, relu);
    return last_error();
  }
  if (grad_keeps != nullptr) {
    const cudaError_t err = cudaMemsetAsync(grad_keeps, 0, sizeof(G) * rows * copies, cs);
    if (err != cudaSuccess) return err;
  }
  const ChannelsLastGrid g = channels_last_grid(batch, channels, spatial);
  copies_backward_channels_last<T, G><<<g.blocks, g.threads, 0, cs>>>(
      grad_x, grad_keeps, grad, x, keeps, copies, batch, channels, spatial, g.slices, relu);
  return last_error();
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_affine_relu_gate(void* out, const void* x, pgnas_dtype data, const void* scale,
                                              const void* shift, const void* keep, pgnas_dtype gate, int64_t batch,
                                              int64_t channels, int64_t spatial, pgnas_layout layout,
                                              cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(gate, return (launch_forward<data_t, gate_t>(
                                                          static_cast<data_t*>(out), static_cast<const data_t*>(x),
                                                          static_cast<const gate_t*>(scale),
                                                          static_cast<const gate_t*>(shift),
                                                          static_cast<const gate_t*>(keep), batch, channels, spatial,
                                                          static_cast<int>(layout), cuda_stream))));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_affine_relu_gate_backward(void* grad_x, void* row_scale, void* row_shift, void* grad_keep,
                                                       const void* grad, const void* x, pgnas_dtype data,
                                                       const void* scale, const void* shift, const void* keep,
                                                       pgnas_dtype gate, int64_t batch, int64_t channels,
                                                       int64_t spatial, pgnas_layout layout,
                                                       cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(gate, return (launch_backward<data_t, gate_t>(
                                                          static_cast<data_t*>(grad_x), static_cast<gate_t*>(row_scale),
                                                          static_cast<gate_t*>(row_shift),
                                                          static_cast<gate_t*>(grad_keep),
                                                          static_cast<const data_t*>(grad),
                                                          static_cast<const data_t*>(x),
                                                          static_cast<const gate_t*>(scale),
                                                          static_cast<const gate_t*>(shift),
                                                          static_cast<const gate_t*>(keep), batch, channels, spatial,
                                                          static_cast<int>(layout), cuda_stream))));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_gated_copies(void* out, const void* x, pgnas_dtype data, const void* keeps,
                                          pgnas_dtype gate, int32_t copies, int64_t batch, int64_t channels,
                                          int64_t spatial, int32_t relu, pgnas_layout layout,
                                          cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(gate, return (launch_copies<data_t, gate_t>(
                                                          static_cast<data_t*>(out), static_cast<const data_t*>(x),
                                                          static_cast<const gate_t*>(keeps), copies, batch, channels,
                                                          spatial, relu != 0, static_cast<int>(layout),
                                                          cuda_stream))));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_gated_copies_backward(void* grad_x, void* grad_keeps, const void* grad, const void* x,
                                                   pgnas_dtype data, const void* keeps, pgnas_dtype gate,
                                                   int32_t copies, int64_t batch, int64_t channels, int64_t spatial,
                                                   int32_t relu, pgnas_layout layout, cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(gate, return (launch_copies_backward<data_t, gate_t>(
                                                          static_cast<data_t*>(grad_x), static_cast<gate_t*>(grad_keeps),
                                                          static_cast<const data_t*>(grad),
                                                          static_cast<const data_t*>(x),
                                                          static_cast<const gate_t*>(keeps), copies, batch, channels,
                                                          spatial, relu != 0, static_cast<int>(layout),
                                                          cuda_stream))));
  return cudaSuccess;
}
