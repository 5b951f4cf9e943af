// Argument checks shared by the `cpu` and `cuda` bindings: every message names the argument and says
// what was expected. pgnas_fast.ops validates the public API before any backend runs; these guard the
// raw `pgnas_fast._C` entry points (called directly, from tests, or by another frontend), so that no
// kernel ever sees a pointer it would misread.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <string>
#include <vector>

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

inline void check_like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                   dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.strides() == ref.strides(), name, " must have the memory layout of ", ref_name,
                    " (strides ", ref.strides(), "), got strides ", t.strides());
  check_same_device(name, t, ref_name, ref);
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
  *per_group = w.size(1);
  TORCH_CHECK_VALUE(*per_group > 0 && in_channels % *per_group == 0 && in_channels > 0 &&
                        out_channels % (in_channels / *per_group) == 0,
                    pn, " has ", in_channels, " channels, which does not fit ", wn, " of shape ", w.sizes(),
                    ": expected C_in = groups * ", *per_group, " with groups dividing ", out_channels);
  *groups = in_channels / *per_group;
  *taps = *per_group ? w.numel() / (out_channels * *per_group) : 0;
}

}  // namespace pgnas
