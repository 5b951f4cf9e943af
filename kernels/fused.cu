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

template <typename A>
__device__ __forceinline__ A relu_affine(A x, A a, A b) {
  const A pre = x * a + b;
  return pre < A(0) ? A(0) : pre;  // std::max(pre, 0) as the cpu backend: NaN stays NaN (torch.relu's)
}

// out = relu(x * scale[c] + shift[c]) * keep[b, c], through common.cuh's walk.
template <typename T, typename G, bool NHWC>
struct AffineReluGateOp {
  static constexpr bool kNhwc = NHWC;
  using Data = T;
  T* out;
  const T* x;
  const G* scale;
  const G* shift;
  const G* keep;

  template <int W>
  __device__ __forceinline__ void apply(int64_t e, const Vec<T, W>& in, Where<kNhwc> w, int64_t channels,
                                        int64_t spatial) const {
    using A = typename AccOf<T, G>::type;
    Vec<T, W> res;
    A a = static_cast<A>(scale[w.c]), b = static_cast<A>(shift[w.c]), k = static_cast<A>(keep[w.g]);
#pragma unroll
    for (int v = 0; v < W; ++v) {
      if (v > 0) {
        w.next(channels, spatial);
        if (kNhwc || w.s == 0) {  // NCHW: new parameters only on a new row
          a = static_cast<A>(scale[w.c]);
          b = static_cast<A>(shift[w.c]);
          k = static_cast<A>(keep[w.g]);
        }
      }
      res.v[v] = narrow<T>(relu_affine(widen<A>(in.v[v]), a, b) * k);
    }
    *reinterpret_cast<Vec<T, W>*>(out + e) = res;
  }
};

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
    keep += g * (pre < A(0) ? A(0) : pre);  // g * relu(pre): NaN stays NaN
  }
};

// NCHW: one warp per (b, c) row. Lane l sums accesses l, l + 32, ... in order (V elements each; V = 1
// unless S is a multiple of the pack), then warp_sum; U accesses are loaded before any is used.
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads) backward_rows(T* __restrict__ grad_x, G* __restrict__ row_scale,
                                                          G* __restrict__ row_shift, G* __restrict__ grad_keep,
                                                          const T* __restrict__ grad, const T* __restrict__ x,
                                                          const G* __restrict__ scale, const G* __restrict__ shift,
                                                          const G* __restrict__ keep, int64_t rows, int64_t channels,
                                                          int64_t spatial) {
  using A = typename AccOf<T, G>::type;
  constexpr int U = 4;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5), per_row = spatial / V;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t step_c = warps % channels;
  int64_t c = first % channels;  // the row's channel, moved along with r (no division per row)
  for (int64_t r = first; r < rows; r += warps) {
    const A a = static_cast<A>(scale[c]), b = static_cast<A>(shift[c]), k = static_cast<A>(keep[r]);
    const Vec<T, V>* g4 = reinterpret_cast<const Vec<T, V>*>(grad + r * spatial);
    const Vec<T, V>* x4 = reinterpret_cast<const Vec<T, V>*>(x + r * spatial);
    Vec<T, V>* o4 = reinterpret_cast<Vec<T, V>*>(grad_x + r * spatial);
    Sums<A> sums;
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
            A dx;
            sums.add(widen<A>(g[u].v[v]), widen<A>(xv[u].v[v]), a, b, k, &dx);
            o.v[v] = narrow<T>(dx);
          }
          o4[q0 + 32 * u] = o;
        }
      }
    }
    const A total_scale = warp_sum(sums.scale), total_shift = warp_sum(sums.shift), total_keep = warp_sum(sums.keep);
    if (lane == 0) {
      row_scale[r] = static_cast<G>(total_scale);
      row_shift[r] = static_cast<G>(total_shift);
      if (grad_keep != nullptr) grad_keep[r] = static_cast<G>(total_keep);
    }
    c += step_c;
    if (c >= channels) c -= channels;
  }
}

// NHWC: a block item is (example b, a tile of `lanes` packs of V channels) over all positions (common.cuh
// channels_last_lanes); each thread sums its channels' positions in order, group_sum adds the position
// groups in a fixed order: deterministic, no atomics.
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads) backward_channels_last(
    T* __restrict__ grad_x, G* __restrict__ row_scale, G* __restrict__ row_shift, G* __restrict__ grad_keep,
    const T* __restrict__ grad, const T* __restrict__ x, const G* __restrict__ scale, const G* __restrict__ shift,
    const G* __restrict__ keep, int64_t batch, int64_t channels, int64_t spatial, int lanes) {
  using A = typename AccOf<T, G>::type;
  constexpr int U = 4;
  __shared__ A scratch[V * kThreads];
  const int groups = blockDim.x / lanes, group = threadIdx.x / lanes;
  const int64_t tiles = (channels / V + lanes - 1) / lanes;
  for (int64_t item = blockIdx.x; item < batch * tiles; item += gridDim.x) {
    const int64_t b = item / tiles;
    const int64_t c0 = ((item - b * tiles) * lanes + (threadIdx.x & (lanes - 1))) * V;  // this thread's V channels
    const bool live = c0 < channels;
    A a[V], sh[V], k[V];
    Sums<A> sums[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      a[v] = live ? static_cast<A>(scale[c0 + v]) : A(0);
      sh[v] = live ? static_cast<A>(shift[c0 + v]) : A(0);
      k[v] = live ? static_cast<A>(keep[b * channels + c0 + v]) : A(0);
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
              A dx;
              sums[v].add(widen<A>(g[u].v[v]), widen<A>(xv[u].v[v]), a[v], sh[v], k[v], &dx);
              o.v[v] = narrow<T>(dx);
            }
            *reinterpret_cast<Vec<T, V>*>(grad_x + base + s * channels) = o;
          }
        }
      }
    }
    const bool lead = live && static_cast<int>(threadIdx.x) < lanes;
    A part[V];
#pragma unroll
    for (int v = 0; v < V; ++v) part[v] = sums[v].scale;
    group_sum(part, lanes, scratch);
    if (lead) {
#pragma unroll
      for (int v = 0; v < V; ++v) row_scale[b * channels + c0 + v] = static_cast<G>(part[v]);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) part[v] = sums[v].shift;
    group_sum(part, lanes, scratch);
    if (lead) {
#pragma unroll
      for (int v = 0; v < V; ++v) row_shift[b * channels + c0 + v] = static_cast<G>(part[v]);
    }
    if (grad_keep != nullptr) {
#pragma unroll
      for (int v = 0; v < V; ++v) part[v] = sums[v].keep;
      group_sum(part, lanes, scratch);
      if (lead) {
#pragma unroll
        for (int v = 0; v < V; ++v) grad_keep[b * channels + c0 + v] = static_cast<G>(part[v]);
      }
    }
  }
}

template <typename T, typename G>
cudaError_t launch_forward(T* out, const T* x, const G* scale, const G* shift, const G* keep, int64_t batch,
                           int64_t channels, int64_t spatial, int layout, cudaStream_t cs) {
  const int64_t n = batch * channels * spatial;
  const bool packed = aligned16(out) && aligned16(x);  // packs may straddle rows: any S, any C
  if (layout == PGNAS_NCHW)
    return launch_walk(AffineReluGateOp<T, G, false>{out, x, scale, shift, keep}, n, channels, spatial, packed, cs);
  return launch_walk(AffineReluGateOp<T, G, true>{out, x, scale, shift, keep}, n, channels, spatial, packed, cs);
}

template <typename T, typename G>
cudaError_t launch_backward(T* grad_x, G* row_scale, G* row_shift, G* grad_keep, const T* grad, const T* x,
                            const G* scale, const G* shift, const G* keep, int64_t batch, int64_t channels,
                            int64_t spatial, int layout, cudaStream_t cs) {
  constexpr int V = Pack<T>::kSize;
  const bool aligned = aligned16(grad_x) && aligned16(grad) && aligned16(x);
  if (layout == PGNAS_NCHW) {
    const int64_t rows = batch * channels;
    if (aligned && spatial % V == 0) {
      constexpr auto kernel = backward_rows<T, G, V>;
      kernel<<<resident_grid<kernel>(rows * 32), kThreads, 0, cs>>>(grad_x, row_scale, row_shift, grad_keep, grad, x,
                                                                    scale, shift, keep, rows, channels, spatial);
    } else {
      constexpr auto kernel = backward_rows<T, G, 1>;
      kernel<<<resident_grid<kernel>(rows * 32), kThreads, 0, cs>>>(grad_x, row_scale, row_shift, grad_keep, grad, x,
                                                                    scale, shift, keep, rows, channels, spatial);
    }
    return last_error();
  }
  if (aligned && channels % V == 0) {
    const int lanes = channels_last_lanes(channels / V, spatial, 16);
    backward_channels_last<T, G, V><<<channels_last_blocks(batch * ((channels / V + lanes - 1) / lanes)), kThreads, 0,
                                      cs>>>(grad_x, row_scale, row_shift, grad_keep, grad, x, scale, shift, keep, batch,
                                            channels, spatial, lanes);
  } else {
    const int lanes = channels_last_lanes(channels, spatial, static_cast<int>(sizeof(T)));
    backward_channels_last<T, G, 1><<<channels_last_blocks(batch * ((channels + lanes - 1) / lanes)), kThreads, 0,
                                      cs>>>(grad_x, row_scale, row_shift, grad_keep, grad, x, scale, shift, keep, batch,
                                            channels, spatial, lanes);
  }
  return last_error();
}

// ---- one input -> K gated copies ----------------------------------------------------------------
constexpr int kMaxCopies = PGNAS_MAX_COPIES;

// out[k] = src * keeps[k][b, c] with src = relu(x) when relu else x, every copy from one read of x.
template <typename T, typename G, bool NHWC>
struct CopiesOp {
  static constexpr bool kNhwc = NHWC;
  using Data = T;
  T* out;
  const T* x;
  const G* keeps;
  int copies;
  int64_t n, rows;
  bool relu;

  template <int W>
  __device__ __forceinline__ void apply(int64_t e, const Vec<T, W>& in, Where<kNhwc> w, int64_t channels,
                                        int64_t spatial) const {
    using A = typename AccOf<T, G>::type;
    A src[W];
#pragma unroll
    for (int v = 0; v < W; ++v) {
      src[v] = widen<A>(in.v[v]);
      if (relu && src[v] < A(0)) src[v] = A(0);  // NaN stays NaN
    }
    for (int k = 0; k < copies; ++k) {
      const G* keep = keeps + k * rows;
      Where<kNhwc> p = w;
      A kv = static_cast<A>(keep[p.g]);
      Vec<T, W> res;
#pragma unroll
      for (int v = 0; v < W; ++v) {
        if (v > 0) {
          p.next(channels, spatial);
          if (kNhwc || p.s == 0) kv = static_cast<A>(keep[p.g]);
        }
        res.v[v] = narrow<T>(src[v] * kv);
      }
      *reinterpret_cast<Vec<T, W>*>(out + k * n + e) = res;
    }
  }
};

// Copy counts are compile-time (K: 2, 4 or kMaxCopies, the first that holds `copies`) so that the
// per-copy sums stay in registers; copies past `copies` are skipped.
// Element of both layouts: grad_x = relu'(x) sum_k grad_k keep_k, and dot[k] += grad_k src, k in order.
template <int K, typename A>
__device__ __forceinline__ A copies_backward_value(A x, const A* g, const A* keep, int copies, bool relu, A* dot) {
  const bool dead = relu && !(x > A(0));  // relu'(x) = 0 (NaN included, as the reference; torch.relu passes it)
  const A src = relu && x < A(0) ? A(0) : x;  // relu(x): NaN stays NaN
  A acc = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < copies) {
      acc += g[k] * keep[k];
      dot[k] += g[k] * src;
    }
  }
  return dead ? A(0) : acc;
}

// NCHW: one warp per (b, c) row; lane l takes elements l, l + 32, ... in order (U loaded at once),
// then warp_sum per copy: grad_keeps[k] = sum_s grad_k src.
template <typename T, typename G, int K>
__global__ void __launch_bounds__(kThreads) copies_backward_rows(T* __restrict__ grad_x, G* __restrict__ grad_keeps,
                                                                 const T* __restrict__ grad, const T* __restrict__ x,
                                                                 const G* __restrict__ keeps, int copies, int64_t rows,
                                                                 int64_t spatial, bool relu) {
  using A = typename AccOf<T, G>::type;
  constexpr int U = K <= 4 ? 4 : 1;
  const int64_t n = rows * spatial;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    A keep[K], dot[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      keep[k] = k < copies ? static_cast<A>(keeps[k * rows + r]) : A(0);
      dot[k] = A(0);
    }
    const int64_t base = r * spatial;
    for (int64_t s0 = lane; s0 < spatial; s0 += 32 * U) {
      T xs[U], gs[U][K];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + 32 * u < spatial) {
          xs[u] = x[base + s0 + 32 * u];
#pragma unroll
          for (int k = 0; k < K; ++k)
            if (k < copies) gs[u][k] = grad[k * n + base + s0 + 32 * u];
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (s0 + 32 * u < spatial) {
          A g[K];
#pragma unroll
          for (int k = 0; k < K; ++k) g[k] = k < copies ? widen<A>(gs[u][k]) : A(0);
          grad_x[base + s0 + 32 * u] = narrow<T>(copies_backward_value<K>(widen<A>(xs[u]), g, keep, copies, relu, dot));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < copies) {
        const A total = warp_sum(dot[k]);
        if (lane == 0 && grad_keeps != nullptr) grad_keeps[k * rows + r] = static_cast<G>(total);
      }
    }
  }
}

// NHWC: a block item is (example b, a tile of `lanes` packs of V channels) over all positions; each
// thread sums its channels' positions in order, group_sum adds the position groups in a fixed order
// (deterministic, no atomics).
template <typename T, typename G, int V, int K>
__global__ void __launch_bounds__(kThreads) copies_backward_channels_last(
    T* __restrict__ grad_x, G* __restrict__ grad_keeps, const T* __restrict__ grad, const T* __restrict__ x,
    const G* __restrict__ keeps, int copies, int64_t batch, int64_t channels, int64_t spatial, int lanes, bool relu) {
  using A = typename AccOf<T, G>::type;
  constexpr int U = K <= 2 ? 2 : 1;
  __shared__ A scratch[V * kThreads];
  const int64_t rows = batch * channels, n = rows * spatial;
  const int groups = blockDim.x / lanes, group = threadIdx.x / lanes;
  const int64_t tiles = (channels / V + lanes - 1) / lanes;
  for (int64_t item = blockIdx.x; item < batch * tiles; item += gridDim.x) {
    const int64_t b = item / tiles;
    const int64_t c0 = ((item - b * tiles) * lanes + (threadIdx.x & (lanes - 1))) * V;  // this thread's V channels
    const bool live = c0 < channels;
    A keep[V][K], dot[K][V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        keep[v][k] = live && k < copies ? static_cast<A>(keeps[k * rows + b * channels + c0 + v]) : A(0);
        dot[k][v] = A(0);
      }
    }
    if (live) {
      const int64_t base = b * spatial * channels + c0;
      for (int64_t s0 = group; s0 < spatial; s0 += static_cast<int64_t>(U) * groups) {
        Vec<T, V> xs[U], gs[U][K];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t e = base + (s0 + static_cast<int64_t>(u) * groups) * channels;
          if (s0 + static_cast<int64_t>(u) * groups < spatial) {
            xs[u] = *reinterpret_cast<const Vec<T, V>*>(x + e);
#pragma unroll
            for (int k = 0; k < K; ++k)
              if (k < copies) gs[u][k] = *reinterpret_cast<const Vec<T, V>*>(grad + k * n + e);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t e = base + (s0 + static_cast<int64_t>(u) * groups) * channels;
          if (s0 + static_cast<int64_t>(u) * groups < spatial) {
            Vec<T, V> o;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              A g[K], d[K];
#pragma unroll
              for (int k = 0; k < K; ++k) {
                g[k] = k < copies ? widen<A>(gs[u][k].v[v]) : A(0);
                d[k] = dot[k][v];
              }
              o.v[v] = narrow<T>(copies_backward_value<K>(widen<A>(xs[u].v[v]), g, keep[v], copies, relu, d));
#pragma unroll
              for (int k = 0; k < K; ++k) dot[k][v] = d[k];
            }
            *reinterpret_cast<Vec<T, V>*>(grad_x + e) = o;
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < copies && grad_keeps != nullptr) {
        group_sum(dot[k], lanes, scratch);
        if (live && static_cast<int>(threadIdx.x) < lanes) {
#pragma unroll
          for (int v = 0; v < V; ++v) grad_keeps[k * rows + b * channels + c0 + v] = static_cast<G>(dot[k][v]);
        }
      }
    }
  }
}

template <typename T, typename G>
cudaError_t launch_copies(T* out, const T* x, const G* keeps, int copies, int64_t batch, int64_t channels,
                          int64_t spatial, bool relu, int layout, cudaStream_t cs) {
  if (copies < 1 || copies > kMaxCopies) return cudaErrorInvalidValue;
  const int64_t n = batch * channels * spatial, rows = batch * channels;
  // every copy's base aligned too: n * sizeof(T) a multiple of 16
  const bool packed = aligned16(out) && aligned16(x) && n % Pack<T>::kSize == 0;
  if (layout == PGNAS_NCHW)
    return launch_walk(CopiesOp<T, G, false>{out, x, keeps, copies, n, rows, relu}, n, channels, spatial, packed, cs);
  return launch_walk(CopiesOp<T, G, true>{out, x, keeps, copies, n, rows, relu}, n, channels, spatial, packed, cs);
}

template <typename T, typename G, int K>
cudaError_t launch_copies_backward_k(T* grad_x, G* grad_keeps, const T* grad, const T* x, const G* keeps, int copies,
                                     int64_t batch, int64_t channels, int64_t spatial, bool relu, int layout,
                                     cudaStream_t cs) {
  const int64_t rows = batch * channels;
  if (layout == PGNAS_NCHW) {
    // element order per lane as ever (scalar), so grad_keeps' sums are unchanged
    constexpr auto kernel = copies_backward_rows<T, G, K>;
    kernel<<<resident_grid<kernel>(rows * 32), kThreads, 0, cs>>>(grad_x, grad_keeps, grad, x, keeps, copies, rows,
                                                                  spatial, relu);
    return last_error();
  }
  // more copies, narrower accesses: the per-copy sums' registers are the limit
  constexpr int P = Pack<T>::kSize, V = K <= 2 ? P : K <= 4 ? (P < 4 ? P : 4) : 1;
  const bool packed = V > 1 && aligned16(grad_x) && aligned16(grad) && aligned16(x) && channels % V == 0;
  if (packed) {
    const int lanes = channels_last_lanes(channels / V, spatial, V * static_cast<int>(sizeof(T)));
    copies_backward_channels_last<T, G, V, K><<<channels_last_blocks(batch * ((channels / V + lanes - 1) / lanes)),
                                                kThreads, 0, cs>>>(grad_x, grad_keeps, grad, x, keeps, copies, batch,
                                                                   channels, spatial, lanes, relu);
  } else {
    const int lanes = channels_last_lanes(channels, spatial, static_cast<int>(sizeof(T)));
    copies_backward_channels_last<T, G, 1, K><<<channels_last_blocks(batch * ((channels + lanes - 1) / lanes)),
                                                kThreads, 0, cs>>>(grad_x, grad_keeps, grad, x, keeps, copies, batch,
                                                                   channels, spatial, lanes, relu);
  }
  return last_error();
}

template <typename T, typename G>
cudaError_t launch_copies_backward(T* grad_x, G* grad_keeps, const T* grad, const T* x, const G* keeps, int copies,
                                   int64_t batch, int64_t channels, int64_t spatial, bool relu, int layout,
                                   cudaStream_t cs) {
  if (copies < 1 || copies > kMaxCopies) return cudaErrorInvalidValue;
  if (copies <= 2)
    return launch_copies_backward_k<T, G, 2>(grad_x, grad_keeps, grad, x, keeps, copies, batch, channels, spatial, relu,
                                             layout, cs);
  if (copies <= 4)
    return launch_copies_backward_k<T, G, 4>(grad_x, grad_keeps, grad, x, keeps, copies, batch, channels, spatial, relu,
                                             layout, cs);
  return launch_copies_backward_k<T, G, kMaxCopies>(grad_x, grad_keeps, grad, x, keeps, copies, batch, channels,
                                                    spatial, relu, layout, cs);
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
