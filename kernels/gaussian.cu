// The Gaussian posterior family (design.md "Gaussian family"):
//   gaussian_noise: out = mu + sqrt(max(var, 0) + 1e-8) eps, the local-reparameterization epilogue, and
//   its backward d var = grad eps / (2 sqrt(var + 1e-8)) where var > 0 (eps regenerated, never stored);
//   gaussian_kl: the whole network's Molchanov KL over a segment table, O(1) launches.
// eps of the element at logical (row-major) index i is philox_normal_at(seed, stream, offset + i).
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

// Logical row-major index of memory position e: e itself for dense row-major data; for
// channels_last memory [B, S, C] of the logical [B, C, S], (b C + c) S + s.
__device__ __forceinline__ uint64_t logical_index(int64_t e, int64_t channels, int64_t spatial, int layout) {
  if (layout == PGNAS_NCHW) return static_cast<uint64_t>(e);
  const int64_t c = e % channels, rest = e / channels;
  return static_cast<uint64_t>(((rest / spatial) * channels + c) * spatial + rest % spatial);
}

// sqrt(max(var, 0) + 1e-8); a NaN var stays NaN, as with torch's clamp_min.
template <typename A>
__device__ __forceinline__ A noise_std(A v) {
  return sqrt((v < A(0) ? A(0) : v) + static_cast<A>(1e-8));
}

// Forward: first = mu, second = var, out = mu + std eps. Backward: first = grad, second = var,
// out = d var.
template <typename A, bool kBackward>
__device__ __forceinline__ A noise_element(A first, A v, float eps) {
  if (kBackward) return v > A(0) ? first * static_cast<A>(eps) / (A(2) * noise_std(v)) : A(0);
  return first + noise_std(v) * static_cast<A>(eps);
}

// One thread per 16-byte pack of each of the three tensors (when aligned), then the tail elements.
template <typename T, bool kBackward>
__global__ void noise_kernel(T* __restrict__ out, const T* __restrict__ first, const T* __restrict__ var, int64_t n,
                             int64_t channels, int64_t spatial, int layout, uint64_t seed, uint64_t stream,
                             uint64_t offset, bool packed) {
  using A = typename AccOf<T, float>::type;
  constexpr int V = Pack<T>::kSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t packs = packed ? n / V : 0;
  for (int64_t q = start; q < packs; q += stride) {
    const Pack<T> a = reinterpret_cast<const Pack<T>*>(first)[q];
    const Pack<T> v = reinterpret_cast<const Pack<T>*>(var)[q];
    Pack<T> res;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float eps = philox_normal_at(seed, stream, offset + logical_index(q * V + k, channels, spatial, layout));
      res.v[k] = narrow<T>(noise_element<A, kBackward>(widen<A>(a.v[k]), widen<A>(v.v[k]), eps));
    }
    reinterpret_cast<Pack<T>*>(out)[q] = res;
  }
  for (int64_t e = packs * V + start; e < n; e += stride) {
    const float eps = philox_normal_at(seed, stream, offset + logical_index(e, channels, spatial, layout));
    out[e] = narrow<T>(noise_element<A, kBackward>(widen<A>(first[e]), widen<A>(var[e]), eps));
  }
}

template <typename T, bool kBackward>
cudaError_t launch_noise(T* out, const T* first, const T* var, int64_t batch, int64_t channels, int64_t spatial,
                         int layout, uint64_t seed, uint64_t stream, uint64_t offset, cudaStream_t cs) {
  const int64_t n = batch * channels * spatial;
  constexpr int V = Pack<T>::kSize;
  const bool packed = aligned16(out) && aligned16(first) && aligned16(var);
  noise_kernel<T, kBackward><<<grid_for(packed ? (n + V - 1) / V : n), kThreads, 0, cs>>>(
      out, first, var, n, channels, spatial, layout, seed, stream, offset, packed);
  return last_error();
}

// ---- the KL -----------------------------------------------------------------------------------------
// Molchanov et al. 2017: KL(a) ~ K1 - K1 sigmoid(K2 + K3 a) + 0.5 softplus(-a), a = log alpha, evaluated as
// K1 sigmoid(-(K2 + K3 a)) + 0.5 softplus(-a) (no subtraction that cancels for large a).
constexpr double kK1 = 0.63576, kK2 = 1.87320, kK3 = 1.48695;

__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

__device__ __forceinline__ double load_log_alpha(const pgnas_kl_segment& s, int64_t c) {
  return load_gate(s.log_alpha, s.is_double, c);
}

// One block walks every segment (a network has thousands of channels, not millions), summing in
// double; the block sum is fixed-order, so the KL has the same bits on every run.
__global__ void kl_kernel(void* result, int result_double, const pgnas_kl_segment* segs, int n_segs) {
  double acc = 0;
  for (int k = 0; k < n_segs; ++k) {
    const pgnas_kl_segment s = segs[k];
    double layer = 0;
    for (int64_t c = threadIdx.x; c < s.channels; c += blockDim.x) {
      const double a = load_log_alpha(s, c);
      const double softplus = fmax(-a, 0.0) + log1p(exp(-fabs(a)));  // softplus(-a) without overflow
      layer += kK1 * sigmoid(-(kK2 + kK3 * a)) + 0.5 * softplus;
    }
    acc += s.scale * layer;
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) store_gate(result, result_double, 0, total);
}

// d a = grad scale (-K1 K3 s (1 - s) - 0.5 sigmoid(-a)), s = sigmoid(K2 + K3 a)
__global__ void kl_backward_kernel(const void* grad, int grad_double, void* grads, const pgnas_kl_segment* segs,
                                   int n_segs) {
  const double g = load_gate(grad, grad_double, 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int k = 0; k < n_segs; ++k) {
    const pgnas_kl_segment s = segs[k];
    for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < s.channels; c += stride) {
      const double a = load_log_alpha(s, c);
      const double t = kK2 + kK3 * a;  // s (1 - s) as sigmoid(t) sigmoid(-t): no cancelling for large t
      const double d = g * s.scale * (-kK1 * kK3 * sigmoid(t) * sigmoid(-t) - 0.5 * sigmoid(-a));
      store_gate(grads, s.is_double, s.channel_begin + c, d);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_gaussian_noise(void* out, const void* mu, const void* var, pgnas_dtype data, int64_t batch,
                                            int64_t channels, int64_t spatial, pgnas_layout layout, uint64_t seed,
                                            uint64_t stream, uint64_t offset, cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, return (launch_noise<data_t, false>(
                                static_cast<data_t*>(out), static_cast<const data_t*>(mu),
                                static_cast<const data_t*>(var), batch, channels, spatial, static_cast<int>(layout),
                                seed, stream, offset, cuda_stream)));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_gaussian_noise_backward(void* grad_var, const void* grad, const void* var,
                                                     pgnas_dtype data, int64_t batch, int64_t channels,
                                                     int64_t spatial, pgnas_layout layout, uint64_t seed,
                                                     uint64_t stream, uint64_t offset, cudaStream_t cuda_stream) {
  if (batch * channels * spatial <= 0) return cudaSuccess;
  PGNAS_DISPATCH_DATA(data, return (launch_noise<data_t, true>(
                                static_cast<data_t*>(grad_var), static_cast<const data_t*>(grad),
                                static_cast<const data_t*>(var), batch, channels, spatial, static_cast<int>(layout),
                                seed, stream, offset, cuda_stream)));
  return cudaSuccess;
}

extern "C" cudaError_t pgnas_gaussian_kl(void* result, int32_t result_double, const pgnas_kl_segment* segments,
                                         int32_t n_segments, cudaStream_t cuda_stream) {
  if (n_segments <= 0) return cudaMemsetAsync(result, 0, result_double ? sizeof(double) : sizeof(float), cuda_stream);
  kl_kernel<<<1, 1024, 0, cuda_stream>>>(result, result_double, segments, n_segments);
  return last_error();
}

extern "C" cudaError_t pgnas_gaussian_kl_backward(const void* grad, int32_t grad_double, void* grads,
                                                  const pgnas_kl_segment* segments, int32_t n_segments,
                                                  int64_t max_channels, cudaStream_t cuda_stream) {
  if (n_segments <= 0 || max_channels <= 0) return cudaSuccess;
  kl_backward_kernel<<<grid_for(max_channels), kThreads, 0, cuda_stream>>>(grad, grad_double, grads, segments,
                                                                           n_segments);
  return last_error();
}
