// The regulariser over the whole network (design.md "The op set": regulariser, O(1) launches):
// every gated weight is a segment of one table in device memory; warps walk the rows of all segments
// as one index space (apex's multi_tensor_apply habit), so the launch count does not grow with depth.
//   R = weight_reg / n sum_l sum_{o,j,k} (1 - p_c) W^2 + drop_reg / n sum_c H'(p_c),  c = c(o, j).
#include "common.cuh"

namespace pgnas {
namespace cuda {
namespace {

__device__ __forceinline__ double load_logit(const pgnas_reg_segment& s, int64_t c) {
  return s.p_logit_double ? static_cast<const double*>(s.p_logit)[c]
                          : static_cast<double>(static_cast<const float*>(s.p_logit)[c]);
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

__device__ __forceinline__ void store_weight(const pgnas_reg_segment& s, int64_t e, double v) {
  switch (s.weight_dtype) {
    case PGNAS_F64:
      static_cast<double*>(s.grad_weight)[e] = v;
      break;
    case PGNAS_F16:
      static_cast<__half*>(s.grad_weight)[e] = __double2half(v);
      break;
    case PGNAS_BF16:
      static_cast<__nv_bfloat16*>(s.grad_weight)[e] = __double2bfloat16(v);
      break;
    default:
      static_cast<float*>(s.grad_weight)[e] = static_cast<float>(v);
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

__device__ __forceinline__ double log_sigmoid(double z) { return fmin(z, 0.0) - log1p(exp(-fabs(z))); }

// Forward: warps over rows (lanes over the row's input positions j, each summing its taps), then
// threads over channels for the entropy term; one partial sum per block.
__global__ void regularizer_kernel(double* partials, const pgnas_reg_segment* segs, int n_segs, int64_t total_rows,
                                   int64_t total_channels, double weight_coef, double drop_coef) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  double acc = 0;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < total_rows;
       r += warps) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, r, RowBegin())];
    const int64_t o = r - s.row_begin;
    const int64_t first_channel = (o / (s.out_channels / s.groups)) * s.per_group;
    for (int64_t j = lane; j < s.per_group; j += 32) {
      double sq = 0;
      const int64_t base = (o * s.per_group + j) * s.taps;
      for (int64_t k = 0; k < s.taps; ++k) {
        const double w = load_weight(s, base + k);
        sq += w * w;
      }
      const double keep_prob = 1.0 / (1.0 + exp(load_logit(s, first_channel + j)));
      acc += weight_coef * keep_prob * sq;
    }
  }
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < total_channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, c, ChannelBegin())];
    const double z = load_logit(s, c - s.channel_begin);
    const double p = 1.0 / (1.0 + exp(-z));
    acc += drop_coef * (p * log_sigmoid(z) + (1.0 - p) * log_sigmoid(-z));  // H'(p) from the logit
  }
  const double total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One block adds the partial sums in a fixed order (deterministic, unlike atomics).
__global__ void sum_partials(double* result, const double* partials, int n) {
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) result[0] = total;
}

// Backward, pass 1: grad_w = grad 2 weight_coef (1 - p_c) W, and the sums of squares per (row, j).
__global__ void regularizer_rows_backward(const double* grad, const pgnas_reg_segment* segs, int n_segs,
                                          int64_t total_rows, double* rowsq, double weight_coef) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  const double scale = grad[0] * 2.0 * weight_coef;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); r < total_rows;
       r += warps) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, r, RowBegin())];
    const int64_t o = r - s.row_begin;
    const int64_t first_channel = (o / (s.out_channels / s.groups)) * s.per_group;
    for (int64_t j = lane; j < s.per_group; j += 32) {
      const double factor = scale / (1.0 + exp(load_logit(s, first_channel + j)));
      const int64_t base = (o * s.per_group + j) * s.taps;
      double sq = 0;
      for (int64_t k = 0; k < s.taps; ++k) {
        const double w = load_weight(s, base + k);
        sq += w * w;
        store_weight(s, base + k, factor * w);
      }
      rowsq[s.rowsq_begin + o * s.per_group + j] = sq;
    }
  }
}

// Backward, pass 2: dR/dz_c = grad p (1 - p) (drop_coef z - weight_coef sq_c), sq_c summed over the
// outputs of c's group.
__global__ void regularizer_channels_backward(const double* grad, const pgnas_reg_segment* segs, int n_segs,
                                              int64_t total_channels, const double* rowsq, double weight_coef,
                                              double drop_coef) {
  for (int64_t gc = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gc < total_channels;
       gc += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const pgnas_reg_segment s = segs[find_segment(segs, n_segs, gc, ChannelBegin())];
    const int64_t c = gc - s.channel_begin;
    const int64_t g = c / s.per_group, j = c % s.per_group, outs = s.out_channels / s.groups;
    double sq = 0;
    for (int64_t o = g * outs; o < (g + 1) * outs; ++o) sq += rowsq[s.rowsq_begin + o * s.per_group + j];
    const double z = load_logit(s, c);
    const double p = 1.0 / (1.0 + exp(-z)), keep_prob = 1.0 / (1.0 + exp(z));
    const double dz = grad[0] * p * keep_prob * (drop_coef * z - weight_coef * sq);
    if (s.p_logit_double) {
      static_cast<double*>(s.grad_p_logit)[c] = dz;
    } else {
      static_cast<float*>(s.grad_p_logit)[c] = static_cast<float>(dz);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace pgnas

using namespace pgnas::cuda;

extern "C" cudaError_t pgnas_regularizer(double* result, double* partials, const pgnas_reg_segment* segments,
                                         int32_t n_segments, int64_t total_rows, int64_t total_channels,
                                         double weight_reg, double drop_reg, double n_train,
                                         cudaStream_t cuda_stream) {
  if (n_segments <= 0) return cudaMemsetAsync(result, 0, sizeof(double), cuda_stream);
  const int64_t items = total_rows * 32 > total_channels ? total_rows * 32 : total_channels;
  int blocks = grid_for(items);
  if (blocks > PGNAS_REG_MAX_BLOCKS) blocks = PGNAS_REG_MAX_BLOCKS;
  regularizer_kernel<<<blocks, kThreads, 0, cuda_stream>>>(partials, segments, n_segments, total_rows,
                                                           total_channels, weight_reg / n_train, drop_reg / n_train);
  const cudaError_t err = last_error();
  if (err != cudaSuccess) return err;
  sum_partials<<<1, kThreads, 0, cuda_stream>>>(result, partials, blocks);
  return last_error();
}

extern "C" cudaError_t pgnas_regularizer_backward(const double* grad, const pgnas_reg_segment* segments,
                                                  int32_t n_segments, int64_t total_rows, int64_t total_channels,
                                                  double* rowsq, double weight_reg, double drop_reg, double n_train,
                                                  cudaStream_t cuda_stream) {
  if (n_segments <= 0) return cudaSuccess;
  regularizer_rows_backward<<<grid_for(total_rows * 32), kThreads, 0, cuda_stream>>>(
      grad, segments, n_segments, total_rows, rowsq, weight_reg / n_train);
  cudaError_t err = last_error();
  if (err != cudaSuccess) return err;
  regularizer_channels_backward<<<grid_for(total_channels), kThreads, 0, cuda_stream>>>(
      grad, segments, n_segments, total_channels, rowsq, weight_reg / n_train, drop_reg / n_train);
  return last_error();
}
