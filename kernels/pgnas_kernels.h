/* C ABI of the `cuda` backend's kernels (the .cu files of kernels/), design.md layer 6.
 *
 * Raw device pointers and sizes, no torch: csrc/cuda/ops.cpp validates tensors and calls these; any
 * other frontend can too. Every launcher enqueues on `cuda_stream` and returns the CUDA error of its
 * launch (cudaSuccess when fine). Data: float32/float64/float16/bfloat16 (pgnas_dtype); gate math in
 * float32, or float64 for float64 gates (the gradcheck path). Dense NCHW ([B, C, S]) or channels_last
 * ([B, S, C]) tensors only. `stream`/`seed` are the RNG contract's (Philox key and counter words).
 */
#ifndef PGNAS_KERNELS_H
#define PGNAS_KERNELS_H

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { PGNAS_F32 = 0, PGNAS_F64 = 1, PGNAS_F16 = 2, PGNAS_BF16 = 3 } pgnas_dtype;
typedef enum { PGNAS_RELAXED = 0, PGNAS_HARD = 1, PGNAS_FULL = 2 } pgnas_gate_mode;
typedef enum { PGNAS_NCHW = 0, PGNAS_NHWC = 1 } pgnas_layout;

/* out[j] = u of element offset + j, j < n (float32). */
cudaError_t pgnas_philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset,
                                 cudaStream_t cuda_stream);

/* keep [B, C] (gate dtype) from p_logit [C]; drop_prob [C] = sigmoid(p_logit), read by `hard` only.
 * Gate (b, c) uses element offset + b * C + c of the stream (offset + B * C <= 2^63). */
cudaError_t pgnas_gate_keep(void* keep, const void* p_logit, const void* drop_prob, pgnas_dtype gate, int64_t batch,
                            int64_t channels, uint64_t seed, uint64_t stream, uint64_t offset, double tau,
                            pgnas_gate_mode mode, cudaStream_t cuda_stream);

/* Hard masks of `count` candidates, keep [count, C] (gate dtype): 0 iff u + drop_prob[c] >= 1, u of element c of
 * stream domain << 56 | candidates[k] << 16 | layer; candidates: device int64 ids. */
cudaError_t pgnas_candidate_keep(void* keep, const void* drop_prob, pgnas_dtype gate, const int64_t* candidates,
                                 int64_t count, int64_t channels, uint64_t seed, int64_t layer, int64_t domain,
                                 cudaStream_t cuda_stream);

/* grad_p [C] = -(1/tau) sum_b grad_keep keep (1 - keep) (the relaxed gate's derivative). */
cudaError_t pgnas_gate_keep_backward(void* grad_p, const void* grad_keep, const void* keep, pgnas_dtype gate,
                                     int64_t batch, int64_t channels, double tau, cudaStream_t cuda_stream);

/* out = x * keep[b, c]; x has B * C * S elements in `layout`. */
cudaError_t pgnas_gated_apply(void* out, const void* x, pgnas_dtype data, const void* keep, pgnas_dtype gate,
                              int64_t batch, int64_t channels, int64_t spatial, pgnas_layout layout,
                              cudaStream_t cuda_stream);

/* grad_x = grad * keep; grad_keep [B, C] (gate dtype; NULL to skip) = sum_s grad * x. */
cudaError_t pgnas_gated_apply_backward(void* grad_x, void* grad_keep, const void* grad, const void* x, pgnas_dtype data,
                                       const void* keep, pgnas_dtype gate, int64_t batch, int64_t channels,
                                       int64_t spatial, pgnas_layout layout, cudaStream_t cuda_stream);

/* Fused BN affine -> ReLU -> gate: out = relu(x * scale[c] + shift[c]) * keep[b, c]; scale, shift [C] and
 * keep [B, C] in the gate dtype. */
cudaError_t pgnas_affine_relu_gate(void* out, const void* x, pgnas_dtype data, const void* scale, const void* shift,
                                   const void* keep, pgnas_dtype gate, int64_t batch, int64_t channels,
                                   int64_t spatial, pgnas_layout layout, cudaStream_t cuda_stream);

/* Its backward: live = grad * keep where x * scale + shift > 0; grad_x = live * scale; per (b, c), in
 * the gate dtype: row_scale = sum_s live * x, row_shift = sum_s live, grad_keep (NULL to skip) =
 * sum_s grad * relu(x * scale + shift). */
cudaError_t pgnas_affine_relu_gate_backward(void* grad_x, void* row_scale, void* row_shift, void* grad_keep,
                                            const void* grad, const void* x, pgnas_dtype data, const void* scale,
                                            const void* shift, const void* keep, pgnas_dtype gate, int64_t batch,
                                            int64_t channels, int64_t spatial, pgnas_layout layout,
                                            cudaStream_t cuda_stream);

/* The most copies one gated_copies call makes (the cpu backend's kernels share the limit). */
#define PGNAS_MAX_COPIES 16

/* One input -> K gated copies (1 <= K <= PGNAS_MAX_COPIES): out[k] = src * keeps[k][b, c], src = relu(x) when relu else x;
 * keeps [K, B, C] (gate dtype), out [K, B * C * S] (each copy in x's layout). */
cudaError_t pgnas_gated_copies(void* out, const void* x, pgnas_dtype data, const void* keeps, pgnas_dtype gate,
                               int32_t copies, int64_t batch, int64_t channels, int64_t spatial, int32_t relu,
                               pgnas_layout layout, cudaStream_t cuda_stream);

/* Its backward: grad_x = relu'(x) sum_k grad[k] keep_k (or without relu'); grad_keeps [K, B, C] (NULL to
 * skip) = sum_s grad[k] * src. */
cudaError_t pgnas_gated_copies_backward(void* grad_x, void* grad_keeps, const void* grad, const void* x,
                                        pgnas_dtype data, const void* keeps, pgnas_dtype gate, int32_t copies,
                                        int64_t batch, int64_t channels, int64_t spatial, int32_t relu,
                                        pgnas_layout layout, cudaStream_t cuda_stream);

/* out[b, e] = sum_s w[b, s] ys[s][b, e] (+ skip[b, e]); ys: host array of n_branches device pointers;
 * weights [B, S] when per_example else [S] (float32 or float64); skip may be NULL. */
cudaError_t pgnas_branch_combine(void* out, const void* const* ys, int32_t n_branches, pgnas_dtype data,
                                 const void* weights, pgnas_dtype weight_dtype, int32_t per_example, const void* skip,
                                 int64_t batch, int64_t per_batch, cudaStream_t cuda_stream);

/* Branches one branch_combine forward and one backward launch take (more: one launch per this many;
 * the forward's later launches add onto the data-dtype output), and the most blocks one backward
 * launch spreads over the examples beyond one per example. */
#define PGNAS_COMBINE_FORWARD_BRANCHES_PER_LAUNCH 16
#define PGNAS_COMBINE_BRANCHES_PER_LAUNCH 8
#define PGNAS_COMBINE_FILL_BLOCKS 4096
/* Doubles of pgnas_branch_combine_backward's `partials` for `batch` examples and n_branches: one per
 * block and branch of one launch (at most PGNAS_COMBINE_FILL_BLOCKS + batch blocks). */
#define PGNAS_COMBINE_PARTIALS(batch, n_branches)                                                        \
  ((int64_t)((n_branches) < PGNAS_COMBINE_BRANCHES_PER_LAUNCH ? (n_branches)                            \
                                                              : PGNAS_COMBINE_BRANCHES_PER_LAUNCH) *     \
   ((int64_t)PGNAS_COMBINE_FILL_BLOCKS + (int64_t)(batch)))

/* grad_ys[s] = grad * wb[., s]; grad_w (NULL to skip; every entry written, no zeroing needed) = sums
 * of grad * ys[s] per example (per_example) or overall, bit-reproducible run to run: per-block partial
 * sums into `partials` (device, at least PGNAS_COMBINE_PARTIALS(batch, n_branches) doubles), which the
 * last block of each launch to finish (a ticket on `counter`, a device int32 that must be 0 and is left
 * 0) adds in a fixed order; no floating-point atomics. partials and counter may be NULL when grad_w is.
 * Calls running at once need their own partials and counters. batch <= 65535. grad_ys, ys: host
 * arrays of device pointers. */
cudaError_t pgnas_branch_combine_backward(void* const* grad_ys, void* grad_w, double* partials, unsigned int* counter,
                                          const void* grad, const void* const* ys, int32_t n_branches,
                                          pgnas_dtype data, const void* wb, pgnas_dtype weight_dtype,
                                          int32_t per_example, int64_t batch, int64_t per_batch,
                                          cudaStream_t cuda_stream);

/* One gated weight of the regulariser: weight [O, per_group, taps] (row o reads input channels
 * (o / (O / groups)) * per_group + j) with p_logit [groups * per_group]. The table lives in device
 * memory; rows, weight elements and channels of all segments form index spaces of their own (the
 * *_begin fields, prefix sums), so the whole network takes O(1) launches whatever its depth. The
 * table holds no gradient address: the backward writes flat buffers at weight_begin and channel_begin,
 * so a table depends only on the parameters and can be kept across calls. */
typedef struct {
  const void* weight;
  const void* p_logit;
  int32_t weight_dtype; /* pgnas_dtype */
  int32_t p_logit_double;
  int64_t out_channels, per_group, taps, groups;
  int64_t row_begin, weight_begin, channel_begin;
} pgnas_reg_segment;

/* Blocks of the regulariser's first pass: `partials` holds at least this many doubles. */
#define PGNAS_REG_MAX_BLOCKS 1024

/* *result (device; float64 if result_double, else float32) = R, in one launch: per-block partial sums
 * into `partials`, and the last block to finish (a ticket on `counter`, a device int32 that must be 0
 * and is left 0) adds them in a fixed order, so R is bit-reproducible run to run (no floating-point
 * atomics). Calls running at once need their own counters. */
cudaError_t pgnas_regularizer(void* result, int32_t result_double, double* partials, unsigned int* counter,
                              const pgnas_reg_segment* segments, int32_t n_segments, int64_t total_rows,
                              int64_t total_channels, double weight_reg, double drop_reg, double n_train,
                              cudaStream_t cuda_stream);

/* Writes every weight's and p_logit's gradient in one launch, into flat buffers: grad_weights [elements
 * of all segments] (the segments' weight dtype, which they must share) and grad_p_logits [total_channels]
 * (float64 if the p_logits are, which they must all be or none); grad: device scalar dL/dR (float64 if
 * grad_double, else float32). */
cudaError_t pgnas_regularizer_backward(const void* grad, int32_t grad_double, void* grad_weights, void* grad_p_logits,
                                       const pgnas_reg_segment* segments, int32_t n_segments, int64_t total_rows,
                                       int64_t total_channels, double weight_reg, double drop_reg, double n_train,
                                       cudaStream_t cuda_stream);

/* ---- the Gaussian family ----
 * eps of the element at logical (row-major) index i: with j = offset + i, lane j mod 4 of the four
 * normals of Philox counter j div 4 (philox.h philox_normal_quad; philox_normal_at for one element). Data dense row-major (PGNAS_NCHW: any rank, batch * channels
 * * spatial elements) or channels_last (PGNAS_NHWC: memory [B, S, C] of the logical [B, C, S]); all
 * tensors of a call share the layout. Math in float32, float64 for float64 data. */

/* out = mu + sqrt(max(var, 0) + 1e-8) eps. */
cudaError_t pgnas_gaussian_noise(void* out, const void* mu, const void* var, pgnas_dtype data, int64_t batch,
                                 int64_t channels, int64_t spatial, pgnas_layout layout, uint64_t seed,
                                 uint64_t stream, uint64_t offset, cudaStream_t cuda_stream);

/* grad_var = grad eps / (2 sqrt(var + 1e-8)) where var > 0, else 0 (eps regenerated). */
cudaError_t pgnas_gaussian_noise_backward(void* grad_var, const void* grad, const void* var, pgnas_dtype data,
                                          int64_t batch, int64_t channels, int64_t spatial, pgnas_layout layout,
                                          uint64_t seed, uint64_t stream, uint64_t offset, cudaStream_t cuda_stream);

/* One gated layer of the KL: log_alpha [channels] (float32, or float64 when is_double); scale =
 * weights_per_channel / n_train. The table lives in device memory and, as the regulariser's, holds no
 * gradient address. */
typedef struct {
  const void* log_alpha;
  int32_t is_double;
  int32_t reserved;
  int64_t channels;
  int64_t channel_begin; /* the segment's first channel in the flat gradient (backward) */
  double scale;
} pgnas_kl_segment;

/* *result (device; float64 if result_double, else float32) = sum_l scale_l sum_c (K1 - K1 sigmoid(K2 +
 * K3 a) + 0.5 softplus(-a)). One launch, one block, fixed summation order (bit-reproducible). */
cudaError_t pgnas_gaussian_kl(void* result, int32_t result_double, const pgnas_kl_segment* segments,
                              int32_t n_segments, cudaStream_t cuda_stream);

/* Writes every log alpha's gradient, dL/dKL (device scalar, float64 if grad_double, else float32) *
 * scale_l * dKL/da, into the flat buffer grads [all segments' channels] (at channel_begin; float64 if
 * the log alphas are, which they must all be or none). max_channels: the largest layer (sizes the
 * grid). One launch. */
cudaError_t pgnas_gaussian_kl_backward(const void* grad, int32_t grad_double, void* grads,
                                       const pgnas_kl_segment* segments, int32_t n_segments, int64_t max_channels,
                                       cudaStream_t cuda_stream);

#ifdef __cplusplus
}
#endif

#endif /* PGNAS_KERNELS_H */
