// branch combination ("mixed-operation forward"): out = sum_s w[b, s] y_s (+ skip) and its backward
// (design.md "The op set"). Branch pointers travel by value, kMaxBranches per launch.
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

constexpr int kMaxBranches = 8;

struct Branches {
  const void* p[kMaxBranches];
};
struct MutableBranches {
  void* p[kMaxBranches];
};

template <typename W>
__device__ __forceinline__ W branch_weight(const W* w, int per_example, int64_t b, int n_total, int s) {
  return per_example ? w[b * n_total + s] : w[s];
}

// One thread per pack of V elements (V = 1 when not vectorised); a pack never straddles examples.
template <typename T, typename W, int V>
__global__ void combine_kernel(T* out, Branches ys, int n, int first, int n_total, const W* __restrict__ w,
                               int per_example, const T* skip /* may be `out`: no __restrict__ */, int64_t total,
                               int64_t per_batch) {
  using A = typename AccOf<T, W>::type;
  struct alignas(sizeof(T) * V) Vec {
    T v[V];
  };
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < total / V;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = (q * V) / per_batch;
    A acc[V];
    if (skip) {
      const Vec sv = reinterpret_cast<const Vec*>(skip)[q];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = widen<A>(sv.v[v]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = A(0);
    }
    for (int s = 0; s < n; ++s) {
      const A ws = static_cast<A>(branch_weight(w, per_example, b, n_total, first + s));
      const Vec yv = reinterpret_cast<const Vec*>(ys.p[s])[q];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += ws * widen<A>(yv.v[v]);
    }
    Vec o;
#pragma unroll
    for (int v = 0; v < V; ++v) o.v[v] = narrow<T>(acc[v]);
    reinterpret_cast<Vec*>(out)[q] = o;
  }
}

// grad_ys[s] = grad * wb; and, when grad_w is set, per-block partial sums of grad * y_s added to
// grad_w[b, s] (or grad_w[s]). A block stays inside one example (blockIdx.y = example).
template <typename T, typename W, int V>
__global__ void combine_backward_kernel(MutableBranches grad_ys, W* __restrict__ grad_w, const T* __restrict__ grad,
                                        Branches ys, int n, int first, int n_total, const W* __restrict__ wb,
                                        int per_example, int64_t per_batch) {
  using A = typename AccOf<T, W>::type;
  struct alignas(sizeof(T) * V) Vec {
    T v[V];
  };
  const int64_t b = blockIdx.y;
  const int64_t packs = per_batch / V;
  const int64_t base = b * packs;
  A dot[kMaxBranches];
#pragma unroll
  for (int s = 0; s < kMaxBranches; ++s) dot[s] = A(0);
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < packs;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Vec g = reinterpret_cast<const Vec*>(grad)[base + q];
#pragma unroll
    for (int s = 0; s < kMaxBranches; ++s) {
      if (s >= n) break;
      const A ws = static_cast<A>(branch_weight(wb, per_example, b, n_total, first + s));
      Vec o;
#pragma unroll
      for (int v = 0; v < V; ++v) o.v[v] = narrow<T>(widen<A>(g.v[v]) * ws);
      reinterpret_cast<Vec*>(grad_ys.p[s])[base + q] = o;
      if (grad_w) {
        const Vec y = reinterpret_cast<const Vec*>(ys.p[s])[base + q];
#pragma unroll
        for (int v = 0; v < V; ++v) dot[s] += widen<A>(g.v[v]) * widen<A>(y.v[v]);
      }
    }
  }
  if (!grad_w) return;
  for (int s = 0; s < n; ++s) {
    const A total = block_sum(dot[s]);
    if (threadIdx.x == 0) atomicAdd(grad_w + (per_example ? b * n_total : 0) + first + s, static_cast<W>(total));
  }
}

template <typename T>
bool packable(int64_t per_batch, const void* const* ptrs, int n, const void* extra0, const void* extra1) {
  if (per_batch % Pack<T>::kSize != 0) return false;
  for (int s = 0; s < n; ++s)
    if (!aligned16(ptrs[s])) return false;
  return (extra0 == nullptr || aligned16(extra0)) && (extra1 == nullptr || aligned16(extra1));
}

template <typename T, typename W>
cudaError_t launch_combine(T* out, const void* const* ys, int n_total, const W* w, int per_example, const T* skip,
                           int64_t batch, int64_t per_batch, cudaStream_t cs) {
  const int64_t total = batch * per_batch;
  // More than kMaxBranches: later launches accumulate onto `out` (passed as their skip).
  for (int first = 0; first < n_total; first += kMaxBranches) {
    const int n = n_total - first < kMaxBranches ? n_total - first : kMaxBranches;
    Branches br{};
    for (int s = 0; s < n; ++s) br.p[s] = ys[first + s];
    const T* base = first == 0 ? skip : out;
    if (packable<T>(per_batch, ys + first, n, out, base)) {
      constexpr int V = Pack<T>::kSize;
      combine_kernel<T, W, V><<<grid_for(total / V), kThreads, 0, cs>>>(out, br, n, first, n_total, w, per_example,
                                                                        base, total, per_batch);
    } else {
      combine_kernel<T, W, 1><<<grid_for(total), kThreads, 0, cs>>>(out, br, n, first, n_total, w, per_example, base,
                                                                    total, per_batch);
    }
    const cudaError_t err = last_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, typename W>
cudaError_t launch_combine_backward(void* const* grad_ys, W* grad_w, const T* grad, const void* const* ys, int n_total,
                                    const W* wb, int per_example, int64_t batch, int64_t per_batch, cudaStream_t cs) {
  if (grad_w) {
    const cudaError_t err = cudaMemsetAsync(grad_w, 0, sizeof(W) * (per_example ? batch * n_total : n_total), cs);
    if (err != cudaSuccess) return err;
  }
  if (batch > 65535) return cudaErrorInvalidConfiguration;  // blockIdx.y holds the example
  for (int first = 0; first < n_total; first += kMaxBranches) {
    const int n = n_total - first < kMaxBranches ? n_total - first : kMaxBranches;
    Branches br{};
    MutableBranches gr{};
    for (int s = 0; s < n; ++s) {
      br.p[s] = ys[first + s];
      gr.p[s] = grad_ys[first + s];
    }
    const bool packed = packable<T>(per_batch, ys + first, n, grad, nullptr) &&
                        packable<T>(per_batch, reinterpret_cast<const void* const*>(grad_ys + first), n, nullptr,
                                    nullptr);
    const int V = packed ? Pack<T>::kSize : 1;
    int64_t per_example_blocks = (grid_for(INT64_MAX / 2) * 2 + batch - 1) / batch;  // fill the device
    const int64_t needed = (per_batch / V + kThreads - 1) / kThreads;
    if (per_example_blocks > needed) per_example_blocks = needed;
    if (per_example_blocks < 1) per_example_blocks = 1;
    const dim3 grid(static_cast<unsigned>(per_example_blocks), static_cast<unsigned>(batch));
    if (packed) {
      combine_backward_kernel<T, W, Pack<T>::kSize><<<grid, kThreads, 0, cs>>>(gr, grad_w, grad, br, n, first, n_total,
                                                                                wb, per_example, per_batch);
    } else {
      combine_backward_kernel<T, W, 1><<<grid, kThreads, 0, cs>>>(gr, grad_w, grad, br, n, first, n_total, wb,
                                                                  per_example, per_batch);
    }
    const cudaError_t err = last_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_branch_combine(void* out, const void* const* ys, int32_t n_branches, pgnas_dtype data,
                                            const void* weights, pgnas_dtype weight_dtype, int32_t per_example,
                                            const void* skip, int64_t batch, int64_t per_batch,
                                            cudaStream_t cuda_stream) {
  if (batch * per_batch <= 0 || n_branches <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(weight_dtype, return (launch_combine<data_t, gate_t>(
                                                                  static_cast<data_t*>(out), ys, n_branches,
                                                                  static_cast<const gate_t*>(weights), per_example,
                                                                  static_cast<const data_t*>(skip), batch, per_batch,
                                                                  cuda_stream))));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_branch_combine_backward(void* const* grad_ys, void* grad_w, const void* grad,
                                                     const void* const* ys, int32_t n_branches, pgnas_dtype data,
                                                     const void* wb, pgnas_dtype weight_dtype, int32_t per_example,
                                                     int64_t batch, int64_t per_batch, cudaStream_t cuda_stream) {
  if (batch * per_batch <= 0 || n_branches <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(weight_dtype, return (launch_combine_backward<data_t, gate_t>(
                                                                  grad_ys, static_cast<gate_t*>(grad_w),
                                                                  static_cast<const data_t*>(grad), ys, n_branches,
                                                                  static_cast<const gate_t*>(wb), per_example, batch,
                                                                  per_batch, cuda_stream))));
  return cudaSuccess;
}
