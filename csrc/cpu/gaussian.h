// The `cpu` backend's kernels of the Gaussian posterior family (design.md "Gaussian family"): the
// local-reparameterization epilogue out = mu + sqrt(max(var, 0) + 1e-8) eps with its backward, and the
// whole network's Molchanov KL with its gradient. Raw pointers, no torch headers, as kernels.h.
//
// eps of element i (flat row-major index in the tensor's logical shape, plus `offset`) is
// philox_normal_at (kernels/philox.h), regenerated in backward, never stored. Math in float (double
// for double data), as the reference's.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../../kernels/philox.h"
#include "kernels.h"

namespace pgnas {
namespace cpu {

constexpr double kVarEps = 1e-8;  // keeps d var finite where var is 0

template <typename T>
using NoiseMath = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// The normal generators below are written as separate passes that GCC vectorises (kernels/philox.h
// is branch-free for this): the Philox words of a run, Box-Muller on them, then the picks, with the
// scalar functions' bits. One core: 4.4 ns per normal from whole counters, 14 from one counter per
// element, against 14 and 24 ns as one scalar loop.

// lanes[k][q] = normal k of counter first_quad + q * quad_stride, q < quads <= kChunk.
inline void normal_quad_lanes(float (*lanes)[kChunk], int64_t quads, uint64_t first_quad, uint64_t quad_stride,
                              uint64_t seed, uint64_t stream) {
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
#pragma omp simd
  for (int64_t q = 0; q < quads; ++q) {
    const uint64_t quad = first_quad + static_cast<uint64_t>(q) * quad_stride;
    const Philox4 r = philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), s0, s1, k0, k1);
    w0[q] = r.w[0];
    w1[q] = r.w[1];
    w2[q] = r.w[2];
    w3[q] = r.w[3];
  }
#pragma omp simd
  for (int64_t q = 0; q < quads; ++q) {  // philox_normal_quad's order
    const CosSin a = box_muller_pair(w0[q], w1[q]), b = box_muller_pair(w2[q], w3[q]);
    lanes[0][q] = a.cos;
    lanes[1][q] = a.sin;
    lanes[2][q] = b.cos;
    lanes[3][q] = b.sin;
  }
}

// eps[j] = normal of logical element first + j * stride, j < len <= kChunk. Unit stride (dense
// row-major data): one Philox counter per quad of elements; otherwise every element draws its own
// pair (channels_last runs whose positions do not fall in whole quads, see for_each_normal_run).
inline void normals(float* eps, int64_t len, uint64_t first, uint64_t stride, uint64_t seed, uint64_t stream) {
  if (stride != 1) {  // each element: the pair (w0, w1) or (w2, w3) of its counter, then cos or sin
    const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
    const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    uint64_t index[kChunk];
    uint32_t radius_words[kChunk], turn_words[kChunk], odd[kChunk];
    float cosines[kChunk], sines[kChunk];
    for (int64_t j = 0; j < len; ++j) index[j] = first + static_cast<uint64_t>(j) * stride;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t quad = index[j] >> 2;
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), s0, s1, k0, k1);
      const uint32_t second_pair = static_cast<uint32_t>(index[j]) & 2u;
      radius_words[j] = second_pair ? r.w[2] : r.w[0];
      turn_words[j] = second_pair ? r.w[3] : r.w[1];
      odd[j] = static_cast<uint32_t>(index[j]) & 1u;
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const CosSin n = box_muller_pair(radius_words[j], turn_words[j]);
      cosines[j] = n.cos;
      sines[j] = n.sin;
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) eps[j] = odd[j] ? sines[j] : cosines[j];  // a pick of loaded values
    return;
  }
  const int64_t lead = static_cast<int64_t>(first & 3);
  const int64_t quads = (lead + len + 3) / 4;
  float lanes[4][kChunk];
  float quad_normals[kChunk + 8];  // lead + len rounded up to whole quads
  normal_quad_lanes(lanes, quads, first >> 2, 1, seed, stream);
#pragma omp simd
  for (int64_t q = 0; q < quads; ++q) {
    for (int k = 0; k < 4; ++k) quad_normals[4 * q + k] = lanes[k][q];
  }
  std::copy(quad_normals + lead, quad_normals + lead + len, eps);
}

// Geometry of a noise tensor in memory: dense row-major (nchw: the memory index is the logical
// index) or dense channels_last [B, S, C] of a logical [B, C, S] (4-D tensors only).
struct NoiseShape {
  int64_t batch, channels, spatial;
  Layout layout;
};

// Calls f(first, len, eps) over runs of consecutive memory elements, eps[j] the normal of memory
// element first + j; runs are spread over threads. channels_last: a run is (part of) one position's
// channel vector, whose logical indices step by S. When S and offset are multiples of 4, positions
// 4t .. 4t + 3 of a channel are the four lanes of one counter: a tile of four such runs then costs
// one counter per channel, as the dense layout does.
template <typename F>
void for_each_normal_run(const NoiseShape& g, uint64_t seed, uint64_t stream, uint64_t offset, F&& f) {
  const int64_t total = g.batch * g.channels * g.spatial;
  if (g.layout == Layout::nchw) {
    const int64_t chunks = (total + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (total > kParallelGrain / 8)
    for (int64_t q = 0; q < chunks; ++q) {
      float eps[kChunk];
      const int64_t first = q * kChunk, len = std::min(kChunk, total - first);
      normals(eps, len, offset + static_cast<uint64_t>(first), 1, seed, stream);
      f(first, len, eps);
    }
    return;
  }
  const int64_t pieces = (g.channels + kChunk - 1) / kChunk;
  if (g.spatial % 4 == 0 && offset % 4 == 0) {
    const int64_t tiles = g.batch * (g.spatial / 4);
#pragma omp parallel for collapse(2) schedule(static) if (total > kParallelGrain / 8)
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t q = 0; q < pieces; ++q) {
        float lanes[4][kChunk];
        const int64_t b = t / (g.spatial / 4), s = 4 * (t % (g.spatial / 4)), c0 = q * kChunk;
        const int64_t len = std::min(kChunk, g.channels - c0);
        const uint64_t logical = static_cast<uint64_t>((b * g.channels + c0) * g.spatial + s);
        normal_quad_lanes(lanes, len, (offset + logical) >> 2, static_cast<uint64_t>(g.spatial / 4), seed, stream);
        for (int k = 0; k < 4; ++k) f((b * g.spatial + s + k) * g.channels + c0, len, lanes[k]);
      }
    }
    return;
  }
  const int64_t rows = g.batch * g.spatial;
#pragma omp parallel for collapse(2) schedule(static) if (total > kParallelGrain / 8)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < pieces; ++q) {
      float eps[kChunk];
      const int64_t b = r / g.spatial, s = r % g.spatial, c0 = q * kChunk;
      const int64_t len = std::min(kChunk, g.channels - c0);
      const uint64_t logical = static_cast<uint64_t>((b * g.channels + c0) * g.spatial + s);
      normals(eps, len, offset + logical, static_cast<uint64_t>(g.spatial), seed, stream);
      f(r * g.channels + c0, len, eps);
    }
  }
}

// sqrt(max(var, 0) + 1e-8): the noise's standard deviation (a NaN var stays NaN).
template <typename A>
inline A noise_std(A var) {
  return std::sqrt(std::max(var, A(0)) + static_cast<A>(kVarEps));
}

// out = mu + sqrt(max(var, 0) + 1e-8) eps (mu, var, out share the geometry g).
template <typename T>
void gaussian_noise(T* out, const T* mu, const T* var, const NoiseShape& g, uint64_t seed, uint64_t stream,
                    uint64_t offset) {
  using A = NoiseMath<T>;
  for_each_normal_run(g, seed, stream, offset, [&](int64_t first, int64_t len, const float* eps) {
    const T* m = mu + first;
    const T* v = var + first;
    T* o = out + first;
    for (int64_t j = 0; j < len; ++j) {
      o[j] = static_cast<T>(static_cast<A>(m[j]) + noise_std(static_cast<A>(v[j])) * static_cast<A>(eps[j]));
    }
  });
}

// grad_var = grad eps / (2 sqrt(var + 1e-8)) where var > 0, else 0 (d mu is grad itself).
template <typename T>
void gaussian_noise_backward(T* grad_var, const T* grad, const T* var, const NoiseShape& g, uint64_t seed,
                             uint64_t stream, uint64_t offset) {
  using A = NoiseMath<T>;
  for_each_normal_run(g, seed, stream, offset, [&](int64_t first, int64_t len, const float* eps) {
    const T* gr = grad + first;
    const T* v = var + first;
    T* gv = grad_var + first;
    for (int64_t j = 0; j < len; ++j) {
      const A vj = static_cast<A>(v[j]);
      const A d = static_cast<A>(gr[j]) * static_cast<A>(eps[j]) / (A(2) * noise_std(vj));
      gv[j] = static_cast<T>(vj > A(0) ? d : A(0));
    }
  });
}

// ---- the KL over the whole network: one pass over every layer's log alpha ----------------------------
// Molchanov et al. 2017: KL(log alpha) ~ K1 - K1 sigmoid(K2 + K3 a) + 0.5 log1p(exp(-a)), evaluated as
// K1 sigmoid(-(K2 + K3 a)) + 0.5 softplus(-a) (no subtraction that cancels for large a).
constexpr double kKlK1 = 0.63576, kKlK2 = 1.87320, kKlK3 = 1.48695;

struct KlSegment {
  const void* log_alpha;  // [channels], float or double (is_double)
  void* grad;             // same type (backward only)
  bool is_double;
  int64_t channels;
  double scale;  // weights_per_channel / n_train
};

inline double kl_load(const KlSegment& s, int64_t c) { return load_gate(s.log_alpha, s.is_double, c); }

inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline double kl_per_channel(double a) {
  return kKlK1 * sigmoid(-(kKlK2 + kKlK3 * a)) + 0.5 * softplus(-a);
}

// d/da kl_per_channel = -K1 K3 s (1 - s) - 0.5 sigmoid(-a), s = sigmoid(t), t = K2 + K3 a, 1 - s = sigmoid(-t)
inline double kl_derivative(double a) {
  const double t = kKlK2 + kKlK3 * a;
  return -kKlK1 * kKlK3 * sigmoid(t) * sigmoid(-t) - 0.5 * sigmoid(-a);
}

// KL = sum_l scale_l sum_c kl_per_channel(a_lc), summed in double in a fixed order (a handful of
// thousand channels: one thread, no fork, and the same bits on every run).
inline double gaussian_kl(const std::vector<KlSegment>& segs) {
  double total = 0;
  for (const KlSegment& s : segs) {
    double layer = 0;
    for (int64_t c = 0; c < s.channels; ++c) layer += kl_per_channel(kl_load(s, c));
    total += s.scale * layer;
  }
  return total;
}

// grad_l[c] = grad scale_l kl_derivative(a_lc)
inline void gaussian_kl_backward(const std::vector<KlSegment>& segs, double grad) {
  for (const KlSegment& s : segs) {
    const double factor = grad * s.scale;
    for (int64_t c = 0; c < s.channels; ++c) {
      store_gate(s.grad, s.is_double, c, factor * kl_derivative(kl_load(s, c)));
    }
  }
}

}  // namespace cpu
}  // namespace pgnas
