// The regulariser over the whole network (design.md "The op set": regulariser, O(1) launches):
// every gated weight is a segment of one table in device memory; warps walk the rows of all segments
// as one index space (apex's multi_tensor_apply habit), so the launch count does not grow with depth.
//   R = weight_reg / n sum_l sum_{o,j,k} (1 - p_c) W^2 + drop_reg / n sum_c H'(p_c),  c = c(o, j).
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

__device__ __forceinline__ double load_logit(const pgnas_reg_segment& s, int64_t c) {
  return load_gate(s.p_logit, s.p_logit_double, c);
}

__device__ __forceinline__ double load_weight(const pgnas_reg_segment& s, int64_t e) {
  switch (s.weight_dtype) {
    case PGNAS_F64:
      return static_cast<const double*>(s.weight)[e];
    case PGNAS_F16:
      return static_cast<double>(__half2float(static_cast<const __half*>(s.weight)[e]));
    case PGNAS_BF16:
      return static_cast<double>(__bfloat162float(static_cast<const __nv_bfloat16*>(s.weight)[e]));
    default:
      return static_cast<double>(static_cast<const float*>(s.weight)[e]);
  }
}

// Element e of segment s's weight gradient, in the flat buffer of all segments' weight gradients.
__device__ __forceinline__ void store_weight(void* grad_weights, const pgnas_reg_segment& s, int64_t e, double v) {
  const int64_t i = s.weight_begin + e;
  switch (s.weight_dtype) {
    case PGNAS_F64:
      static_cast<double*>(grad_weights)[i] = v;
      break;
    case PGNAS_F16:
      static_cast<__half*>(grad_weights)[i] = __double2half(v);
      break;
    case PGNAS_BF16:
      static_cast<__nv_bfloat16*>(grad_weights)[i] = __double2bfloat16(v);
      break;
    default:
      static_cast<float*>(grad_weights)[i] = static_cast<float>(v);
  }
}

// Index of the segment holding global index i, given a member offset (row_begin or channel_begin).
template <typename Begin>
__device__ __forceinline__ int find_segment(const pgnas_reg_segment* segs, int n, int64_t i, Begin begin) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (begin(segs[mid]) <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct RowBegin {
  __device__ int64_t operator()(const pgnas_reg_segment& s) const { return s.row_begin; }
};
struct ChannelBegin {
  __device__ int64_t operator()(const pgnas_reg_segment& s) const { return s.channel_begin; }
};

// Warps of `blocks` blocks from block `first_block` on over the rows of every segment (lanes over a
// row's input positions j): f(segment, offset of W[o, j, 0], input channel c of (o, j)) for each.
template <typename F>
__device__ __forceinline__ void for_each_row_input(const pgnas_reg_segment* segs, int n_segs, int64_t total_rows,
                                                   int64_t first_block, int64_t blocks, F f) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blocks * (blockDim.x >> 5);
  for (int64_t r = (blockIdx.x - first_block) * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5);
       r < total_rows; r += warps) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, r, RowBegin())];
    const int64_t o = r - s.row_begin;
    const int64_t first_channel = (o / (s.out_channels / s.groups)) * s.per_group;
    for (int64_t j = lane; j < s.per_group; j += 32) f(s, (o * s.per_group + j) * s.taps, first_channel + j);
  }
}

__device__ __forceinline__ double log_sigmoid(double z) { return fmin(z, 0.0) - log1p(exp(-fabs(z))); }

// Forward: warps over rows (lanes over the row's input positions j, each summing its taps), then
// threads over channels for the entropy term; one partial sum per block. The last block to finish
// (a ticket on `counter`) adds the partials in a fixed order, so R takes one launch and is
// bit-reproducible run to run (no floating-point atomics); it resets the counter for the next call.
__global__ void regularizer_kernel(void* result, int result_double, double* partials, unsigned int* counter,
                                   const pgnas_reg_segment* segs, int n_segs, int64_t total_rows,
                                   int64_t total_channels, double weight_coef, double drop_coef) {
  double acc = 0;
  for_each_row_input(segs, n_segs, total_rows, 0, gridDim.x, [&](const pgnas_reg_segment& s, int64_t base, int64_t c) {
    double sq = 0;
    for (int64_t k = 0; k < s.taps; ++k) {
      const double w = load_weight(s, base + k);
      sq += w * w;
    }
    acc += weight_coef * sq / (1.0 + exp(load_logit(s, c)));  // (1 - p_c) sq
  });
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < total_channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, c, ChannelBegin())];
    const double z = load_logit(s, c - s.channel_begin);
    const double p = 1.0 / (1.0 + exp(-z));
    // H'(p) from the logit, 1 - p as sigmoid(-z): a subtraction from 1 cancels for p near 1; at p
    // exactly 0 or 1 (z infinite) the limit 0, not 0 * inf
    if (!isinf(z)) acc += drop_coef * (p * log_sigmoid(z) + 1.0 / (1.0 + exp(z)) * log_sigmoid(-z));
  }
  const double total = block_sum(acc);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = total;
    __threadfence();  // the partial is visible device-wide before this block's ticket
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  double sum = 0;
  for (unsigned int i = threadIdx.x; i < gridDim.x; i += blockDim.x) sum += __ldcg(partials + i);  // not via L1
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    store_gate(result, result_double, 0, sum);
    *counter = 0u;
  }
}

// Backward in one launch: the first `channel_blocks` blocks run threads over channels and write
// dR/dz_c = grad p (1 - p) (drop_coef z - weight_coef sq_c), re-reading sq_c (W^2 over the outputs of
// c's group and the taps) from the weights; the others run warps over rows and write grad_w = grad
// 2 weight_coef (1 - p_c) W. The two halves share nothing and need no second launch; the channel
// walks go first because each is the longest work of the launch (a whole weight column), so they
// overlap the row blocks instead of trailing them.
__global__ void regularizer_backward_kernel(const void* grad, int grad_double, void* grad_weights,
                                            void* grad_p_logits, const pgnas_reg_segment* segs, int n_segs,
                                            int64_t total_rows, int64_t total_channels, int channel_blocks,
                                            double weight_coef, double drop_coef) {
  const double g = load_gate(grad, grad_double, 0);
  if (static_cast<int>(blockIdx.x) >= channel_blocks) {
    const double scale = g * 2.0 * weight_coef;
    for_each_row_input(segs, n_segs, total_rows, channel_blocks, gridDim.x - channel_blocks,
                       [&](const pgnas_reg_segment& s, int64_t base, int64_t c) {
      const double factor = scale / (1.0 + exp(load_logit(s, c)));  // (1 - p_c) scale
      for (int64_t k = 0; k < s.taps; ++k) store_weight(grad_weights, s, base + k, factor * load_weight(s, base + k));
    });
    return;
  }
  const int64_t channel_threads = static_cast<int64_t>(channel_blocks) * blockDim.x;
  for (int64_t gc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gc < total_channels;
       gc += channel_threads) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, gc, ChannelBegin())];
    const int64_t c = gc - s.channel_begin;
    const int64_t group = c / s.per_group, j = c % s.per_group, outs = s.out_channels / s.groups;
    double sq = 0;
    for (int64_t o = group * outs; o < (group + 1) * outs; ++o) {
      const int64_t base = (o * s.per_group + j) * s.taps;
      for (int64_t k = 0; k < s.taps; ++k) {
        const double w = load_weight(s, base + k);
        sq += w * w;
      }
    }
    const double z = load_logit(s, c);
    const double p = 1.0 / (1.0 + exp(-z)), keep_prob = 1.0 / (1.0 + exp(z));
    // 0 at an infinite z (p (1 - p) is 0 there; the formula would give 0 * inf)
    const double dz = isinf(z) ? 0.0 : g * p * keep_prob * (drop_coef * z - weight_coef * sq);
    store_gate(grad_p_logits, s.p_logit_double, gc, dz);  // the flat buffer is indexed by the global channel
  }
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_regularizer(void* result, int32_t result_double, double* partials,
                                         unsigned int* counter, const pgnas_reg_segment* segments, int32_t n_segments,
                                         int64_t total_rows, int64_t total_channels, double weight_reg,
                                         double drop_reg, double n_train, cudaStream_t cuda_stream) {
  if (n_segments <= 0) return cudaMemsetAsync(result, 0, result_double ? sizeof(double) : sizeof(float), cuda_stream);
  const int64_t items = total_rows * 32 > total_channels ? total_rows * 32 : total_channels;
  int blocks = grid_for(items);
  if (blocks > PGNAS_REG_MAX_BLOCKS) blocks = PGNAS_REG_MAX_BLOCKS;
  regularizer_kernel<<<blocks, kThreads, 0, cuda_stream>>>(result, result_double, partials, counter, segments,
                                                           n_segments, total_rows, total_channels,
                                                           weight_reg / n_train, drop_reg / n_train);
  return last_error();
}

extern "C" cudaError_t pgnas_regularizer_backward(const void* grad, int32_t grad_double, void* grad_weights,
                                                  void* grad_p_logits, const pgnas_reg_segment* segments,
                                                  int32_t n_segments, int64_t total_rows, int64_t total_channels,
                                                  double weight_reg, double drop_reg, double n_train,
                                                  cudaStream_t cuda_stream) {
  if (n_segments <= 0) return cudaSuccess;
  const int row_blocks = grid_for(total_rows * 32), channel_blocks = grid_for(total_channels);
  regularizer_backward_kernel<<<channel_blocks + row_blocks, kThreads, 0, cuda_stream>>>(
      grad, grad_double, grad_weights, grad_p_logits, segments, n_segments, total_rows, total_channels, channel_blocks,
      weight_reg / n_train, drop_reg / n_train);
  return last_error();
}
