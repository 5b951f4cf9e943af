// Torch bindings of the `cpu` backend (pgnas_fast._C.cpu): check the tensors, allocate the outputs
// with the layout of torch.empty_like(input), dispatch over the data and gate dtypes, and run the
// OpenMP kernels of kernels.h. pgnas_fast/cpu_backend.py calls these.
#include <torch/extension.h>

#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../op_table.h"
#include "fused.h"
#include "gaussian.h"
#include "kernels.h"

namespace pgnas {
namespace {

constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;

// Runs f with G = float or double, the gate type of t.
template <typename F>
void with_gate_type(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

#define PGNAS_DISPATCH_DATA(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

void philox_uniform_out(at::Tensor out, int64_t seed, int64_t stream, int64_t offset) {
  check_philox_out(out, seed, stream, offset, kCPU);
  cpu::philox_uniform(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                      static_cast<uint64_t>(offset));
}

// keep [B, C]: u of elements offset .. offset + B * C - 1 from the contract's Philox, the rest in
// torch's own (vectorised) ops written as the reference writes them, so that keeps equal the
// reference's bit for bit, hard masks even on exact ties u + p == 1.
at::Tensor keep_of(const at::Tensor& p_logit, int64_t batch, int64_t seed, int64_t stream, int64_t offset, double tau,
                   cpu::GateMode mode) {
  const int64_t channels = p_logit.size(0);
  if (mode == cpu::GateMode::full) return at::ones({batch, channels}, p_logit.options());
  at::Tensor u = at::empty({batch, channels}, p_logit.options().dtype(at::kFloat));
  cpu::philox_uniform(u.data_ptr<float>(), u.numel(), static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                      static_cast<uint64_t>(offset));
  u = u.to(p_logit.scalar_type());
  if (mode == cpu::GateMode::hard) return (u + at::sigmoid(p_logit) < 1.0).to(p_logit.scalar_type());
  const at::Tensor logistic = at::log(u) - at::log1p(-u);
  return at::sigmoid(-(p_logit + logistic) / tau);  // 1 - sigmoid((p_logit + L) / tau)
}

at::Tensor gate_keep(const at::Tensor& p_logit, int64_t batch, int64_t seed, int64_t stream, double tau,
                     const std::string& mode, int64_t offset) {
  check_p_logit(p_logit, -1, kCPU);
  TORCH_CHECK_VALUE(batch >= 1, "batch must be >= 1, got ", batch);
  check_rng(seed, stream);
  check_tau(tau);
  check_gate_offset(offset, batch * p_logit.size(0));
  return keep_of(p_logit, batch, seed, stream, offset, tau, parse_mode(mode));
}

at::Tensor candidate_keep(const at::Tensor& p_logit, const at::Tensor& candidates, int64_t seed, int64_t layer,
                          int64_t domain) {
  check_candidates(p_logit, candidates, seed, layer, domain, kCPU);
  at::Tensor keep = at::empty({candidates.size(0), p_logit.size(0)}, p_logit.options());
  const at::Tensor drop_prob = at::sigmoid(p_logit);  // torch's own, as the reference: ties u + p == 1 agree
  with_gate_type(p_logit, [&](auto g) {
    using G = decltype(g);
    cpu::candidate_keep<G>(keep.data_ptr<G>(), drop_prob.data_ptr<G>(), candidates.data_ptr<int64_t>(),
                           candidates.size(0), p_logit.size(0), static_cast<uint64_t>(seed), layer, domain);
  });
  return keep;
}

at::Tensor gate_keep_backward(const at::Tensor& grad_keep, const at::Tensor& keep, double tau, const std::string& mode) {
  check_device("keep", keep, kCPU);
  check_gate_dtype("keep", keep);
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.is_contiguous(), "keep must be a contiguous [B, C] tensor, got shape ",
                    keep.sizes());
  check_like("grad_keep", grad_keep, "keep", keep);
  check_tau(tau);
  const cpu::GateMode m = parse_mode(mode);
  if (m != cpu::GateMode::relaxed) return at::zeros({keep.size(1)}, keep.options());
  at::Tensor grad_p = at::empty({keep.size(1)}, keep.options());
  with_gate_type(keep, [&](auto g) {
    using G = decltype(g);
    cpu::gate_keep_backward<G>(grad_p.data_ptr<G>(), grad_keep.data_ptr<G>(), keep.data_ptr<G>(), keep.size(0),
                               keep.size(1), tau);
  });
  return grad_p;
}

at::Tensor gated_apply(const at::Tensor& x, const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau,
                       const std::string& mode, int64_t offset) {
  const ApplyShape s = check_apply(x, p_logit, seed, stream, tau, kCPU);
  check_gate_offset(offset, s.batch * s.channels);
  const cpu::GateMode m = parse_mode(mode);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);
  PGNAS_DISPATCH_DATA(x.scalar_type(), "gated_apply", [&] {
    with_gate_type(p_logit, [&](auto g) {
      using G = decltype(g);
      cpu::gated_apply<scalar_t, G>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), keep.data_ptr<G>(), s.batch,
                                    s.channels, s.spatial, s.layout);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& p_logit, int64_t seed, int64_t stream,
                                                        double tau, const std::string& mode, int64_t offset) {
  const ApplyShape s = check_apply(x, p_logit, seed, stream, tau, kCPU);
  check_gate_offset(offset, s.batch * s.channels);
  check_like("grad", grad, "x", x);
  const cpu::GateMode m = parse_mode(mode);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_p = at::zeros_like(p_logit);
  if (x.numel() == 0) return {grad_x, grad_p};
  // The gates are regenerated from (seed, stream, offset), never stored (design.md, FlashAttention habit).
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);
  const bool relaxed = m == cpu::GateMode::relaxed;
  at::Tensor grad_keep = relaxed ? at::empty_like(keep) : at::Tensor();
  PGNAS_DISPATCH_DATA(x.scalar_type(), "gated_apply_backward", [&] {
    with_gate_type(p_logit, [&](auto g) {
      using G = decltype(g);
      cpu::gated_apply_backward<scalar_t, G>(grad_x.data_ptr<scalar_t>(), relaxed ? grad_keep.data_ptr<G>() : nullptr,
                                             grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), keep.data_ptr<G>(),
                                             s.batch, s.channels, s.spatial, s.layout);
      if (relaxed)
        cpu::gate_keep_backward<G>(grad_p.data_ptr<G>(), grad_keep.data_ptr<G>(), keep.data_ptr<G>(), s.batch,
                                   s.channels, tau);
    });
  });
  return {grad_x, grad_p};
}

at::Tensor affine_relu_gate(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau, const std::string& mode,
                            int64_t offset) {
  const ApplyShape s = check_affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, offset, kCPU);
  const cpu::GateMode m = parse_mode(mode);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);
  PGNAS_DISPATCH_DATA(x.scalar_type(), "affine_relu_gate", [&] {
    with_gate_type(p_logit, [&](auto g) {
      using G = decltype(g);
      cpu::affine_relu_gate<scalar_t, G>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<G>(),
                                         shift.data_ptr<G>(), keep.data_ptr<G>(), s.batch, s.channels, s.spatial,
                                         s.layout);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> affine_relu_gate_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau, const std::string& mode, int64_t offset) {
  const ApplyShape s = check_affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, offset, kCPU);
  check_like("grad", grad, "x", x);
  const cpu::GateMode m = parse_mode(mode);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_scale = at::zeros_like(scale), grad_shift = at::zeros_like(shift), grad_p = at::zeros_like(p_logit);
  if (x.numel() == 0) return {grad_x, grad_scale, grad_shift, grad_p};
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);  // regenerated, never stored
  const bool relaxed = m == cpu::GateMode::relaxed;
  at::Tensor rows = at::empty({2, s.batch, s.channels}, x.options().dtype(at::kDouble));
  at::Tensor grad_keep = relaxed ? at::empty_like(keep) : at::Tensor();
  PGNAS_DISPATCH_DATA(x.scalar_type(), "affine_relu_gate_backward", [&] {
    with_gate_type(p_logit, [&](auto g) {
      using G = decltype(g);
      double* row_scale = rows.data_ptr<double>();
      double* row_shift = row_scale + s.batch * s.channels;
      cpu::affine_relu_gate_backward<scalar_t, G>(
          grad_x.data_ptr<scalar_t>(), row_scale, row_shift, relaxed ? grad_keep.data_ptr<G>() : nullptr,
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<G>(), shift.data_ptr<G>(),
          keep.data_ptr<G>(), s.batch, s.channels, s.spatial, s.layout);
      cpu::sum_rows<G>(grad_scale.data_ptr<G>(), row_scale, s.batch, s.channels);
      cpu::sum_rows<G>(grad_shift.data_ptr<G>(), row_shift, s.batch, s.channels);
      if (relaxed)
        cpu::gate_keep_backward<G>(grad_p.data_ptr<G>(), grad_keep.data_ptr<G>(), keep.data_ptr<G>(), s.batch,
                                   s.channels, tau);
    });
  });
  return {grad_x, grad_scale, grad_shift, grad_p};
}

at::Tensor gated_copies(const at::Tensor& x, const at::Tensor& p_logits, int64_t seed,
                        const std::vector<int64_t>& streams, double tau, const std::string& mode, int64_t offset,
                        bool relu) {
  const ApplyShape s = check_gated_copies(x, p_logits, streams, seed, tau, offset, cpu::kMaxCopies, kCPU);
  const cpu::GateMode m = parse_mode(mode);
  const int64_t copies = static_cast<int64_t>(streams.size());
  at::Tensor out = stacked_empty_like(x, copies, s.layout);
  if (x.numel() == 0) return out;
  const at::Tensor keeps = keeps_of(keep_of, p_logits, s.batch, seed, streams, offset, tau, m);
  PGNAS_DISPATCH_DATA(x.scalar_type(), "gated_copies", [&] {
    with_gate_type(p_logits, [&](auto g) {
      using G = decltype(g);
      cpu::gated_copies<scalar_t, G>(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), keeps.data_ptr<G>(), copies,
                                     s.batch, s.channels, s.spatial, relu, s.layout);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_copies_backward(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& p_logits, int64_t seed,
                                                         const std::vector<int64_t>& streams, double tau,
                                                         const std::string& mode, int64_t offset, bool relu) {
  const ApplyShape s = check_gated_copies(x, p_logits, streams, seed, tau, offset, cpu::kMaxCopies, kCPU);
  const int64_t copies = static_cast<int64_t>(streams.size());
  check_copies_grad(grad, x, copies, s.layout);
  const cpu::GateMode m = parse_mode(mode);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_p = at::zeros_like(p_logits);
  if (x.numel() == 0) return {grad_x, grad_p};
  const at::Tensor keeps = keeps_of(keep_of, p_logits, s.batch, seed, streams, offset, tau, m);  // regenerated
  const bool relaxed = m == cpu::GateMode::relaxed;
  at::Tensor grad_keeps = relaxed ? at::empty_like(keeps) : at::Tensor();
  PGNAS_DISPATCH_DATA(x.scalar_type(), "gated_copies_backward", [&] {
    with_gate_type(p_logits, [&](auto g) {
      using G = decltype(g);
      cpu::gated_copies_backward<scalar_t, G>(grad_x.data_ptr<scalar_t>(), relaxed ? grad_keeps.data_ptr<G>() : nullptr,
                                              grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), keeps.data_ptr<G>(),
                                              copies, s.batch, s.channels, s.spatial, relu, s.layout);
      for (int64_t k = 0; relaxed && k < copies; ++k)
        cpu::gate_keep_backward<G>(grad_p[k].data_ptr<G>(), grad_keeps[k].data_ptr<G>(), keeps[k].data_ptr<G>(),
                                   s.batch, s.channels, tau);
    });
  });
  return {grad_x, grad_p};
}

at::Tensor branch_combine(const std::vector<at::Tensor>& ys, const at::Tensor& weights,
                          const c10::optional<at::Tensor>& skip) {
  const bool per_example = check_combine(ys, weights, skip, kCPU);
  const int64_t batch = ys[0].size(0), n_branches = static_cast<int64_t>(ys.size());
  at::Tensor out = at::empty_like(ys[0]);
  if (out.numel() == 0) return out;
  PGNAS_DISPATCH_DATA(ys[0].scalar_type(), "branch_combine", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const at::Tensor& y : ys) ptrs.push_back(y.data_ptr<scalar_t>());
    const scalar_t* skip_ptr = skip.has_value() ? skip->data_ptr<scalar_t>() : nullptr;
    with_gate_type(weights, [&](auto w) {
      using W = decltype(w);
      cpu::branch_combine<scalar_t, W>(out.data_ptr<scalar_t>(), ptrs.data(), n_branches, weights.data_ptr<W>(),
                                       per_example, skip_ptr, batch, out.numel() / batch);
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> branch_combine_backward(
    const at::Tensor& grad, const std::vector<at::Tensor>& ys, const at::Tensor& weights,
    const c10::optional<at::Tensor>& backward_weights) {
  const bool per_example = check_combine_backward(grad, ys, weights, backward_weights, kCPU);
  const int64_t batch = ys[0].size(0), n_branches = static_cast<int64_t>(ys.size());
  const bool shake = backward_weights.has_value();
  // shake-shake: the forward weights are random constants, not parameters
  at::Tensor grad_w = shake ? at::zeros_like(weights) : at::empty_like(weights);
  const at::Tensor wb = shake ? backward_weights->to(weights.scalar_type()).contiguous() : weights;
  std::vector<at::Tensor> grad_ys;
  for (const at::Tensor& y : ys) grad_ys.push_back(at::empty_like(y));
  if (grad.numel() == 0) return {grad_ys, shake ? grad_w : grad_w.zero_()};
  PGNAS_DISPATCH_DATA(ys[0].scalar_type(), "branch_combine_backward", [&] {
    std::vector<const scalar_t*> y_ptrs;
    std::vector<scalar_t*> gy_ptrs;
    for (size_t s = 0; s < ys.size(); ++s) {
      y_ptrs.push_back(ys[s].data_ptr<scalar_t>());
      gy_ptrs.push_back(grad_ys[s].data_ptr<scalar_t>());
    }
    with_gate_type(weights, [&](auto w) {
      using W = decltype(w);
      cpu::branch_combine_backward<scalar_t, W>(gy_ptrs.data(), shake ? nullptr : grad_w.data_ptr<W>(),
                                                grad.data_ptr<scalar_t>(), y_ptrs.data(), n_branches,
                                                wb.data_ptr<W>(), per_example, batch, grad.numel() / batch);
    });
  });
  return {grad_ys, grad_w};
}

std::vector<cpu::RegSegment> segment_table(const std::vector<at::Tensor>& weights,
                                           const std::vector<at::Tensor>& p_logits, bool* any_double) {
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() == p_logits.size(),
                    "weights and p_logits must be non-empty lists of equal length, got ", weights.size(), " and ",
                    p_logits.size());
  std::vector<cpu::RegSegment> segs(weights.size());
  *any_double = false;
  for (size_t k = 0; k < weights.size(); ++k) {
    cpu::RegSegment& s = segs[k];
    check_gated_weight(k, weights[k], p_logits[k], kCPU, &s.groups, &s.per_group, &s.taps);
    s.weight = weights[k].data_ptr();
    s.p_logit = p_logits[k].data_ptr();
    s.p_logit_double = p_logits[k].scalar_type() == at::kDouble;
    *any_double = *any_double || s.p_logit_double;
    s.out_channels = weights[k].size(0);
    s.grad_weight = nullptr;
    s.grad_p_logit = nullptr;
    PGNAS_DISPATCH_DATA(weights[k].scalar_type(), "regularizer", [&] { s.squares = &cpu::rows_squares<scalar_t>; });
  }
  return segs;
}

// The weights' flat gradient (regularizer_backward) is as large as every gated weight together: 290 MB
// for SupNet-MI. glibc maps each allocation over 32 MB afresh and unmaps it on free, so a fresh buffer
// costs the kernel's page faults on every call, 62 ms of a 100 ms backward there (2-core machine),
// where the reference's per-layer gradients come from the reused heap. So the last large buffer is kept
// and handed out again once nothing else holds its storage (the .grad views of the last call were
// dropped, as zero_grad(set_to_none=True) does): on CPU what the CUDA caching allocator does on GPU.
at::Tensor reusable_flat_gradient(const std::vector<at::Tensor>& ts) {
  constexpr int64_t kMmapThreshold = int64_t{32} << 20;  // glibc's largest: smaller buffers reuse the heap
  const int64_t n = total_numel(ts);
  const at::TensorOptions options = ts[0].options();
  const int64_t bytes = n * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kMmapThreshold) return flat_gradient(ts);
  static std::mutex mutex;
  static c10::Storage& kept = *new c10::Storage();  // never destroyed: no free after torch's teardown at exit
  std::lock_guard<std::mutex> lock(mutex);
  if (!kept || kept.use_count() > 1 || static_cast<int64_t>(kept.nbytes()) != bytes) {  // held, or another size
    kept = flat_gradient(ts).storage();
  }
  return at::empty({0}, options).set_(kept, 0, {n}, {1});
}

at::Tensor regularizer(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& p_logits,
                       double weight_reg, double drop_reg, double n_train) {
  check_coefficients(weight_reg, drop_reg, n_train);
  bool any_double = false;
  const std::vector<cpu::RegSegment> segs = segment_table(weights, p_logits, &any_double);
  const double r = cpu::regularizer(segs, weight_reg, drop_reg, n_train);
  return at::scalar_tensor(r, p_logits[0].options().dtype(any_double ? at::kDouble : at::kFloat));
}

// Points the segments' gradients into flat buffers, one per kind (the op contract).
std::tuple<at::Tensor, at::Tensor> flat_regularizer_gradients(std::vector<cpu::RegSegment>* segs,
                                                              const std::vector<at::Tensor>& weights,
                                                              const std::vector<at::Tensor>& p_logits) {
  check_one_dtype("weights", weights);
  check_one_dtype("p_logits", p_logits);
  at::Tensor grad_weights = reusable_flat_gradient(weights), grad_p_logits = flat_gradient(p_logits);
  char* next_weight = static_cast<char*>(grad_weights.data_ptr());
  char* next_p_logit = static_cast<char*>(grad_p_logits.data_ptr());
  for (size_t k = 0; k < segs->size(); ++k) {
    (*segs)[k].grad_weight = next_weight;
    (*segs)[k].grad_p_logit = next_p_logit;
    next_weight += weights[k].numel() * weights[k].element_size();
    next_p_logit += p_logits[k].numel() * p_logits[k].element_size();
  }
  return {grad_weights, grad_p_logits};
}

std::tuple<at::Tensor, at::Tensor> regularizer_backward(const at::Tensor& grad, const std::vector<at::Tensor>& weights,
                                                        const std::vector<at::Tensor>& p_logits, double weight_reg,
                                                        double drop_reg, double n_train) {
  check_coefficients(weight_reg, drop_reg, n_train);
  check_device("grad", grad, kCPU);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one value, got shape ", grad.sizes());
  bool any_double = false;
  std::vector<cpu::RegSegment> segs = segment_table(weights, p_logits, &any_double);
  auto grads = flat_regularizer_gradients(&segs, weights, p_logits);
  cpu::regularizer_backward(segs, grad.item<double>(), weight_reg, drop_reg, n_train);
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> regularizer_with_grad(const std::vector<at::Tensor>& weights,
                                                                     const std::vector<at::Tensor>& p_logits,
                                                                     double weight_reg, double drop_reg,
                                                                     double n_train) {
  check_coefficients(weight_reg, drop_reg, n_train);
  bool any_double = false;
  std::vector<cpu::RegSegment> segs = segment_table(weights, p_logits, &any_double);
  auto [grad_weights, grad_p_logits] = flat_regularizer_gradients(&segs, weights, p_logits);
  const double r = cpu::regularizer_with_grad(segs, weight_reg, drop_reg, n_train);
  return {at::scalar_tensor(r, p_logits[0].options().dtype(any_double ? at::kDouble : at::kFloat)), grad_weights,
          grad_p_logits};
}

// ---- the Gaussian family ------------------------------------------------------------------------

at::Tensor gaussian_noise(const at::Tensor& mu, const at::Tensor& var, int64_t seed, int64_t stream, int64_t offset) {
  const cpu::NoiseShape g = check_noise("mu", mu, "var", var, seed, stream, offset, kCPU);
  at::Tensor out = at::empty_like(mu);
  if (mu.numel() == 0) return out;
  PGNAS_DISPATCH_DATA(mu.scalar_type(), "gaussian_noise", [&] {
    cpu::gaussian_noise<scalar_t>(out.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(), g,
                                  static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                                  static_cast<uint64_t>(offset));
  });
  return out;
}

at::Tensor gaussian_noise_backward(const at::Tensor& grad, const at::Tensor& var, int64_t seed, int64_t stream,
                                   int64_t offset) {
  const cpu::NoiseShape g = check_noise("var", var, "grad", grad, seed, stream, offset, kCPU);
  at::Tensor grad_var = at::empty_like(var);
  if (var.numel() == 0) return grad_var;
  PGNAS_DISPATCH_DATA(var.scalar_type(), "gaussian_noise_backward", [&] {
    cpu::gaussian_noise_backward<scalar_t>(grad_var.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                           var.data_ptr<scalar_t>(), g, static_cast<uint64_t>(seed),
                                           static_cast<uint64_t>(stream), static_cast<uint64_t>(offset));
  });
  return grad_var;
}

std::vector<cpu::KlSegment> kl_segments(const std::vector<at::Tensor>& log_alphas,
                                        const std::vector<int64_t>& weights_per_channel, double n_train) {
  std::vector<cpu::KlSegment> segs(log_alphas.size());
  for (size_t k = 0; k < segs.size(); ++k) {
    segs[k].log_alpha = log_alphas[k].data_ptr();
    segs[k].grad = nullptr;
    segs[k].is_double = log_alphas[k].scalar_type() == at::kDouble;
    segs[k].channels = log_alphas[k].size(0);
    segs[k].scale = static_cast<double>(weights_per_channel[k]) / n_train;
  }
  return segs;
}

at::Tensor gaussian_kl(const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& weights_per_channel,
                       double n_train) {
  const bool any_double = check_kl(log_alphas, weights_per_channel, n_train, kCPU);
  const double kl = cpu::gaussian_kl(kl_segments(log_alphas, weights_per_channel, n_train));
  return at::scalar_tensor(kl, log_alphas[0].options().dtype(any_double ? at::kDouble : at::kFloat));
}

at::Tensor gaussian_kl_backward(const at::Tensor& grad, const std::vector<at::Tensor>& log_alphas,
                                const std::vector<int64_t>& weights_per_channel, double n_train) {
  check_kl(log_alphas, weights_per_channel, n_train, kCPU);
  check_one_dtype("log_alphas", log_alphas);
  check_device("grad", grad, kCPU);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one value, got shape ", grad.sizes());
  std::vector<cpu::KlSegment> segs = kl_segments(log_alphas, weights_per_channel, n_train);
  at::Tensor grads = flat_gradient(log_alphas);
  char* next = static_cast<char*>(grads.data_ptr());
  for (size_t k = 0; k < segs.size(); ++k) {
    segs[k].grad = next;
    next += log_alphas[k].numel() * log_alphas[k].element_size();
  }
  cpu::gaussian_kl_backward(segs, grad.item<double>());
  return grads;
}

}  // namespace

void register_cpu_ops(pybind11::module_& m) {
  m.doc() = "The `cpu` backend: the op set in C++ with OpenMP (design.md layer 6).";
  PGNAS_DEFINE_OPS(m);
  // CPU only: the eager forward's fused path (pgnas_fast/ops/_library.py), where checking that the
  // upstream gradient is 1 costs no device sync
  using namespace pybind11::literals;
  m.def("regularizer_with_grad", &regularizer_with_grad, "weights"_a, "p_logits"_a, "weight_reg"_a, "drop_reg"_a,
        "n_train"_a, "R and regularizer_backward's flat gradients for grad 1, from one read of the weights.");
}

}  // namespace pgnas
