// The `cpu` backend's kernels (design.md layer 6): the op set on raw pointers, C++ with OpenMP.
//
// No torch headers: csrc/cpu/ops.cpp instantiates these for float, double, c10::Half and
// c10::BFloat16 data after validating the tensors, and csrc/tests/test_cpu.cpp checks them against
// plain loops. Gate math runs in the gate type G (float, or double on the gradcheck path); data of
// type T is widened to Acc<T, G> (float, or double when T or G is double), as the reference's type
// promotion does. Inner loops are unit-stride and written for the auto-vectoriser (`omp simd` where a
// reduction would otherwise keep them scalar).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../../kernels/philox.h"

namespace pgnas {
namespace cpu {

enum class GateMode { relaxed = 0, hard = 1, full = 2 };
enum class Layout { nchw = 0, nhwc = 1 };  // [B, C, S] or [B, S, C] in memory

template <typename T, typename G>
using Acc = typename std::conditional<std::is_same<T, double>::value || std::is_same<G, double>::value, double,
                                      float>::type;

// Below this many elements a loop runs on the calling thread: an OpenMP fork costs microseconds.
constexpr int64_t kParallelGrain = 1 << 15;
// Elements per unit of work in the flat loops (fits L1 with a few streams).
constexpr int64_t kChunk = 2048;

inline void philox_uniform(float* out, int64_t n, uint64_t seed, uint64_t stream, uint64_t offset) {
#pragma omp parallel for schedule(static) if (n > kParallelGrain / 8)
  for (int64_t j = 0; j < n; ++j) out[j] = philox_uniform_at(seed, stream, offset + static_cast<uint64_t>(j));
}

// Hard masks of K candidates: keep[k, c] = 0 iff u + p_c >= 1, u of element c of stream
// domain << 56 | candidates[k] << 16 | layer (the candidate's stream for this gate layer).
template <typename G>
void candidate_keep(G* keep, const G* drop_prob, const int64_t* candidates, int64_t count, int64_t channels,
                    uint64_t seed, int64_t layer, int64_t domain) {
#pragma omp parallel for schedule(static) if (count * channels > kParallelGrain / 8)
  for (int64_t j = 0; j < count * channels; ++j) {
    const int64_t c = j % channels;
    const uint64_t stream = static_cast<uint64_t>(domain) << 56 | static_cast<uint64_t>(candidates[j / channels]) << 16 |
                            static_cast<uint64_t>(layer);
    const G u = static_cast<G>(philox_uniform_at(seed, stream, static_cast<uint64_t>(c)));
    keep[j] = (u + drop_prob[c] < G(1)) ? G(1) : G(0);
  }
}

// d p_logit [C] = -(1 / tau) sum_b grad_keep[b, c] keep (1 - keep), summed in double (relaxed only).
template <typename G>
void gate_keep_backward(G* grad_p, const G* grad_keep, const G* keep, int64_t batch, int64_t channels,
                        double tau) {
  std::vector<double> acc(static_cast<size_t>(channels), 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    const G* gk = grad_keep + b * channels;
    const G* k = keep + b * channels;
    for (int64_t c = 0; c < channels; ++c)
      acc[c] += static_cast<double>(gk[c]) * static_cast<double>(k[c]) * (1.0 - static_cast<double>(k[c]));
  }
  for (int64_t c = 0; c < channels; ++c) grad_p[c] = static_cast<G>(-acc[c] / tau);
}

// out = f(x, c) * keep[b, c] over the S trailing elements of each (b, c), f elementwise in Acc<T, G>:
// the walk of every gated elementwise forward (NCHW: rows (b, c) of S; NHWC: rows (b, s) of C).
template <typename T, typename G, typename F>
void gated_map(T* out, const T* x, const G* keep, int64_t batch, int64_t channels, int64_t spatial, Layout layout,
               F f) {
  using A = Acc<T, G>;
  const int64_t total = batch * channels * spatial;
  if (layout == Layout::nchw) {
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
    for (int64_t r = 0; r < batch * channels; ++r) {
      const int64_t c = r % channels;
      const A k = static_cast<A>(keep[r]);
      const T* xr = x + r * spatial;
      T* o = out + r * spatial;
      for (int64_t s = 0; s < spatial; ++s) o[s] = static_cast<T>(f(static_cast<A>(xr[s]), c) * k);
    }
  } else {
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
    for (int64_t row = 0; row < batch * spatial; ++row) {
      const G* k = keep + (row / spatial) * channels;
      const T* xr = x + row * channels;
      T* o = out + row * channels;
      for (int64_t c = 0; c < channels; ++c) o[c] = static_cast<T>(f(static_cast<A>(xr[c]), c) * static_cast<A>(k[c]));
    }
  }
}

// out = x * keep[b, c] over the S trailing elements of each (b, c).
template <typename T, typename G>
void gated_apply(T* out, const T* x, const G* keep, int64_t batch, int64_t channels, int64_t spatial,
                 Layout layout) {
  using A = Acc<T, G>;
  gated_map(out, x, keep, batch, channels, spatial, layout, [](A v, int64_t) { return v; });
}

// grad_x = grad * keep; grad_keep[b, c] = sum_s grad * x (skipped when grad_keep is null: hard and
// full gates have no p_logit gradient). One pass over grad and x.
template <typename T, typename G>
void gated_apply_backward(T* grad_x, G* grad_keep, const T* grad, const T* x, const G* keep, int64_t batch,
                          int64_t channels, int64_t spatial, Layout layout) {
  using A = Acc<T, G>;
  const int64_t total = batch * channels * spatial;
  if (grad_keep == nullptr) {
    gated_apply(grad_x, grad, keep, batch, channels, spatial, layout);
    return;
  }
  if (layout == Layout::nchw) {
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
    for (int64_t r = 0; r < batch * channels; ++r) {
      const A k = static_cast<A>(keep[r]);
      const T* gr = grad + r * spatial;
      const T* xr = x + r * spatial;
      T* gx = grad_x + r * spatial;
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t s = 0; s < spatial; ++s) {
        const A g = static_cast<A>(gr[s]);
        gx[s] = static_cast<T>(g * k);
        dot += g * static_cast<A>(xr[s]);
      }
      grad_keep[r] = static_cast<G>(dot);
    }
  } else {
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<A> dot(static_cast<size_t>(channels), A(0));
      const G* k = keep + b * channels;
      for (int64_t s = 0; s < spatial; ++s) {
        const int64_t base = (b * spatial + s) * channels;
        const T* gr = grad + base;
        const T* xr = x + base;
        T* gx = grad_x + base;
        A* d = dot.data();
        for (int64_t c = 0; c < channels; ++c) {
          const A g = static_cast<A>(gr[c]);
          gx[c] = static_cast<T>(g * static_cast<A>(k[c]));
          d[c] += g * static_cast<A>(xr[c]);
        }
      }
      for (int64_t c = 0; c < channels; ++c) grad_keep[b * channels + c] = static_cast<G>(dot[c]);
    }
  }
}

// out[b, e] = sum_s w[b, s] ys[s][b, e] (+ skip[b, e]) over the E elements of each example; w is
// [B, S] (per_example) or [S]. Any layout whose outermost dim is the batch works: every tensor
// shares it.
template <typename T, typename W>
void branch_combine(T* out, const T* const* ys, int64_t n_branches, const W* weights, bool per_example,
                    const T* skip, int64_t batch, int64_t per_batch) {
  using A = Acc<T, W>;
  const int64_t chunks = (per_batch + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) schedule(static) if (batch * per_batch > kParallelGrain)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t q = 0; q < chunks; ++q) {
      A acc[kChunk];
      const int64_t begin = b * per_batch + q * kChunk;
      const int64_t len = std::min(kChunk, per_batch - q * kChunk);
      if (skip) {
        for (int64_t e = 0; e < len; ++e) acc[e] = static_cast<A>(skip[begin + e]);
      } else {
        for (int64_t e = 0; e < len; ++e) acc[e] = A(0);
      }
      for (int64_t s = 0; s < n_branches; ++s) {
        const A w = static_cast<A>(per_example ? weights[b * n_branches + s] : weights[s]);
        const T* y = ys[s] + begin;
        for (int64_t e = 0; e < len; ++e) acc[e] += w * static_cast<A>(y[e]);
      }
      for (int64_t e = 0; e < len; ++e) out[begin + e] = static_cast<T>(acc[e]);
    }
  }
}

// grad_ys[s] = grad * wb[., s] (wb: the backward weights, or the forward ones); grad_w (null with
// shake-shake backward weights) = sum over each example (per_example) or everything of grad * ys[s].
template <typename T, typename W>
void branch_combine_backward(T* const* grad_ys, W* grad_w, const T* grad, const T* const* ys, int64_t n_branches,
                             const W* wb, bool per_example, int64_t batch, int64_t per_batch) {
  using A = Acc<T, W>;
  const int64_t chunks = (per_batch + kChunk - 1) / kChunk;
  // partial dot products per (example, chunk, branch), summed in double afterwards
  std::vector<double> partial(grad_w ? static_cast<size_t>(batch * chunks * n_branches) : 0, 0.0);
#pragma omp parallel for collapse(2) schedule(static) if (batch * per_batch > kParallelGrain)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t begin = b * per_batch + q * kChunk;
      const int64_t len = std::min(kChunk, per_batch - q * kChunk);
      const T* g = grad + begin;
      for (int64_t s = 0; s < n_branches; ++s) {
        const A w = static_cast<A>(per_example ? wb[b * n_branches + s] : wb[s]);
        T* gy = grad_ys[s] + begin;
        for (int64_t e = 0; e < len; ++e) gy[e] = static_cast<T>(static_cast<A>(g[e]) * w);
        if (grad_w) {
          const T* y = ys[s] + begin;
          A dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < len; ++e) dot += static_cast<A>(g[e]) * static_cast<A>(y[e]);
          partial[(b * chunks + q) * n_branches + s] = static_cast<double>(dot);
        }
      }
    }
  }
  if (!grad_w) return;
  std::vector<double> total(static_cast<size_t>(per_example ? batch * n_branches : n_branches), 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t q = 0; q < chunks; ++q)
      for (int64_t s = 0; s < n_branches; ++s)
        total[(per_example ? b * n_branches : 0) + s] += partial[(b * chunks + q) * n_branches + s];
  for (size_t j = 0; j < total.size(); ++j) grad_w[j] = static_cast<W>(total[j]);
}

// ---- the regulariser: one multi-tensor pass over every gated weight ---------------------------------
// A weight [O, C_in / G, K...] is O rows of per_group * K elements; row o reads input channels
// (o / (O / G)) * per_group + j. Rows of all tensors form one index space (the segment table), so one
// parallel loop covers the whole network however many layers it has (apex's multi_tensor_apply).

// A row's elements e = j * taps + k read input channel j of the row's group; `keep_e[e]` is that
// channel's (1 - p) repeated over the taps, built once per group, so the row loop, squares and
// gradient alike, is flat and unit-stride (vectorised; a loop over 9 taps per channel is not).

// The regulariser's pass gets an AVX2 clone picked when the library loads (function multiversioning,
// GCC and Clang on x86-64 Linux), so the package still runs on any x86-64 while the double sums run
// four wide where the machine can. The loops have no cross-lane reductions and no fused multiply-adds
// (AVX2 alone does not enable FMA), so both clones give the same bits.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define PGNAS_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define PGNAS_AVX2_CLONE
#endif

// sq_e[e] += W[row, e]^2 over rows [first, end), in double, and where grad_weight is given
// grad_w[row, e] = scale_e[e] * W[row, e] in the same read of the rows (the pass is memory-bound). The
// product is taken in float for float/half/bfloat16 weights: the gradient is rounded to their
// precision anyway. Per element, in row order: the sums do not depend on the vector width.
template <typename T>
PGNAS_AVX2_CLONE void rows_squares(void* grad_weight, const void* weight, int64_t first, int64_t end,
                                   int64_t row_len, const double* scale_e, double* sq_e) {
  using A = Acc<T, float>;
  const T* w = static_cast<const T*>(weight) + first * row_len;
  if (grad_weight == nullptr) {
    for (int64_t r = first; r < end; ++r, w += row_len) {
#pragma omp simd
      for (int64_t e = 0; e < row_len; ++e) {
        const double v = static_cast<double>(w[e]);
        sq_e[e] += v * v;
      }
    }
    return;
  }
  T* gw = static_cast<T*>(grad_weight) + first * row_len;
  for (int64_t r = first; r < end; ++r, w += row_len, gw += row_len) {
#pragma omp simd
    for (int64_t e = 0; e < row_len; ++e) {
      const A v = static_cast<A>(w[e]);
      gw[e] = static_cast<T>(static_cast<A>(scale_e[e]) * v);
      sq_e[e] += static_cast<double>(v) * static_cast<double>(v);
    }
  }
}

struct RegSegment {
  const void* weight;  // [O, per_group, taps], contiguous
  void* grad_weight;   // same shape and type (the gradient passes only)
  const void* p_logit;  // [groups * per_group], float or double (p_logit_double)
  void* grad_p_logit;   // same type as p_logit (the gradient passes only)
  bool p_logit_double;
  int64_t out_channels, per_group, taps, groups;
  void (*squares)(void*, const void*, int64_t, int64_t, int64_t, const double*, double*);  // rows_squares<T>
};

// Element i of a buffer of the gate dtype chosen at run time (float32, or float64 when is_double), as
// double: the whole-network ops' drop logits, log alphas and their gradients.
inline double load_gate(const void* p, bool is_double, int64_t i) {
  return is_double ? static_cast<const double*>(p)[i] : static_cast<double>(static_cast<const float*>(p)[i]);
}
inline void store_gate(void* p, bool is_double, int64_t i, double v) {
  if (is_double) {
    static_cast<double*>(p)[i] = v;
  } else {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

inline double load_logit(const RegSegment& seg, int64_t c) { return load_gate(seg.p_logit, seg.p_logit_double, c); }

inline double log_sigmoid(double z) { return std::min(z, 0.0) - std::log1p(std::exp(-std::fabs(z))); }

// Work items: up to kRowsPerItem consecutive rows of one group of one segment. An item owns its rows'
// weight gradients and per-j partial sums of squares; partials are combined per channel in item
// order, so results do not depend on the thread count or schedule (a search must give byte-identical
// logs from its seed; an OpenMP reduction's combining order is unspecified).
constexpr int64_t kRowsPerItem = 32;

struct RegItem {
  int64_t segment, first_row, end_row, partial_begin;  // partial_begin: offset of its per_group sums
};

struct RegTables {
  std::vector<RegItem> items;  // ordered by segment, group, rows
  std::vector<int64_t> channel_begin;  // first global channel of each segment, plus the end
  std::vector<double> keep_prob;  // 1 - p = sigmoid(-z) per global channel
  std::vector<int64_t> keep_e_begin;  // per segment: offset of its groups' keep_e rows in keep_e
  std::vector<double> keep_e;  // per segment and group: (1 - p) of each row element (per_group * taps)
  int64_t partials = 0;  // total per-j partial sums
  int64_t width = 1;  // longest row (per_group * taps)
};

inline RegTables reg_tables(const std::vector<RegSegment>& segs) {
  RegTables t;
  t.channel_begin.push_back(0);
  for (size_t k = 0; k < segs.size(); ++k) {
    const RegSegment& s = segs[k];
    const int64_t outs = s.out_channels / s.groups;
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t o = g * outs; o < (g + 1) * outs; o += kRowsPerItem) {
        t.items.push_back({static_cast<int64_t>(k), o, std::min(o + kRowsPerItem, (g + 1) * outs), t.partials});
        t.partials += s.per_group;
      }
    t.channel_begin.push_back(t.channel_begin.back() + s.groups * s.per_group);
    t.width = std::max(t.width, s.per_group * s.taps);
  }
  t.keep_prob.resize(static_cast<size_t>(t.channel_begin.back()));
  for (size_t k = 0; k < segs.size(); ++k) {
    const RegSegment& s = segs[k];
    t.keep_e_begin.push_back(static_cast<int64_t>(t.keep_e.size()));
    for (int64_t c = 0; c < s.groups * s.per_group; ++c) {
      const double kp = 1.0 / (1.0 + std::exp(load_logit(s, c)));
      t.keep_prob[t.channel_begin[k] + c] = kp;
      t.keep_e.insert(t.keep_e.end(), static_cast<size_t>(s.taps), kp);  // channel-major: row element order
    }
  }
  return t;
}

// The keep_e row of the group that `row` of segment k belongs to.
inline const double* row_keep_e(const RegTables& t, const RegSegment& s, size_t k, int64_t row) {
  return t.keep_e.data() + t.keep_e_begin[k] + (row / (s.out_channels / s.groups)) * s.per_group * s.taps;
}

// sq_c = sum of W^2 over the weights channel c gates, per global channel (t.channel_begin), in one
// parallel read of every weight; where `gradients` is set, also grad_w = weight_scale (1 - p_c) W.
// Summed in a fixed order (per element over an item's rows, then over taps, then items in order), so
// the forward, the backward and the fused call agree on sq bit for bit whatever the thread count.
inline std::vector<double> channel_squares(const std::vector<RegSegment>& segs, const RegTables& t,
                                           bool gradients, double weight_scale) {
  const int64_t n_items = static_cast<int64_t>(t.items.size());
  std::vector<double> partial(static_cast<size_t>(t.partials));
#pragma omp parallel if (n_items > 4)
  {
    std::vector<double> sq_e(static_cast<size_t>(t.width)), scale_e(static_cast<size_t>(t.width));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) {
      const RegItem& item = t.items[i];
      const RegSegment& s = segs[item.segment];
      const int64_t row_len = s.per_group * s.taps;
      const double* keep_e = row_keep_e(t, s, item.segment, item.first_row);
      std::fill_n(sq_e.begin(), row_len, 0.0);
      if (gradients)
        for (int64_t e = 0; e < row_len; ++e) scale_e[e] = weight_scale * keep_e[e];
      s.squares(gradients ? s.grad_weight : nullptr, s.weight, item.first_row, item.end_row, row_len,
                scale_e.data(), sq_e.data());
      double* acc = partial.data() + item.partial_begin;  // per j: its taps' sums
      for (int64_t j = 0; j < s.per_group; ++j) {
        double sum = 0;
        for (int64_t k = 0; k < s.taps; ++k) sum += sq_e[j * s.taps + k];
        acc[j] = sum;
      }
    }
  }
  std::vector<double> sq(t.keep_prob.size(), 0.0);  // per channel: its group's partials in item order
  for (const RegItem& item : t.items) {
    const RegSegment& s = segs[item.segment];
    const double* acc = partial.data() + item.partial_begin;
    const int64_t group = item.first_row / (s.out_channels / s.groups);
    double* dst = sq.data() + t.channel_begin[item.segment] + group * s.per_group;
    for (int64_t j = 0; j < s.per_group; ++j) dst[j] += acc[j];
  }
  return sq;
}

// R = weight_reg / n sum_c (1 - p_c) sq_c + drop_reg / n sum_c H'(p_c), in double.
inline double regularizer_value(const std::vector<RegSegment>& segs, const RegTables& t, const std::vector<double>& sq,
                                double weight_reg, double drop_reg, double n_train) {
  double weight_term = 0, entropy = 0;  // H'(p) = p log p + (1 - p) log(1 - p) from the logit
  for (size_t k = 0; k < segs.size(); ++k)
    for (int64_t c = 0; c < segs[k].groups * segs[k].per_group; ++c) {
      const double z = load_logit(segs[k], c);
      const double p = 1.0 / (1.0 + std::exp(-z));  // not 1 - keep_prob: exact for tiny p
      weight_term += t.keep_prob[t.channel_begin[k] + c] * sq[t.channel_begin[k] + c];
      // 1 - p without cancelling; at p exactly 0 or 1 (z infinite) the limit 0, not 0 * inf
      if (!std::isinf(z)) entropy += p * log_sigmoid(z) + 1.0 / (1.0 + std::exp(z)) * log_sigmoid(-z);
    }
  return weight_reg / n_train * weight_term + drop_reg / n_train * entropy;
}

inline double regularizer(const std::vector<RegSegment>& segs, double weight_reg, double drop_reg, double n_train) {
  const RegTables t = reg_tables(segs);
  return regularizer_value(segs, t, channel_squares(segs, t, false, 0.0), weight_reg, drop_reg, n_train);
}

// dR/dW = grad * 2 weight_reg / n (1 - p_c) W;  dR/dz = grad p (1 - p) (drop_reg / n z - weight_reg / n sq_c).
// Returns sq.
inline std::vector<double> regularizer_gradients(const std::vector<RegSegment>& segs, const RegTables& t, double grad,
                                                 double weight_reg, double drop_reg, double n_train) {
  std::vector<double> sq = channel_squares(segs, t, true, grad * 2.0 * weight_reg / n_train);
  for (size_t k = 0; k < segs.size(); ++k) {
    const RegSegment& s = segs[k];
    for (int64_t c = 0; c < s.groups * s.per_group; ++c) {
      const double z = load_logit(s, c);
      const double kp = t.keep_prob[t.channel_begin[k] + c];
      const double p = 1.0 / (1.0 + std::exp(-z));
      // 0 at an infinite z (p (1 - p) is 0 there; the formula would give 0 * inf)
      const double dz = std::isinf(z) ? 0.0
          : grad * p * kp * (drop_reg / n_train * z - weight_reg / n_train * sq[t.channel_begin[k] + c]);
      store_gate(s.grad_p_logit, s.p_logit_double, c, dz);
    }
  }
  return sq;
}

inline void regularizer_backward(const std::vector<RegSegment>& segs, double grad, double weight_reg,
                                 double drop_reg, double n_train) {
  regularizer_gradients(segs, reg_tables(segs), grad, weight_reg, drop_reg, n_train);
}

// R and regularizer_backward's gradients for grad 1 from one read of the weights instead of two: the
// eager forward's path when a gradient will be wanted. Same bits as the two calls.
inline double regularizer_with_grad(const std::vector<RegSegment>& segs, double weight_reg, double drop_reg,
                                    double n_train) {
  const RegTables t = reg_tables(segs);
  const std::vector<double> sq = regularizer_gradients(segs, t, 1.0, weight_reg, drop_reg, n_train);
  return regularizer_value(segs, t, sq, weight_reg, drop_reg, n_train);
}

}  // namespace cpu
}  // namespace pgnas
