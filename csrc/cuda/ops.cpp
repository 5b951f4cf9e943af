// Torch bindings of the `cuda` backend (pgnas_fast._C.cuda): the same checks and output layouts as
// the `cpu` bindings (csrc/cpu/ops.cpp), then the C-ABI launchers of kernels/pgnas_kernels.h on the
// current CUDA stream. Compiled only where torch has CUDA and nvcc is found (setup.py).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../../kernels/pgnas_kernels.h"
#include "../checks.h"
#include "../op_table.h"

namespace pgnas {
namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

#define PGNAS_CUDA_CHECK(call)                                                            \
  do {                                                                                    \
    const cudaError_t pgnas_err_ = (call);                                                \
    TORCH_CHECK(pgnas_err_ == cudaSuccess, #call " failed: ", cudaGetErrorString(pgnas_err_)); \
  } while (0)

pgnas_dtype code_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return PGNAS_F32;
    case at::kDouble:
      return PGNAS_F64;
    case at::kHalf:
      return PGNAS_F16;
    case at::kBFloat16:
      return PGNAS_BF16;
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype_name(t.scalar_type()));
  }
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void philox_uniform_out(at::Tensor out, int64_t seed, int64_t stream, int64_t offset) {
  check_philox_out(out, seed, stream, offset, kCUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  PGNAS_CUDA_CHECK(pgnas_philox_uniform(out.data_ptr<float>(), out.numel(), static_cast<uint64_t>(seed),
                                        static_cast<uint64_t>(stream), static_cast<uint64_t>(offset),
                                        current_stream()));
}

at::Tensor keep_of(const at::Tensor& p_logit, int64_t batch, int64_t seed, int64_t stream, int64_t offset, double tau,
                   cpu::GateMode mode) {
  at::Tensor keep = at::empty({batch, p_logit.size(0)}, p_logit.options());
  // torch's own sigmoid, as the reference: hard masks then agree even on exact ties u + p == 1
  const at::Tensor drop_prob = mode == cpu::GateMode::hard ? at::sigmoid(p_logit) : p_logit;
  PGNAS_CUDA_CHECK(pgnas_gate_keep(keep.data_ptr(), p_logit.data_ptr(), drop_prob.data_ptr(), code_of(p_logit), batch,
                                   p_logit.size(0), static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                                   static_cast<uint64_t>(offset), tau, static_cast<pgnas_gate_mode>(mode),
                                   current_stream()));
  return keep;
}

at::Tensor gate_keep(const at::Tensor& p_logit, int64_t batch, int64_t seed, int64_t stream, double tau,
                     const std::string& mode, int64_t offset) {
  check_p_logit(p_logit, -1, kCUDA);
  TORCH_CHECK_VALUE(batch >= 1, "batch must be >= 1, got ", batch);
  check_rng(seed, stream);
  check_tau(tau);
  check_gate_offset(offset, batch * p_logit.size(0));
  const c10::cuda::CUDAGuard guard(p_logit.device());
  return keep_of(p_logit, batch, seed, stream, offset, tau, parse_mode(mode));
}

at::Tensor candidate_keep(const at::Tensor& p_logit, const at::Tensor& candidates, int64_t seed, int64_t layer,
                          int64_t domain) {
  check_candidates(p_logit, candidates, seed, layer, domain, kCUDA);
  const c10::cuda::CUDAGuard guard(p_logit.device());
  at::Tensor keep = at::empty({candidates.size(0), p_logit.size(0)}, p_logit.options());
  const at::Tensor drop_prob = at::sigmoid(p_logit);  // torch's own, as the reference: ties u + p == 1 agree
  PGNAS_CUDA_CHECK(pgnas_candidate_keep(keep.data_ptr(), drop_prob.data_ptr(), code_of(p_logit),
                                        candidates.data_ptr<int64_t>(), candidates.size(0), p_logit.size(0),
                                        static_cast<uint64_t>(seed), layer, domain, current_stream()));
  return keep;
}

at::Tensor gate_keep_backward(const at::Tensor& grad_keep, const at::Tensor& keep, double tau, const std::string& mode) {
  check_device("keep", keep, kCUDA);
  check_gate_dtype("keep", keep);
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.is_contiguous(), "keep must be a contiguous [B, C] tensor, got shape ",
                    keep.sizes());
  check_like("grad_keep", grad_keep, "keep", keep);
  check_tau(tau);
  const c10::cuda::CUDAGuard guard(keep.device());
  if (parse_mode(mode) != cpu::GateMode::relaxed) return at::zeros({keep.size(1)}, keep.options());
  at::Tensor grad_p = at::empty({keep.size(1)}, keep.options());
  PGNAS_CUDA_CHECK(pgnas_gate_keep_backward(grad_p.data_ptr(), grad_keep.data_ptr(), keep.data_ptr(), code_of(keep),
                                            keep.size(0), keep.size(1), tau, current_stream()));
  return grad_p;
}

pgnas_layout layout_code(cpu::Layout layout) { return layout == cpu::Layout::nchw ? PGNAS_NCHW : PGNAS_NHWC; }

at::Tensor gated_apply(const at::Tensor& x, const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau,
                       const std::string& mode, int64_t offset) {
  const ApplyShape s = check_apply(x, p_logit, seed, stream, tau, kCUDA);
  check_gate_offset(offset, s.batch * s.channels);
  const cpu::GateMode m = parse_mode(mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);
  PGNAS_CUDA_CHECK(pgnas_gated_apply(out.data_ptr(), x.data_ptr(), code_of(x), keep.data_ptr(), code_of(keep), s.batch,
                                     s.channels, s.spatial, layout_code(s.layout), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& p_logit, int64_t seed, int64_t stream,
                                                        double tau, const std::string& mode, int64_t offset) {
  const ApplyShape s = check_apply(x, p_logit, seed, stream, tau, kCUDA);
  check_gate_offset(offset, s.batch * s.channels);
  check_like("grad", grad, "x", x);
  const cpu::GateMode m = parse_mode(mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_x, at::zeros_like(p_logit)};
  // The gates are regenerated from (seed, stream, offset), never stored (design.md, FlashAttention habit).
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);
  const bool relaxed = m == cpu::GateMode::relaxed;
  at::Tensor grad_keep = relaxed ? at::empty_like(keep) : at::Tensor();
  PGNAS_CUDA_CHECK(pgnas_gated_apply_backward(grad_x.data_ptr(), relaxed ? grad_keep.data_ptr() : nullptr,
                                              grad.data_ptr(), x.data_ptr(), code_of(x), keep.data_ptr(),
                                              code_of(keep), s.batch, s.channels, s.spatial, layout_code(s.layout),
                                              current_stream()));
  if (!relaxed) return {grad_x, at::zeros_like(p_logit)};
  at::Tensor grad_p = at::empty_like(p_logit);
  PGNAS_CUDA_CHECK(pgnas_gate_keep_backward(grad_p.data_ptr(), grad_keep.data_ptr(), keep.data_ptr(), code_of(keep),
                                            s.batch, s.channels, tau, current_stream()));
  return {grad_x, grad_p};
}

at::Tensor affine_relu_gate(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau, const std::string& mode,
                            int64_t offset) {
  const ApplyShape s = check_affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, offset, kCUDA);
  const cpu::GateMode m = parse_mode(mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);
  PGNAS_CUDA_CHECK(pgnas_affine_relu_gate(out.data_ptr(), x.data_ptr(), code_of(x), scale.data_ptr(), shift.data_ptr(),
                                          keep.data_ptr(), code_of(keep), s.batch, s.channels, s.spatial,
                                          layout_code(s.layout), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> affine_relu_gate_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& p_logit, int64_t seed, int64_t stream, double tau, const std::string& mode, int64_t offset) {
  const ApplyShape s = check_affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, offset, kCUDA);
  check_like("grad", grad, "x", x);
  const cpu::GateMode m = parse_mode(mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_x, at::zeros_like(scale), at::zeros_like(shift), at::zeros_like(p_logit)};
  const at::Tensor keep = keep_of(p_logit, s.batch, seed, stream, offset, tau, m);  // regenerated, never stored
  const bool relaxed = m == cpu::GateMode::relaxed;
  at::Tensor rows = at::empty({2, s.batch, s.channels}, keep.options());
  at::Tensor grad_keep = relaxed ? at::empty_like(keep) : at::Tensor();
  PGNAS_CUDA_CHECK(pgnas_affine_relu_gate_backward(
      grad_x.data_ptr(), rows[0].data_ptr(), rows[1].data_ptr(), relaxed ? grad_keep.data_ptr() : nullptr,
      grad.data_ptr(), x.data_ptr(), code_of(x), scale.data_ptr(), shift.data_ptr(), keep.data_ptr(), code_of(keep),
      s.batch, s.channels, s.spatial, layout_code(s.layout), current_stream()));
  at::Tensor grad_p = at::zeros_like(p_logit);
  if (relaxed)
    PGNAS_CUDA_CHECK(pgnas_gate_keep_backward(grad_p.data_ptr(), grad_keep.data_ptr(), keep.data_ptr(), code_of(keep),
                                              s.batch, s.channels, tau, current_stream()));
  return {grad_x, rows[0].sum(0), rows[1].sum(0), grad_p};  // summed over the batch
}

at::Tensor gated_copies(const at::Tensor& x, const at::Tensor& p_logits, int64_t seed,
                        const std::vector<int64_t>& streams, double tau, const std::string& mode, int64_t offset,
                        bool relu) {
  const ApplyShape s = check_gated_copies(x, p_logits, streams, seed, tau, offset, PGNAS_MAX_COPIES, kCUDA);
  const cpu::GateMode m = parse_mode(mode);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t copies = static_cast<int64_t>(streams.size());
  at::Tensor out = stacked_empty_like(x, copies, s.layout);
  if (x.numel() == 0) return out;
  const at::Tensor keeps = keeps_of(keep_of, p_logits, s.batch, seed, streams, offset, tau, m);
  PGNAS_CUDA_CHECK(pgnas_gated_copies(out.data_ptr(), x.data_ptr(), code_of(x), keeps.data_ptr(), code_of(keeps),
                                      static_cast<int32_t>(copies), s.batch, s.channels, s.spatial, relu ? 1 : 0,
                                      layout_code(s.layout), current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_copies_backward(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& p_logits, int64_t seed,
                                                         const std::vector<int64_t>& streams, double tau,
                                                         const std::string& mode, int64_t offset, bool relu) {
  const ApplyShape s = check_gated_copies(x, p_logits, streams, seed, tau, offset, PGNAS_MAX_COPIES, kCUDA);
  const int64_t copies = static_cast<int64_t>(streams.size());
  const c10::cuda::CUDAGuard guard(x.device());
  check_copies_grad(grad, x, copies, s.layout);
  const cpu::GateMode m = parse_mode(mode);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_p = at::zeros_like(p_logits);
  if (x.numel() == 0) return {grad_x, grad_p};
  const at::Tensor keeps = keeps_of(keep_of, p_logits, s.batch, seed, streams, offset, tau, m);  // regenerated
  const bool relaxed = m == cpu::GateMode::relaxed;
  at::Tensor grad_keeps = relaxed ? at::empty_like(keeps) : at::Tensor();
  PGNAS_CUDA_CHECK(pgnas_gated_copies_backward(grad_x.data_ptr(), relaxed ? grad_keeps.data_ptr() : nullptr,
                                               grad.data_ptr(), x.data_ptr(), code_of(x), keeps.data_ptr(),
                                               code_of(keeps), static_cast<int32_t>(copies), s.batch, s.channels,
                                               s.spatial, relu ? 1 : 0, layout_code(s.layout), current_stream()));
  for (int64_t k = 0; relaxed && k < copies; ++k)
    PGNAS_CUDA_CHECK(pgnas_gate_keep_backward(grad_p[k].data_ptr(), grad_keeps[k].data_ptr(), keeps[k].data_ptr(),
                                              code_of(keeps), s.batch, s.channels, tau, current_stream()));
  return {grad_x, grad_p};
}

at::Tensor branch_combine(const std::vector<at::Tensor>& ys, const at::Tensor& weights,
                          const c10::optional<at::Tensor>& skip) {
  const bool per_example = check_combine(ys, weights, skip, kCUDA);
  const int64_t batch = ys[0].size(0), n_branches = static_cast<int64_t>(ys.size());
  const c10::cuda::CUDAGuard guard(ys[0].device());
  at::Tensor out = at::empty_like(ys[0]);
  if (out.numel() == 0) return out;
  std::vector<const void*> ptrs;
  for (const at::Tensor& y : ys) ptrs.push_back(y.data_ptr());
  PGNAS_CUDA_CHECK(pgnas_branch_combine(out.data_ptr(), ptrs.data(), static_cast<int32_t>(n_branches), code_of(out),
                                        weights.data_ptr(), code_of(weights), per_example ? 1 : 0,
                                        skip.has_value() ? skip->data_ptr() : nullptr, batch, out.numel() / batch,
                                        current_stream()));
  return out;
}

at::Tensor ticket_counter(const at::Device& device);  // below, with the regulariser's

std::tuple<std::vector<at::Tensor>, at::Tensor> branch_combine_backward(
    const at::Tensor& grad, const std::vector<at::Tensor>& ys, const at::Tensor& weights,
    const c10::optional<at::Tensor>& backward_weights) {
  const bool per_example = check_combine_backward(grad, ys, weights, backward_weights, kCUDA);
  const int64_t batch = ys[0].size(0), n_branches = static_cast<int64_t>(ys.size());
  const bool shake = backward_weights.has_value();
  const c10::cuda::CUDAGuard guard(ys[0].device());
  // shake-shake: the forward weights are random constants, not parameters
  at::Tensor grad_w = shake ? at::zeros_like(weights) : at::empty_like(weights);
  const at::Tensor wb = shake ? backward_weights->to(weights.scalar_type()).contiguous() : weights;
  std::vector<at::Tensor> grad_ys;
  std::vector<const void*> y_ptrs;
  std::vector<void*> gy_ptrs;
  for (const at::Tensor& y : ys) {
    grad_ys.push_back(at::empty_like(y));
    y_ptrs.push_back(y.data_ptr());
    gy_ptrs.push_back(grad_ys.back().data_ptr());
  }
  if (grad.numel() == 0) return {grad_ys, grad_w.zero_()};
  // the weight gradient's per-block partial sums and the ticket of the last block, which adds them in
  // a fixed order (bit-reproducible; every entry of grad_w written, so no zero fill)
  at::Tensor partials, counter;
  if (!shake) {
    partials = at::empty({PGNAS_COMBINE_PARTIALS(batch, n_branches)}, grad.options().dtype(at::kDouble));
    counter = ticket_counter(ys[0].device());
  }
  PGNAS_CUDA_CHECK(pgnas_branch_combine_backward(
      gy_ptrs.data(), shake ? nullptr : grad_w.data_ptr(), shake ? nullptr : partials.data_ptr<double>(),
      shake ? nullptr : static_cast<unsigned int*>(counter.data_ptr()), grad.data_ptr(), y_ptrs.data(),
      static_cast<int32_t>(n_branches), code_of(grad), wb.data_ptr(), code_of(wb), per_example ? 1 : 0, batch,
      grad.numel() / batch, current_stream()));
  return {grad_ys, grad_w};
}

struct Table {
  std::vector<pgnas_reg_segment> segs;
  int64_t rows = 0, elements = 0, channels = 0;
  bool any_double = false;
};

Table segment_table(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& p_logits) {
  TORCH_CHECK_VALUE(!weights.empty() && weights.size() == p_logits.size(),
                    "weights and p_logits must be non-empty lists of equal length, got ", weights.size(), " and ",
                    p_logits.size());
  Table t;
  t.segs.resize(weights.size());
  for (size_t k = 0; k < weights.size(); ++k) {
    pgnas_reg_segment& s = t.segs[k];
    check_gated_weight(k, weights[k], p_logits[k], kCUDA, &s.groups, &s.per_group, &s.taps);
    const std::string wn = "weights[" + std::to_string(k) + "]";
    check_same_device(wn.c_str(), weights[k], "weights[0]", weights[0]);
    s.weight = weights[k].data_ptr();
    s.p_logit = p_logits[k].data_ptr();
    s.weight_dtype = code_of(weights[k]);
    s.p_logit_double = p_logits[k].scalar_type() == at::kDouble;
    t.any_double = t.any_double || s.p_logit_double;
    s.out_channels = weights[k].size(0);
    s.row_begin = t.rows;
    s.weight_begin = t.elements;
    s.channel_begin = t.channels;
    t.rows += s.out_channels;
    t.elements += weights[k].numel();
    t.channels += s.groups * s.per_group;
  }
  return t;
}

// A segment table in device memory, cached by its bytes and device. A table holds only the
// parameters' addresses, shapes and offsets (gradients go to flat buffers passed to the launch), which
// stay fixed across training steps: after the first call nothing is copied to the device, so a CUDA
// graph can capture the launches, and a stale entry is never wrong. Bounded: emptied when full (the
// tables a graph has captured stay alive).
constexpr size_t kTableCacheEntries = 64;

template <typename Segment>
at::Tensor device_table(const std::vector<Segment>& segs, const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::pair<int, std::string>, at::Tensor> cache;
  const size_t bytes = segs.size() * sizeof(Segment);
  std::pair<int, std::string> key{device.index(), std::string(reinterpret_cast<const char*>(segs.data()), bytes)};
  // tables a CUDA graph has captured a launch with: kept for the process, whatever the cache clears,
  // since every replay reads them again
  static std::map<const void*, at::Tensor> captured;
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) {
    if (capturing) captured.emplace(found->second.data_ptr(), found->second);
    return found->second;
  }
  // a host-to-device copy captured in a CUDA graph would re-read a pinned buffer reused since
  TORCH_CHECK(!capturing,
              "no launch table is cached for these tensors, and none can be copied to the device while a CUDA "
              "graph is being captured: run the same call (same tensors) once before the capture");
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), segs.data(), bytes);
  at::Tensor table = host.to(device, /*non_blocking=*/true);  // the caching allocator keeps `host` until copied
  if (cache.size() >= kTableCacheEntries) cache.clear();
  cache.emplace(std::move(key), table);
  return table;
}

// A gradient scalar as the whole-network kernels read it: float32 or float64 as it is (no cast launch).
at::Tensor scalar_as_read(const at::Tensor& grad) {
  return grad.scalar_type() == at::kDouble || grad.scalar_type() == at::kFloat ? grad : grad.to(at::kFloat);
}

// The regulariser's ticket counter (pgnas_regularizer): an int32 zero per device and stream, which
// each call's last block leaves at zero again. While a CUDA graph is being captured, a fresh zero of
// the capture instead (kept alive by the caller until the launch is enqueued): its fill is captured
// and runs at every replay, and no two graphs, nor a graph and eager calls, share a counter. A cached
// one made during a capture would be zeroed only by that graph's replays (its fill never runs
// eagerly), so another graph captured on the same stream (torch.cuda.graph's default capture stream
// is one for all graphs) or an eager call there would take its tickets from uninitialised memory.
at::Tensor ticket_counter(const at::Device& device) {
  const auto zero = [&device] { return at::zeros({1}, at::TensorOptions().device(device).dtype(at::kInt)); };
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return zero();
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> counters;
  const cudaStream_t stream = current_stream();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = counters[{device.index(), stream}];
  if (!counter.defined()) counter = zero();
  return counter;
}

at::Tensor regularizer(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& p_logits,
                       double weight_reg, double drop_reg, double n_train) {
  check_coefficients(weight_reg, drop_reg, n_train);
  const Table t = segment_table(weights, p_logits);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const at::Tensor table = device_table(t.segs, weights[0].device());
  at::Tensor result = at::empty({}, weights[0].options().dtype(t.any_double ? at::kDouble : at::kFloat));
  const at::Tensor partials = at::empty({PGNAS_REG_MAX_BLOCKS}, weights[0].options().dtype(at::kDouble));
  const at::Tensor counter = ticket_counter(weights[0].device());
  PGNAS_CUDA_CHECK(pgnas_regularizer(result.data_ptr(), t.any_double ? 1 : 0, partials.data_ptr<double>(),
                                     static_cast<unsigned int*>(counter.data_ptr()),
                                     static_cast<const pgnas_reg_segment*>(table.data_ptr()),
                                     static_cast<int32_t>(t.segs.size()), t.rows, t.channels, weight_reg, drop_reg,
                                     n_train, current_stream()));
  return result;
}

std::tuple<at::Tensor, at::Tensor> regularizer_backward(const at::Tensor& grad, const std::vector<at::Tensor>& weights,
                                                        const std::vector<at::Tensor>& p_logits, double weight_reg,
                                                        double drop_reg, double n_train) {
  check_coefficients(weight_reg, drop_reg, n_train);
  const Table t = segment_table(weights, p_logits);
  check_one_dtype("weights", weights);
  check_one_dtype("p_logits", p_logits);
  check_same_device("grad", grad, "weights[0]", weights[0]);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one value, got shape ", grad.sizes());
  const c10::cuda::CUDAGuard guard(weights[0].device());
  at::Tensor grad_weights = flat_gradient(weights), grad_p_logits = flat_gradient(p_logits);
  const at::Tensor table = device_table(t.segs, weights[0].device());
  const at::Tensor g = scalar_as_read(grad);
  PGNAS_CUDA_CHECK(pgnas_regularizer_backward(g.data_ptr(), g.scalar_type() == at::kDouble ? 1 : 0,
                                              grad_weights.data_ptr(), grad_p_logits.data_ptr(),
                                              static_cast<const pgnas_reg_segment*>(table.data_ptr()),
                                              static_cast<int32_t>(t.segs.size()), t.rows, t.channels, weight_reg,
                                              drop_reg, n_train, current_stream()));
  return {grad_weights, grad_p_logits};
}

// ---- the Gaussian family ------------------------------------------------------------------------

at::Tensor gaussian_noise(const at::Tensor& mu, const at::Tensor& var, int64_t seed, int64_t stream, int64_t offset) {
  const cpu::NoiseShape g = check_noise("mu", mu, "var", var, seed, stream, offset, kCUDA);
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor out = at::empty_like(mu);
  if (mu.numel() == 0) return out;
  PGNAS_CUDA_CHECK(pgnas_gaussian_noise(out.data_ptr(), mu.data_ptr(), var.data_ptr(), code_of(mu), g.batch,
                                        g.channels, g.spatial, layout_code(g.layout), static_cast<uint64_t>(seed),
                                        static_cast<uint64_t>(stream), static_cast<uint64_t>(offset),
                                        current_stream()));
  return out;
}

at::Tensor gaussian_noise_backward(const at::Tensor& grad, const at::Tensor& var, int64_t seed, int64_t stream,
                                   int64_t offset) {
  const cpu::NoiseShape g = check_noise("var", var, "grad", grad, seed, stream, offset, kCUDA);
  const c10::cuda::CUDAGuard guard(var.device());
  at::Tensor grad_var = at::empty_like(var);
  if (var.numel() == 0) return grad_var;
  PGNAS_CUDA_CHECK(pgnas_gaussian_noise_backward(grad_var.data_ptr(), grad.data_ptr(), var.data_ptr(), code_of(var),
                                                 g.batch, g.channels, g.spatial, layout_code(g.layout),
                                                 static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                                                 static_cast<uint64_t>(offset), current_stream()));
  return grad_var;
}

std::vector<pgnas_kl_segment> kl_segments(const std::vector<at::Tensor>& log_alphas,
                                          const std::vector<int64_t>& weights_per_channel, double n_train,
                                          int64_t* max_channels) {
  std::vector<pgnas_kl_segment> segs(log_alphas.size());
  *max_channels = 0;
  for (size_t k = 0; k < segs.size(); ++k) {
    segs[k].log_alpha = log_alphas[k].data_ptr();
    segs[k].is_double = log_alphas[k].scalar_type() == at::kDouble;
    segs[k].reserved = 0;
    segs[k].channels = log_alphas[k].size(0);
    segs[k].channel_begin = k == 0 ? 0 : segs[k - 1].channel_begin + segs[k - 1].channels;
    segs[k].scale = static_cast<double>(weights_per_channel[k]) / n_train;
    *max_channels = std::max(*max_channels, segs[k].channels);
  }
  return segs;
}

at::Tensor gaussian_kl(const std::vector<at::Tensor>& log_alphas, const std::vector<int64_t>& weights_per_channel,
                       double n_train) {
  const bool any_double = check_kl(log_alphas, weights_per_channel, n_train, kCUDA);
  const c10::cuda::CUDAGuard guard(log_alphas[0].device());
  int64_t max_channels = 0;
  const std::vector<pgnas_kl_segment> segs = kl_segments(log_alphas, weights_per_channel, n_train, &max_channels);
  const at::Tensor table = device_table(segs, log_alphas[0].device());
  at::Tensor result = at::empty({}, log_alphas[0].options().dtype(any_double ? at::kDouble : at::kFloat));
  PGNAS_CUDA_CHECK(pgnas_gaussian_kl(result.data_ptr(), any_double ? 1 : 0,
                                     static_cast<const pgnas_kl_segment*>(table.data_ptr()),
                                     static_cast<int32_t>(segs.size()), current_stream()));
  return result;
}

at::Tensor gaussian_kl_backward(const at::Tensor& grad, const std::vector<at::Tensor>& log_alphas,
                                const std::vector<int64_t>& weights_per_channel, double n_train) {
  check_kl(log_alphas, weights_per_channel, n_train, kCUDA);
  check_one_dtype("log_alphas", log_alphas);
  check_same_device("grad", grad, "log_alphas[0]", log_alphas[0]);
  TORCH_CHECK_VALUE(grad.numel() == 1, "grad must hold one value, got shape ", grad.sizes());
  const c10::cuda::CUDAGuard guard(log_alphas[0].device());
  int64_t max_channels = 0;
  const std::vector<pgnas_kl_segment> segs = kl_segments(log_alphas, weights_per_channel, n_train, &max_channels);
  at::Tensor grads = flat_gradient(log_alphas);
  const at::Tensor table = device_table(segs, log_alphas[0].device());
  const at::Tensor g = scalar_as_read(grad);
  PGNAS_CUDA_CHECK(pgnas_gaussian_kl_backward(g.data_ptr(), g.scalar_type() == at::kDouble ? 1 : 0, grads.data_ptr(),
                                              static_cast<const pgnas_kl_segment*>(table.data_ptr()),
                                              static_cast<int32_t>(segs.size()), max_channels, current_stream()));
  return grads;
}

}  // namespace

void register_cuda_ops(pybind11::module_& m) {
  m.doc() = "The `cuda` backend: raw-pointer CUDA kernels (kernels/*.cu) on the current stream.";
  PGNAS_DEFINE_OPS(m);
}

}  // namespace pgnas
