// The `cpu` backend's fused variants (design.md op set): BN affine -> ReLU -> gate in one pass, and one
// input -> K gated copies in one read.
//
// Same conventions as kernels.h (raw pointers, no torch headers, gate type G, accumulation type
// Acc<T, G>, dense NCHW or NHWC). keep [B, C] comes from keep_of (ops.cpp); scale and shift [C] are a
// BatchNorm folded with its statistics.
#pragma once

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace pgnas {
namespace cpu {

// out = relu(x * scale[c] + shift[c]) * keep[b, c]
template <typename T, typename G>
void affine_relu_gate(T* out, const T* x, const G* scale, const G* shift, const G* keep, int64_t batch,
                      int64_t channels, int64_t spatial, Layout layout) {
  using A = Acc<T, G>;
  gated_map(out, x, keep, batch, channels, spatial, layout, [scale, shift](A v, int64_t c) {
    return std::max(v * static_cast<A>(scale[c]) + static_cast<A>(shift[c]), A(0));
  });
}

// One pass over grad and x. With pre = x * scale + shift and live = grad * keep where pre > 0, else 0:
//   grad_x = live * scale;
//   row_scale[b, c] = sum_s live * x,  row_shift[b, c] = sum_s live   (reduced over b by the caller);
//   grad_keep[b, c] = sum_s grad * relu(pre)                           (relaxed only; null otherwise).
template <typename T, typename G>
void affine_relu_gate_backward(T* grad_x, double* row_scale, double* row_shift, G* grad_keep, const T* grad,
                               const T* x, const G* scale, const G* shift, const G* keep, int64_t batch,
                               int64_t channels, int64_t spatial, Layout layout) {
  using A = Acc<T, G>;
  const int64_t total = batch * channels * spatial;
  if (layout == Layout::nchw) {
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
    for (int64_t r = 0; r < batch * channels; ++r) {
      const int64_t c = r % channels;
      const A a = static_cast<A>(scale[c]), b = static_cast<A>(shift[c]), k = static_cast<A>(keep[r]);
      const T* gr = grad + r * spatial;
      const T* xr = x + r * spatial;
      T* gx = grad_x + r * spatial;
      A sum_scale = 0, sum_shift = 0, sum_keep = 0;
#pragma omp simd reduction(+ : sum_scale, sum_shift, sum_keep)
      for (int64_t s = 0; s < spatial; ++s) {
        const A xv = static_cast<A>(xr[s]), g = static_cast<A>(gr[s]);
        const A pre = xv * a + b;
        // selects, not a multiply by (pre > 0): 0 * inf would be NaN where the reference has 0
        const A live = pre > A(0) ? g * k : A(0);
        gx[s] = static_cast<T>(live * a);
        sum_scale += live * xv;
        sum_shift += live;
        sum_keep += g * (pre < A(0) ? A(0) : pre);
      }
      row_scale[r] = static_cast<double>(sum_scale);
      row_shift[r] = static_cast<double>(sum_shift);
      if (grad_keep != nullptr) grad_keep[r] = static_cast<G>(sum_keep);
    }
  } else {
#pragma omp parallel for schedule(static) if (total > kParallelGrain)
    for (int64_t bi = 0; bi < batch; ++bi) {
      std::vector<A> sum_scale(static_cast<size_t>(channels), A(0)), sum_shift(sum_scale), sum_keep(sum_scale);
      const G* k = keep + bi * channels;
      for (int64_t s = 0; s < spatial; ++s) {
        const int64_t base = (bi * spatial + s) * channels;
        const T* gr = grad + base;
        const T* xr = x + base;
        T* gx = grad_x + base;
        for (int64_t c = 0; c < channels; ++c) {
          const A xv = static_cast<A>(xr[c]), g = static_cast<A>(gr[c]), a = static_cast<A>(scale[c]);
          const A pre = xv * a + static_cast<A>(shift[c]);
          const A live = pre > A(0) ? g * static_cast<A>(k[c]) : A(0);
          gx[c] = static_cast<T>(live * a);
          sum_scale[c] += live * xv;
          sum_shift[c] += live;
          sum_keep[c] += g * (pre < A(0) ? A(0) : pre);
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        row_scale[bi * channels + c] = static_cast<double>(sum_scale[c]);
        row_shift[bi * channels + c] = static_cast<double>(sum_shift[c]);
        if (grad_keep != nullptr) grad_keep[bi * channels + c] = static_cast<G>(sum_keep[c]);
      }
    }
  }
}

// One input -> K gated copies: out[k] = src * keeps[k][b, c] with src = relu(x) (relu) or x; keeps is
// [K, B, C] and out [K, B * C * S] (each copy in x's layout). x is read once per row.
constexpr int64_t kMaxCopies = 16;  // = PGNAS_MAX_COPIES of kernels/pgnas_kernels.h (no CUDA header here)

template <typename T, typename G>
void gated_copies(T* out, const T* x, const G* keeps, int64_t copies, int64_t batch, int64_t channels,
                  int64_t spatial, bool relu, Layout layout) {
  using A = Acc<T, G>;
  const int64_t rows = batch * channels, n = rows * spatial;
  if (layout == Layout::nchw) {
#pragma omp parallel for schedule(static) if (n * copies > kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * spatial;
      for (int64_t k = 0; k < copies; ++k) {
        const A keep = static_cast<A>(keeps[k * rows + r]);
        T* o = out + k * n + r * spatial;
        for (int64_t s = 0; s < spatial; ++s) {
          const A v = static_cast<A>(xr[s]);
          o[s] = static_cast<T>((relu ? std::max(v, A(0)) : v) * keep);
        }
      }
    }
  } else {
#pragma omp parallel for schedule(static) if (n * copies > kParallelGrain)
    for (int64_t row = 0; row < batch * spatial; ++row) {
      const int64_t b = row / spatial;
      const T* xr = x + row * channels;
      for (int64_t k = 0; k < copies; ++k) {
        const G* keep = keeps + k * rows + b * channels;
        T* o = out + k * n + row * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const A v = static_cast<A>(xr[c]);
          o[c] = static_cast<T>((relu ? std::max(v, A(0)) : v) * static_cast<A>(keep[c]));
        }
      }
    }
  }
}

// The gated copies' backward walks the contiguous run of each row (NCHW: the S elements of one (b, c);
// NHWC: the C channels of one (b, s)) in tiles of at most kCopiesTile, copy by copy, so that every inner
// loop is one branch-free vectorisable stream (the ReLU is a template parameter: its signs are random).
constexpr int64_t kCopiesTile = 256;

// One tile of one copy: acc += g * keep and the copy's p-gradient terms g * src, src = relu(x) or x.
// kVarying (NHWC): keep and dot per element of the tile; else (NCHW) one keep and one dot for it all.
template <bool kRelu, bool kVarying, typename T, typename G, typename A>
inline void copies_backward_tile(A* acc, A* dot, const T* g, const T* xr, const G* keep, int64_t len) {
  if constexpr (kVarying) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const A gv = static_cast<A>(g[i]), v = static_cast<A>(xr[i]);
      acc[i] += gv * static_cast<A>(keep[i]);
      dot[i] += gv * (kRelu ? std::max(v, A(0)) : v);
    }
  } else {
    const A k = static_cast<A>(*keep);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      const A gv = static_cast<A>(g[i]), v = static_cast<A>(xr[i]);
      acc[i] += gv * k;
      sum += gv * (kRelu ? std::max(v, A(0)) : v);
    }
    *dot += sum;
  }
}

// grad_x of one tile: acc, zeroed where the ReLU was off.
template <bool kRelu, typename T, typename A>
inline void copies_backward_store(T* grad_x, const A* acc, const T* xr, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const A a = acc[i];  // loaded unconditionally: a select, not a branch, so the loop vectorises
    grad_x[i] = static_cast<T>(kRelu ? (static_cast<A>(xr[i]) > A(0) ? a : A(0)) : a);
  }
}

template <bool kRelu, typename T, typename G>
void gated_copies_backward_of(T* grad_x, G* grad_keeps, const T* grad, const T* x, const G* keeps, int64_t copies,
                              int64_t batch, int64_t channels, int64_t spatial, Layout layout) {
  using A = Acc<T, G>;
  const int64_t rows = batch * channels, n = rows * spatial;
  if (layout == Layout::nchw) {
#pragma omp parallel for schedule(static) if (n * copies > kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      A acc[kCopiesTile], dot[kMaxCopies] = {};
      for (int64_t s0 = 0; s0 < spatial; s0 += kCopiesTile) {
        const int64_t at = r * spatial + s0, len = std::min(kCopiesTile, spatial - s0);
        std::fill(acc, acc + len, A(0));
        for (int64_t k = 0; k < copies; ++k)
          copies_backward_tile<kRelu, false>(acc, dot + k, grad + k * n + at, x + at, keeps + k * rows + r, len);
        copies_backward_store<kRelu>(grad_x + at, acc, x + at, len);
      }
      if (grad_keeps != nullptr)
        for (int64_t k = 0; k < copies; ++k) grad_keeps[k * rows + r] = static_cast<G>(dot[k]);
    }
  } else {
#pragma omp parallel for schedule(static) if (n * copies > kParallelGrain)
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<A> dot(static_cast<size_t>(copies * channels), A(0));
      A acc[kCopiesTile];
      for (int64_t s = 0; s < spatial; ++s)
        for (int64_t c0 = 0; c0 < channels; c0 += kCopiesTile) {
          const int64_t at = (b * spatial + s) * channels + c0, len = std::min(kCopiesTile, channels - c0);
          std::fill(acc, acc + len, A(0));
          for (int64_t k = 0; k < copies; ++k)
            copies_backward_tile<kRelu, true>(acc, dot.data() + k * channels + c0, grad + k * n + at, x + at,
                                              keeps + k * rows + b * channels + c0, len);
          copies_backward_store<kRelu>(grad_x + at, acc, x + at, len);
        }
      if (grad_keeps != nullptr)
        for (int64_t k = 0; k < copies; ++k)
          for (int64_t c = 0; c < channels; ++c)
            grad_keeps[k * rows + b * channels + c] = static_cast<G>(dot[k * channels + c]);
    }
  }
}

// grad_x = relu'(x) * sum_k grad[k] keep_k (relu) or sum_k grad[k] keep_k; grad_keeps [K, B, C] (null
// unless relaxed) = sum_s grad[k] * src. One pass over x and each grad[k]; copies <= kMaxCopies.
template <typename T, typename G>
void gated_copies_backward(T* grad_x, G* grad_keeps, const T* grad, const T* x, const G* keeps, int64_t copies,
                           int64_t batch, int64_t channels, int64_t spatial, bool relu, Layout layout) {
  if (relu)
    gated_copies_backward_of<true>(grad_x, grad_keeps, grad, x, keeps, copies, batch, channels, spatial, layout);
  else
    gated_copies_backward_of<false>(grad_x, grad_keeps, grad, x, keeps, copies, batch, channels, spatial, layout);
}

// out[c] = sum_b rows[b, c], in batch order (deterministic).
template <typename G>
void sum_rows(G* out, const double* rows, int64_t batch, int64_t channels) {
  std::vector<double> acc(static_cast<size_t>(channels), 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) acc[c] += rows[b * channels + c];
  for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<G>(acc[c]);
}

}  // namespace cpu
}  // namespace pgnas
