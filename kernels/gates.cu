// The RNG contract's uniforms and the gates (design.md "RNG contract", "The op set": gate sampling).
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

__global__ void philox_uniform_kernel(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[j] = philox_uniform_at(seed, stream, offset + static_cast<uint64_t>(j));
}

template <typename G>
__device__ __forceinline__ G gate_log(G v);
template <>
__device__ __forceinline__ float gate_log<float>(float v) {
  return logf(v);
}
template <>
__device__ __forceinline__ double gate_log<double>(double v) {
  return log(v);
}
template <typename G>
__device__ __forceinline__ G gate_log1p(G v);
template <>
__device__ __forceinline__ float gate_log1p<float>(float v) {
  return log1pf(v);
}
template <>
__device__ __forceinline__ double gate_log1p<double>(double v) {
  return log1p(v);
}
template <typename G>
__device__ __forceinline__ G gate_exp(G v);
template <>
__device__ __forceinline__ float gate_exp<float>(float v) {
  return expf(v);
}
template <>
__device__ __forceinline__ double gate_exp<double>(double v) {
  return exp(v);
}

// Gate (b, c) is element offset + b * C + c of the stream (offset: rows of a data-parallel shard).
template <typename G>
__global__ void gate_keep_kernel(G* keep, const G* p_logit, const G* drop_prob, int64_t batch, int64_t channels,
                                 uint64_t seed, uint64_t stream, uint64_t offset, G inv_tau, int mode) {
  const int64_t n = batch * channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % channels;
    if (mode == PGNAS_FULL) {
      keep[i] = G(1);
      continue;
    }
    const G u = static_cast<G>(philox_uniform_at(seed, stream, offset + static_cast<uint64_t>(i)));
    if (mode == PGNAS_HARD) {
      keep[i] = (u + drop_prob[c] < G(1)) ? G(1) : G(0);  // drop iff u + p >= 1
    } else {
      const G logistic = gate_log(u) - gate_log1p(-u);
      keep[i] = G(1) / (G(1) + gate_exp((p_logit[c] + logistic) * inv_tau));
    }
  }
}

template <typename G>
__global__ void gate_keep_backward_kernel(G* grad_p, const G* grad_keep, const G* keep, int64_t batch,
                                          int64_t channels, double neg_inv_tau) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double acc = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const double k = static_cast<double>(keep[b * channels + c]);
      acc += static_cast<double>(grad_keep[b * channels + c]) * k * (1.0 - k);
    }
    grad_p[c] = static_cast<G>(acc * neg_inv_tau);
  }
}

template <typename G>
__global__ void candidate_keep_kernel(G* keep, const G* drop_prob, const int64_t* candidates, int64_t n,
                                      int64_t channels, uint64_t seed, int64_t layer, int64_t domain) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = j % channels;
    const uint64_t stream = static_cast<uint64_t>(domain) << 56 |
                            static_cast<uint64_t>(candidates[j / channels]) << 16 | static_cast<uint64_t>(layer);
    const G u = static_cast<G>(philox_uniform_at(seed, stream, static_cast<uint64_t>(c)));
    keep[j] = (u + drop_prob[c] < G(1)) ? G(1) : G(0);
  }
}

template <typename G>
cudaError_t launch_candidate_keep(G* keep, const G* drop_prob, const int64_t* candidates, int64_t n, int64_t channels,
                                  uint64_t seed, int64_t layer, int64_t domain, cudaStream_t cs) {
  candidate_keep_kernel<G><<<grid_for(n), kThreads, 0, cs>>>(keep, drop_prob, candidates, n, channels, seed, layer,
                                                               domain);
  return last_error();
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset,
                                            cudaStream_t cuda_stream) {
  if (n <= 0) return cudaSuccess;
  philox_uniform_kernel<<<grid_for(n), kThreads, 0, cuda_stream>>>(out, n, seed, stream, offset);
  return last_error();
}

extern "C" cudaError_t pgnas_gate_keep(void* keep, const void* p_logit, const void* drop_prob, pgnas_dtype gate,
                                       int64_t batch, int64_t channels, uint64_t seed, uint64_t stream,
                                       uint64_t offset, double tau, pgnas_gate_mode mode, cudaStream_t cuda_stream) {
  const int64_t n = batch * channels;
  if (n <= 0) return cudaSuccess;
  PGNAS_DISPATCH_GATE(gate, (gate_keep_kernel<gate_t><<<grid_for(n), kThreads, 0, cuda_stream>>>(
                                static_cast<gate_t*>(keep), static_cast<const gate_t*>(p_logit),
                                static_cast<const gate_t*>(drop_prob), batch, channels, seed, stream, offset,
                                static_cast<gate_t>(1.0 / tau), static_cast<int>(mode))));
  return last_error();
}

extern "C" cudaError_t pgnas_gate_keep_backward(void* grad_p, const void* grad_keep, const void* keep,
                                                pgnas_dtype gate, int64_t batch, int64_t channels, double tau,
                                                cudaStream_t cuda_stream) {
  if (channels <= 0) return cudaSuccess;
  PGNAS_DISPATCH_GATE(gate, (gate_keep_backward_kernel<gate_t><<<grid_for(channels), kThreads, 0, cuda_stream>>>(
                                static_cast<gate_t*>(grad_p), static_cast<const gate_t*>(grad_keep),
                                static_cast<const gate_t*>(keep), batch, channels, -1.0 / tau)));
  return last_error();
}

extern "C" cudaError_t pgnas_candidate_keep(void* keep, const void* drop_prob, pgnas_dtype gate, const int64_t* candidates,
                                            int64_t count, int64_t channels, uint64_t seed, int64_t layer,
                                            int64_t domain, cudaStream_t cuda_stream) {
  const int64_t n = count * channels;
  if (n <= 0) return cudaSuccess;
  PGNAS_DISPATCH_GATE(gate, return (launch_candidate_keep<gate_t>(static_cast<gate_t*>(keep),
                                                                  static_cast<const gate_t*>(drop_prob), candidates, n,
                                                                  channels, seed, layer, domain, cuda_stream)));
  return cudaSuccess;
}
