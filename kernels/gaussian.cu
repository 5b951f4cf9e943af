// The Gaussian posterior family (design.md "Gaussian family"):
//   gaussian_noise: out = mu + sqrt(max(var, 0) + 1e-8) eps, the local-reparameterization epilogue, and
//   its backward d var = grad eps / (2 sqrt(var + 1e-8)) where var > 0 (eps regenerated, never stored);
//   gaussian_kl: the whole network's Molchanov KL over a segment table, O(1) launches.
// eps of the element at logical (row-major) index i is lane j % 4 of philox_normal_quad(seed, stream, j / 4),
// j = offset + i (philox_normal_at(seed, stream, j) alone). One Philox call serves a whole quad wherever a
// thread can hold its four elements: dense data, and channels_last when S % 4 == 0 and offset % 4 == 0.
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

// ---- which elements a thread takes: index math only, callable on the host to check it without a GPU ----

// Philox counter of the quad whose lane 0 is element e0 (offset + e0 a multiple of 4; e0 < 0 for a first
// quad that starts before the tensor). Unsigned arithmetic wraps as philox_normal_at(offset + i)'s does.
__host__ __device__ __forceinline__ uint64_t quad_counter(uint64_t offset, int64_t e0) {
  return (offset + static_cast<uint64_t>(e0)) >> 2;
}

// Dense data (the logical index is the memory index e): quad r of the call holds e = 4 r - lead ..
// 4 r - lead + 3, lead = offset % 4; only those in [0, n) exist.
struct DenseQuads {
  int64_t lead, count;

  __host__ __device__ __forceinline__ DenseQuads(int64_t n, uint64_t offset)
      : lead(static_cast<int64_t>(offset & 3)), count(n / 4 + (n % 4 + lead + 3) / 4) {}

  __host__ __device__ __forceinline__ int64_t first_element(int64_t r) const { return 4 * r - lead; }
};

// Elements a packed dense step takes: whole 16-byte packs and whole quads (float: 1 pack, 1 quad;
// half/bf16: 1 pack, 2 quads; double: 2 packs, 1 quad).
template <typename T>
constexpr int kGroup = Pack<T>::kSize > 4 ? Pack<T>::kSize : 4;

// channels_last [B, S, C] with S % 4 == 0 and offset % 4 == 0: an item is (b, position quad p, c), walked
// as position p of a [B, S / 4, C] channels_last grid `w` (channel fastest: a warp's loads of one position
// are coalesced). Its lane l is position 4 p + l of gate g = b C + c: logical g S + 4 p + l (the lanes of
// one Philox quad) and memory (b S + 4 p + l) C + c (lane 0's plus l C).
struct ChannelsLastQuad {
  int64_t memory, logical;  // of lane 0

  __host__ __device__ __forceinline__ ChannelsLastQuad(const Where<true>& w, int64_t channels, int64_t spatial)
      : memory((w.g - w.c) * spatial + 4 * w.s * channels + w.c), logical(w.g * spatial + 4 * w.s) {}
};

// Logical index of the channels_last element at `w` (position s of gate g = b C + c).
__host__ __device__ __forceinline__ int64_t channels_last_logical(const Where<true>& w, int64_t spatial) {
  return w.g * spatial + w.s;
}

// ---- the epilogue ----

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

// noise_element on T data (math in float, double for double data).
template <typename T, bool kBackward>
__device__ __forceinline__ T noise_value(T first, T v, float eps) {
  using A = typename AccOf<T, float>::type;
  return narrow<T>(noise_element<A, kBackward>(widen<A>(first), widen<A>(v), eps));
}

// Dense data. Packed (offset % 4 == 0, 16-byte aligned pointers): kGroup elements per step, loaded and
// stored as packs; the < kGroup last elements, or all of them when not packed, one quad per step.
template <typename T, bool kBackward>
__global__ void dense_noise_kernel(T* __restrict__ out, const T* __restrict__ first, const T* __restrict__ var,
                                   int64_t n, uint64_t seed, uint64_t stream, uint64_t offset, bool packed) {
  constexpr int V = Pack<T>::kSize, L = kGroup<T>, P = L / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t groups = packed ? n / L : 0;
  for (int64_t k = start; k < groups; k += stride) {
    Pack<T> a[P], v[P], res[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      a[p] = reinterpret_cast<const Pack<T>*>(first)[k * P + p];
      v[p] = reinterpret_cast<const Pack<T>*>(var)[k * P + p];
    }
#pragma unroll
    for (int q = 0; q < L / 4; ++q) {
      const Normal4 eps = philox_normal_quad(seed, stream, quad_counter(offset, k * L + 4 * q));
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int i = 4 * q + l;  // element k L + i: lane i % V of pack i / V
        res[i / V].v[i % V] = noise_value<T, kBackward>(a[i / V].v[i % V], v[i / V].v[i % V], eps.v[l]);
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p) reinterpret_cast<Pack<T>*>(out)[k * P + p] = res[p];
  }
  const DenseQuads quads(n, offset);  // lead is 0 when packed: quad groups * L / 4 starts at element groups * L
  for (int64_t r = groups * (L / 4) + start; r < quads.count; r += stride) {
    const int64_t e0 = quads.first_element(r);
    const Normal4 eps = philox_normal_quad(seed, stream, quad_counter(offset, e0));
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t e = e0 + l;
      if (e >= 0 && e < n) out[e] = noise_value<T, kBackward>(first[e], var[e], eps.v[l]);
    }
  }
}

// channels_last, S % 4 == 0 and offset % 4 == 0: one ChannelsLastQuad per step, its 4 positions loaded
// before the Philox call so that the loads are in flight during it.
template <typename T, bool kBackward>
__global__ void channels_last_quad_kernel(T* __restrict__ out, const T* __restrict__ first,
                                          const T* __restrict__ var, int64_t items, int64_t channels,
                                          int64_t spatial, uint64_t seed, uint64_t stream, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t quads = spatial / 4;  // position quads per example
  Where<true> where = Where<true>::at(start, channels, quads);
  const Where<true> step = Where<true>::at(stride, channels, quads);
  for (int64_t t = start; t < items; t += stride) {
    const ChannelsLastQuad q(where, channels, spatial);
    T a[4], v[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      a[l] = first[q.memory + l * channels];
      v[l] = var[q.memory + l * channels];
    }
    const Normal4 eps = philox_normal_quad(seed, stream, quad_counter(offset, q.logical));
#pragma unroll
    for (int l = 0; l < 4; ++l) out[q.memory + l * channels] = noise_value<T, kBackward>(a[l], v[l], eps.v[l]);
    where.advance(step, channels, quads);
  }
}

// Any other channels_last tensor: a quad's elements sit C apart in memory, or straddle (b, c) rows, so
// each element draws its own normal.
template <typename T, bool kBackward>
__global__ void channels_last_noise_kernel(T* __restrict__ out, const T* __restrict__ first,
                                           const T* __restrict__ var, int64_t n, int64_t channels, int64_t spatial,
                                           uint64_t seed, uint64_t stream, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  Where<true> where = Where<true>::at(start, channels, spatial);
  const Where<true> step = Where<true>::at(stride, channels, spatial);
  for (int64_t e = start; e < n; e += stride) {
    const uint64_t j = offset + static_cast<uint64_t>(channels_last_logical(where, spatial));
    out[e] = noise_value<T, kBackward>(first[e], var[e], philox_normal_at(seed, stream, j));
    where.advance(step, channels, spatial);
  }
}

template <typename T, bool kBackward>
cudaError_t launch_noise(T* out, const T* first, const T* var, int64_t batch, int64_t channels, int64_t spatial,
                         int layout, uint64_t seed, uint64_t stream, uint64_t offset, cudaStream_t cs) {
  const int64_t n = batch * channels * spatial;
  if (layout == PGNAS_NCHW || channels == 1 || spatial == 1) {  // channels_last [B, S, 1], [B, 1, C]: row-major
    const bool packed = offset % 4 == 0 && aligned16(out) && aligned16(first) && aligned16(var);
    const int64_t items = packed ? (n - 1) / kGroup<T> + 1 : DenseQuads(n, offset).count;
    dense_noise_kernel<T, kBackward><<<grid_for(items), kThreads, 0, cs>>>(out, first, var, n, seed, stream, offset,
                                                                            packed);
  } else if (spatial % 4 == 0 && offset % 4 == 0) {
    channels_last_quad_kernel<T, kBackward><<<grid_for(n / 4), kThreads, 0, cs>>>(out, first, var, n / 4, channels,
                                                                                   spatial, seed, stream, offset);
  } else {
    channels_last_noise_kernel<T, kBackward><<<grid_for(n), kThreads, 0, cs>>>(out, first, var, n, channels, spatial,
                                                                                seed, stream, offset);
  }
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
