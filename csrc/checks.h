// Argument checks shared by the `cpu` and `cuda` bindings: every message names the argument and says
// what was expected. pgnas_fast.ops validates the public API before any backend runs; these guard the
// raw `pgnas_fast._C` entry points (called directly, from tests, or by another frontend), so that no
// kernel ever sees a pointer it would misread.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/gaussian.h"
#include "cpu/kernels.h"

namespace pgnas {

inline std::string dtype_name(c10::ScalarType t) { return c10::toString(t); }

inline void check_device(const char* name, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, " must be a ", c10::DeviceTypeName(type, false),
                    " tensor, got one on ", t.device().str());
}

inline void check_same_device(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device().str(), " but ", ref_name, " is on ",
                    ref.device().str());
}

inline void check_data_dtype(const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, name,
                   " must have dtype in (float32, float16, bfloat16, float64), got ", dtype_name(d));
}

inline void check_gate_dtype(const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble, name, " must have dtype in (float32, float64), got ",
                   dtype_name(d));
}

inline void check_vector(const char* name, const at::Tensor& t, int64_t length) {
  TORCH_CHECK_VALUE(t.dim() == 1 && (length < 0 || t.size(0) == length), name, " must have shape [",
                    length < 0 ? std::string("C") : std::to_string(length), "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_rng(int64_t seed, int64_t stream) {
  TORCH_CHECK_VALUE(seed >= 0, "seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(stream >= 0, "stream must be in [0, 2^63), got ", stream);
}

inline void check_tau(double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be a finite number > 0, got ", tau);
}

inline cpu::GateMode parse_mode(const std::string& mode) {
  if (mode == "relaxed") return cpu::GateMode::relaxed;
  if (mode == "hard") return cpu::GateMode::hard;
  if (mode == "full") return cpu::GateMode::full;
  TORCH_CHECK_VALUE(false, "mode must be one of relaxed, hard, full; got '", mode, "'");
}

// The kernels read dense NCHW ([B, C, S]) or, for 4-D tensors, dense channels_last ([B, S, C]).
// pgnas_fast.cpu_backend / cuda_backend bring any other strided view to one of these once.
inline cpu::Layout check_layout(const char* name, const at::Tensor& t) {
  if (t.is_contiguous()) return cpu::Layout::nchw;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return cpu::Layout::nhwc;
  TORCH_CHECK_VALUE(false, name, " must be contiguous or channels_last (4-D), got shape ", t.sizes(), " strides ",
                    t.strides());
}

// Whether t (of ref's shape) puts every element at ref's address: the strides agree in every dim of
// size > 1 (a size-1 dim's stride is never used, and dense tensors from torch differ there).
inline bool same_memory_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.numel() == 0) return true;  // an empty tensor has no layout
  for (int64_t d = 0; d < ref.dim(); ++d)
    if (ref.size(d) > 1 && t.stride(d) != ref.stride(d)) return false;
  return true;
}

// t has ref's shape, dtype and memory layout (the layout of an empty tensor is not compared: it has none).
inline void check_shaped_like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(same_memory_layout(t, ref), name, " must have the memory layout of ", ref_name, " (strides ",
                    ref.strides(), "), got strides ", t.strides());
}

inline void check_like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  check_shaped_like(name, t, ref_name, ref);
  check_same_device(name, t, ref_name, ref);
}

// affine_relu_gate's scale or shift: [C] with p_logit's dtype and device.
inline void check_affine_vector(const char* name, const at::Tensor& t, const at::Tensor& p_logit) {
  check_same_device(name, t, "p_logit", p_logit);
  TORCH_CHECK_TYPE(t.scalar_type() == p_logit.scalar_type(), name, " must have the dtype of p_logit (",
                   dtype_name(p_logit.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  check_vector(name, t, p_logit.size(0));
}

// gated_copies: p_logits [K, C] (one row per copy, 1 <= K <= max_copies) and K streams.
inline void check_copies(const at::Tensor& x, const at::Tensor& p_logits, const std::vector<int64_t>& streams,
                         int64_t max_copies) {
  check_same_device("p_logits", p_logits, "x", x);
  check_gate_dtype("p_logits", p_logits);
  const int64_t copies = static_cast<int64_t>(streams.size());
  TORCH_CHECK_VALUE(copies >= 1 && copies <= max_copies, "streams must name 1 to ", max_copies, " copies, got ",
                    copies);
  TORCH_CHECK_VALUE(p_logits.dim() == 2 && p_logits.size(0) == copies && p_logits.size(1) == x.size(1) &&
                        p_logits.is_contiguous(),
                    "p_logits must be a contiguous [", copies, ", ", x.size(1), "] tensor, got shape ",
                    p_logits.sizes());
  for (const int64_t stream : streams) TORCH_CHECK_VALUE(stream >= 0, "streams must be in [0, 2^63), got ", stream);
}

// [copies, *x.shape] with each copy in x's layout (what gated_copies returns; its gradient must match),
// on x's device or, for a check of shape and layout only, on the meta device (no memory).
inline at::Tensor stacked_empty_like(const at::Tensor& x, int64_t copies, cpu::Layout layout, bool meta = false) {
  const at::TensorOptions options = meta ? x.options().device(at::kMeta) : x.options();
  if (layout == cpu::Layout::nhwc)
    return at::empty({copies, x.size(0), x.size(2), x.size(3), x.size(1)}, options).permute({0, 1, 4, 2, 3});
  std::vector<int64_t> sizes{copies};
  sizes.insert(sizes.end(), x.sizes().begin(), x.sizes().end());
  return at::empty(sizes, options);
}

// gated_copies_backward's grad: the stacked copies' shape, dtype and layout, on x's device.
inline void check_copies_grad(const at::Tensor& grad, const at::Tensor& x, int64_t copies, cpu::Layout layout) {
  check_shaped_like("grad", grad, "the stacked copies", stacked_empty_like(x, copies, layout, /*meta=*/true));
  check_same_device("grad", grad, "x", x);
}

// weights [B, S] (per example) or [S] (per branch); returns whether it is per example
inline bool check_branch_weights(const char* name, const at::Tensor& w, int64_t batch, int64_t n_branches) {
  check_gate_dtype(name, w);
  const bool per_example = w.dim() == 2 && w.size(0) == batch && w.size(1) == n_branches;
  const bool per_branch = w.dim() == 1 && w.size(0) == n_branches;
  TORCH_CHECK_VALUE(per_example || per_branch, name, " must have shape [", batch, ", ", n_branches,
                    "] (per example) or [", n_branches, "] (per branch), got ", w.sizes());
  TORCH_CHECK_VALUE(w.is_contiguous(), name, " must be contiguous");
  return per_example;
}

inline void check_branches(const std::vector<at::Tensor>& ys, c10::DeviceType type) {
  TORCH_CHECK_VALUE(!ys.empty(), "ys must be a non-empty list of tensors");
  check_device("ys[0]", ys[0], type);
  check_data_dtype("ys[0]", ys[0]);
  TORCH_CHECK_VALUE(ys[0].dim() >= 1, "ys[0] must have at least 1 dim");
  check_layout("ys[0]", ys[0]);
  for (size_t s = 1; s < ys.size(); ++s) {
    const std::string name = "ys[" + std::to_string(s) + "]";
    check_like(name.c_str(), ys[s], "ys[0]", ys[0]);
  }
}

// A weight [O, C_in / G, ...] and its p_logit [C_in]; returns (groups, per_group, taps).
inline void check_gated_weight(size_t k, const at::Tensor& w, const at::Tensor& p, c10::DeviceType type,
                               int64_t* groups, int64_t* per_group, int64_t* taps) {
  const std::string wn = "weights[" + std::to_string(k) + "]", pn = "p_logits[" + std::to_string(k) + "]";
  check_device(wn.c_str(), w, type);
  check_data_dtype(wn.c_str(), w);
  TORCH_CHECK_VALUE(w.dim() >= 2, wn, " must have at least 2 dims, got shape ", w.sizes());
  TORCH_CHECK_VALUE(w.is_contiguous(), wn, " must be contiguous");
  check_same_device(pn.c_str(), p, wn.c_str(), w);
  check_gate_dtype(pn.c_str(), p);
  check_vector(pn.c_str(), p, -1);
  const int64_t in_channels = p.size(0), out_channels = w.size(0);
  TORCH_CHECK_VALUE(out_channels > 0, wn, " must have at least one output channel, got shape ", w.sizes());
  *per_group = w.size(1);
  TORCH_CHECK_VALUE(*per_group > 0 && in_channels % *per_group == 0 && in_channels > 0 &&
                        out_channels % (in_channels / *per_group) == 0,
                    pn, " has ", in_channels, " channels, which does not fit ", wn, " of shape ", w.sizes(),
                    ": expected C_in = groups * ", *per_group, " with groups dividing ", out_channels);
  *groups = in_channels / *per_group;
  *taps = *per_group ? w.numel() / (out_channels * *per_group) : 0;
}

// ---- per-op argument checks: the same for every device type ------------------------------------

inline void check_philox_out(const at::Tensor& out, int64_t seed, int64_t stream, int64_t offset,
                             c10::DeviceType type) {
  check_device("out", out, type);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "out must be float32, got ", dtype_name(out.scalar_type()));
  TORCH_CHECK_VALUE(out.dim() == 1 && out.is_contiguous(), "out must be a contiguous 1-D tensor");
  check_rng(seed, stream);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be in [0, 2^63), got ", offset);
}

// gate_keep / gated_apply: gate (b, c) uses element offset + b * C + c, so offset + B * C <= 2^63.
inline void check_gate_offset(int64_t offset, int64_t n_gates) {
  TORCH_CHECK_VALUE(offset >= 0, "offset must be in [0, 2^63), got ", offset);
  TORCH_CHECK_VALUE(n_gates == 0 || n_gates - 1 <= INT64_MAX - offset,
                    "offset + batch * C must be <= 2^63, got offset ", offset, " and batch * C = ", n_gates);
}

inline void check_p_logit(const at::Tensor& p_logit, int64_t channels, c10::DeviceType type) {
  check_device("p_logit", p_logit, type);
  check_gate_dtype("p_logit", p_logit);
  check_vector("p_logit", p_logit, channels);
}

// candidate_keep: ids int64 [K] in [0, 2^40), layer in [0, 2^16), domain in [0, 2^8) (ops/streams.py).
// The ids' range is checked here on the CPU only: on a GPU it would read them back, a host sync per
// gate layer; pgnas_fast.ops.candidate_keep checks it before they are copied there, and an id out of
// range only names another stream (no out-of-bounds access).
inline void check_candidates(const at::Tensor& p_logit, const at::Tensor& candidates, int64_t seed, int64_t layer,
                             int64_t domain, c10::DeviceType type) {
  check_p_logit(p_logit, -1, type);
  check_same_device("candidates", candidates, "p_logit", p_logit);
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kLong, "candidates must have dtype int64, got ",
                   dtype_name(candidates.scalar_type()));
  TORCH_CHECK_VALUE(candidates.dim() == 1 && candidates.is_contiguous(), "candidates must be a contiguous 1-D tensor");
  if (candidates.numel() > 0 && candidates.is_cpu())
    TORCH_CHECK_VALUE(candidates.min().item<int64_t>() >= 0 && candidates.max().item<int64_t>() < (int64_t{1} << 40),
                      "candidates must be ids in [0, 2^40)");
  check_rng(seed, 0);
  TORCH_CHECK_VALUE(layer >= 0 && layer < (1 << 16), "layer must be in [0, 2^16), got ", layer);
  TORCH_CHECK_VALUE(domain >= 0 && domain < (1 << 8), "domain must be in [0, 2^8), got ", domain);
}

struct ApplyShape {
  int64_t batch, channels, spatial;
  cpu::Layout layout;
};

inline ApplyShape check_apply(const at::Tensor& x, const at::Tensor& p_logit, int64_t seed, int64_t stream,
                              double tau, c10::DeviceType type) {
  check_device("x", x, type);
  check_data_dtype("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have at least 2 dims, got shape ", x.sizes());
  check_p_logit(p_logit, x.size(1), type);
  check_same_device("p_logit", p_logit, "x", x);
  check_rng(seed, stream);
  check_tau(tau);
  ApplyShape s;
  s.layout = check_layout("x", x);
  s.batch = x.size(0);
  s.channels = x.size(1);
  s.spatial = (s.batch * s.channels) != 0 ? x.numel() / (s.batch * s.channels) : 0;
  return s;
}

// affine_relu_gate (forward and backward): check_apply's checks, scale and shift, the gate offset.
inline ApplyShape check_affine_relu_gate(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                         const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau,
                                         int64_t offset, c10::DeviceType type) {
  const ApplyShape s = check_apply(x, p_logit, seed, stream, tau, type);
  check_affine_vector("scale", scale, p_logit);
  check_affine_vector("shift", shift, p_logit);
  check_gate_offset(offset, s.batch * s.channels);
  return s;
}

// The K copies' gates [K, B, C] from a backend's keep_of(p_logit, batch, seed, stream, offset, tau, mode).
template <typename KeepOf>
at::Tensor keeps_of(KeepOf&& keep_of, const at::Tensor& p_logits, int64_t batch, int64_t seed,
                    const std::vector<int64_t>& streams, int64_t offset, double tau, cpu::GateMode mode) {
  std::vector<at::Tensor> keeps;
  for (size_t k = 0; k < streams.size(); ++k)
    keeps.push_back(keep_of(p_logits[static_cast<int64_t>(k)], batch, seed, streams[k], offset, tau, mode));
  return at::stack(keeps);
}

// gated_copies (forward and backward): the copies, check_apply's checks on x, the gate offset.
inline ApplyShape check_gated_copies(const at::Tensor& x, const at::Tensor& p_logits,
                                     const std::vector<int64_t>& streams, int64_t seed, double tau, int64_t offset,
                                     int64_t max_copies, c10::DeviceType type) {
  check_device("x", x, type);
  check_copies(x, p_logits, streams, max_copies);
  const ApplyShape s = check_apply(x, p_logits[0], seed, streams[0], tau, type);
  check_gate_offset(offset, s.batch * s.channels);
  return s;
}

// branch_combine: returns whether the weights are per example ([B, S]) rather than per branch ([S]).
inline bool check_combine(const std::vector<at::Tensor>& ys, const at::Tensor& weights,
                          const c10::optional<at::Tensor>& skip, c10::DeviceType type) {
  check_branches(ys, type);
  check_same_device("weights", weights, "ys[0]", ys[0]);
  const bool per_example = check_branch_weights("weights", weights, ys[0].size(0), static_cast<int64_t>(ys.size()));
  if (skip.has_value()) check_like("skip", *skip, "ys[0]", ys[0]);
  return per_example;
}

inline bool check_combine_backward(const at::Tensor& grad, const std::vector<at::Tensor>& ys,
                                   const at::Tensor& weights, const c10::optional<at::Tensor>& backward_weights,
                                   c10::DeviceType type) {
  const bool per_example = check_combine(ys, weights, c10::nullopt, type);
  check_like("grad", grad, "ys[0]", ys[0]);
  if (backward_weights.has_value()) {
    check_same_device("backward_weights", *backward_weights, "ys[0]", ys[0]);
    check_branch_weights("backward_weights", *backward_weights, ys[0].size(0), static_cast<int64_t>(ys.size()));
    TORCH_CHECK_VALUE(backward_weights->sizes() == weights.sizes(), "backward_weights must have the shape of weights ",
                      weights.sizes(), ", got ", backward_weights->sizes());
  }
  return per_example;
}

inline void check_coefficients(double weight_reg, double drop_reg, double n_train) {
  TORCH_CHECK_VALUE(std::isfinite(weight_reg) && weight_reg >= 0, "weight_reg must be a finite number >= 0, got ",
                    weight_reg);
  TORCH_CHECK_VALUE(std::isfinite(drop_reg) && drop_reg >= 0, "drop_reg must be a finite number >= 0, got ", drop_reg);
  TORCH_CHECK_VALUE(std::isfinite(n_train) && n_train > 0, "n_train must be a finite number > 0, got ", n_train);
}

// ---- the Gaussian family ------------------------------------------------------------------------

// gaussian_noise(mu, var) and its backward (grad, var): `t` and `other` of one shape, dtype, layout
// and device; offset + numel within the 2^63 counters of a stream. Returns the kernels' geometry.
inline cpu::NoiseShape check_noise(const char* name, const at::Tensor& t, const char* other_name,
                                   const at::Tensor& other, int64_t seed, int64_t stream, int64_t offset,
                                   c10::DeviceType type) {
  check_device(name, t, type);
  check_data_dtype(name, t);
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have at least 1 dim, got shape ", t.sizes());
  check_like(other_name, other, name, t);
  check_rng(seed, stream);
  const int64_t n = t.numel();
  TORCH_CHECK_VALUE(offset >= 0 && (offset == 0 || offset - 1 <= INT64_MAX - n),
                    "offset must be in [0, 2^63 - numel] (", n, " elements), got ", offset);
  cpu::NoiseShape g;
  g.layout = check_layout(name, t);
  if (g.layout == cpu::Layout::nchw) {  // the memory index is the logical index: one flat run
    g.batch = 1;
    g.channels = 1;
    g.spatial = n;
  } else {
    g.batch = t.size(0);
    g.channels = t.size(1);
    g.spatial = t.size(2) * t.size(3);
  }
  return g;
}

// gaussian_kl: log_alphas [C_l] (float32 or float64, contiguous, one device) and counts >= 1.
// Returns whether any log alpha is float64 (the result's dtype then).
inline bool check_kl(const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& weights_per_channel,
                     double n_train, c10::DeviceType type) {
  TORCH_CHECK_VALUE(!log_alphas.empty() && log_alphas.size() == weights_per_channel.size(),
                    "log_alphas and weights_per_channel must be non-empty lists of equal length, got ",
                    log_alphas.size(), " and ", weights_per_channel.size());
  TORCH_CHECK_VALUE(std::isfinite(n_train) && n_train > 0, "n_train must be a finite number > 0, got ", n_train);
  bool any_double = false;
  for (size_t k = 0; k < log_alphas.size(); ++k) {
    const std::string an = "log_alphas[" + std::to_string(k) + "]";
    check_device(an.c_str(), log_alphas[k], type);
    check_same_device(an.c_str(), log_alphas[k], "log_alphas[0]", log_alphas[0]);
    check_gate_dtype(an.c_str(), log_alphas[k]);
    check_vector(an.c_str(), log_alphas[k], -1);
    TORCH_CHECK_VALUE(weights_per_channel[k] >= 1, "weights_per_channel[", k, "] must be >= 1, got ",
                      weights_per_channel[k]);
    any_double = any_double || log_alphas[k].scalar_type() == at::kDouble;
  }
  return any_double;
}

// The whole-network backwards (regulariser, Gaussian KL) write one flat gradient buffer per list, in
// list order (the op contract, pgnas_fast/ops/_library.py), so every tensor of a list must have the
// first one's dtype (the Python layer promotes a mixed list by a copy).
inline void check_one_dtype(const char* name, const std::vector<at::Tensor>& ts) {
  for (size_t k = 1; k < ts.size(); ++k) {
    TORCH_CHECK_VALUE(ts[k].scalar_type() == ts[0].scalar_type(), name, "[", k, "] must have the dtype of ", name,
                      "[0] (", ts[0].scalar_type(), ": their gradients share one flat buffer), got ",
                      ts[k].scalar_type());
  }
}

inline int64_t total_numel(const std::vector<at::Tensor>& ts) {
  int64_t n = 0;
  for (const at::Tensor& t : ts) n += t.numel();
  return n;
}

// The flat gradient buffer of `ts` (checked by check_one_dtype): their element count, ts[0]'s options.
inline at::Tensor flat_gradient(const std::vector<at::Tensor>& ts) {
  return at::empty({total_numel(ts)}, ts[0].options());
}

}  // namespace pgnas
