// branch combination ("mixed-operation forward"): out = sum_s w[b, s] y_s (+ skip) and its backward
// (design.md "The op set"). Branch pointers travel by value, a fixed number per launch.
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

constexpr int kMaxBranches = PGNAS_COMBINE_BRANCHES_PER_LAUNCH;
// The forward takes more: its launches after the first round the running sum to the data dtype
// (the backward's chunks are independent), so up to 16 branches round once, as the reference does.
constexpr int kMaxForwardBranches = PGNAS_COMBINE_FORWARD_BRANCHES_PER_LAUNCH;

template <int Capacity>
struct BranchPointers {
  const void* p[Capacity];
};
using Branches = BranchPointers<kMaxBranches>;
using ForwardBranches = BranchPointers<kMaxForwardBranches>;
struct MutableBranches {
  void* p[kMaxBranches];
};

template <typename W>
__device__ __forceinline__ W branch_weight(const W* w, int per_example, int64_t b, int n_total, int s) {
  return per_example ? w[b * n_total + s] : w[s];
}

// One thread per pack of V elements (V = 1 when not vectorised); a pack never straddles examples.
template <typename T, typename W, int V>
__global__ void combine_kernel(T* out, ForwardBranches ys, int n, int first, int n_total, const W* __restrict__ w,
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

// grad_ys[s] = grad * wb; and, when grad_w is set, grad_w[b, s] (or grad_w[s]) = the sum of grad * y_s,
// bit-reproducible run to run (no floating-point atomics). A block stays inside one example
// (blockIdx.y = example). An example's only block (gridDim.x == 1, per-example weights) writes its
// sums straight away; otherwise each block writes its sums to partials[block * n + s], and the last
// block to finish (a ticket on `counter`, 0 on entry) adds them in a fixed order (index order in
// double per thread, then block_sum's tree) into every grad_w entry of this launch's branches and
// leaves the counter at 0 for the next launch. So grad_w needs no zeroing beforehand.
template <typename T, typename W, int V>
__global__ void combine_backward_kernel(MutableBranches grad_ys, W* __restrict__ grad_w, double* __restrict__ partials,
                                        unsigned int* __restrict__ counter, const T* __restrict__ grad, Branches ys,
                                        int n, int first, int n_total, const W* __restrict__ wb, int per_example,
                                        int64_t per_batch) {
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
  if (per_example && gridDim.x == 1) {  // the example's only block: its sums are the gradient
#pragma unroll
    for (int s = 0; s < kMaxBranches; ++s) {
      if (s >= n) break;
      const A total = block_sum(dot[s]);
      if (threadIdx.x == 0) grad_w[b * n_total + first + s] = static_cast<W>(total);
    }
    return;
  }
  const unsigned int blocks = gridDim.x * gridDim.y, block = blockIdx.y * gridDim.x + blockIdx.x;
#pragma unroll
  for (int s = 0; s < kMaxBranches; ++s) {
    if (s >= n) break;
    const A total = block_sum(dot[s]);
    if (threadIdx.x == 0) partials[static_cast<int64_t>(block) * n + s] = static_cast<double>(total);
  }
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();  // the partials are visible device-wide before this block's ticket
    last = atomicAdd(counter, 1u) == blocks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // every other block's partials before the reads below
  if (per_example) {
    // grad_w[e, first + s] = its example's gridDim.x partials in block order, one thread per (e, s)
    const int outputs = static_cast<int>(gridDim.y) * n;
    for (int o = threadIdx.x; o < outputs; o += blockDim.x) {
      const int e = o / n, s = o - e * n;
      const double* p = partials + static_cast<int64_t>(e) * gridDim.x * n + s;
      double sum = 0;
      for (unsigned int x = 0; x < gridDim.x; ++x) sum += __ldcg(p + static_cast<int64_t>(x) * n);  // not via L1
      grad_w[static_cast<int64_t>(e) * n_total + first + s] = static_cast<W>(sum);
    }
  } else {
    // grad_w[first + s] = all blocks' partials: each thread's in block order, then block_sum's tree
    for (int s = 0; s < n; ++s) {
      double sum = 0;
      for (unsigned int k = threadIdx.x; k < blocks; k += blockDim.x)
        sum += __ldcg(partials + static_cast<int64_t>(k) * n + s);  // not via L1
      sum = block_sum(sum);
      if (threadIdx.x == 0) grad_w[first + s] = static_cast<W>(sum);
    }
  }
  if (threadIdx.x == 0) *counter = 0u;
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
  // More than kMaxForwardBranches: later launches accumulate onto `out` (passed as their skip).
  for (int first = 0; first < n_total; first += kMaxForwardBranches) {
    const int n = n_total - first < kMaxForwardBranches ? n_total - first : kMaxForwardBranches;
    ForwardBranches br{};
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
cudaError_t launch_combine_backward(void* const* grad_ys, W* grad_w, double* partials, unsigned int* counter,
                                    const T* grad, const void* const* ys, int n_total, const W* wb, int per_example,
                                    int64_t batch, int64_t per_batch, cudaStream_t cs) {
  if (batch > 65535) return cudaErrorInvalidConfiguration;  // blockIdx.y holds the example
  if (grad_w && (partials == nullptr || counter == nullptr)) return cudaErrorInvalidValue;
  // Blocks per example: enough to fill the device, PGNAS_COMBINE_FILL_BLOCKS at most in all (so the
  // partials of one launch fit PGNAS_COMBINE_PARTIALS(batch, n)), at least one, no more than the packs need.
  int64_t fill = static_cast<int64_t>(grid_for(INT64_MAX / 2)) * 2;
  if (fill > PGNAS_COMBINE_FILL_BLOCKS) fill = PGNAS_COMBINE_FILL_BLOCKS;
  // Launches on one stream run in order: each leaves `counter` at 0 and is done with `partials` before
  // the next starts, so the chunks share both.
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
    int64_t per_example_blocks = (fill + batch - 1) / batch;
    const int64_t needed = (per_batch / V + kThreads - 1) / kThreads;
    if (per_example_blocks > needed) per_example_blocks = needed;
    if (per_example_blocks < 1) per_example_blocks = 1;
    const dim3 grid(static_cast<unsigned>(per_example_blocks), static_cast<unsigned>(batch));
    if (packed) {
      combine_backward_kernel<T, W, Pack<T>::kSize><<<grid, kThreads, 0, cs>>>(
          gr, grad_w, partials, counter, grad, br, n, first, n_total, wb, per_example, per_batch);
    } else {
      combine_backward_kernel<T, W, 1><<<grid, kThreads, 0, cs>>>(gr, grad_w, partials, counter, grad, br, n, first,
                                                                  n_total, wb, per_example, per_batch);
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

extern "C" cudaError_t pgnas_branch_combine_backward(void* const* grad_ys, void* grad_w, double* partials,
                                                     unsigned int* counter, const void* grad, const void* const* ys,
                                                     int32_t n_branches, pgnas_dtype data, const void* wb,
                                                     pgnas_dtype weight_dtype, int32_t per_example, int64_t batch,
                                                     int64_t per_batch, cudaStream_t cuda_stream) {
  if (batch * per_batch <= 0 || n_branches <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, PGNAS_DISPATCH_GATE(weight_dtype, return (launch_combine_backward<data_t, gate_t>(
                                                                  grad_ys, static_cast<gate_t*>(grad_w), partials,
                                                                  counter, static_cast<const data_t*>(grad), ys,
                                                                  n_branches, static_cast<const gate_t*>(wb),
                                                                  per_example, batch, per_batch, cuda_stream))));
  return cudaSuccess;
}
