// CTest: the `cpu` kernels (csrc/cpu/kernels.h) against Philox's known answers and plain loops.
// No torch: this checks the arithmetic and the indexing; tests/test_ops.py checks the bindings
// against the reference backend.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../cpu/gaussian.h"
#include "../cpu/kernels.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    std::printf("FAIL %s: got %.17g want %.17g\n", what, got, want);
    ++failures;
  }
}

void expect_close(double got, double want, double rel, const char* what) {
  expect(std::fabs(got - want) <= rel * std::fmax(1.0, std::fabs(want)), what, got, want);
}

// Deterministic test data in [-1, 1).
std::vector<double> data(size_t n, uint64_t salt) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = 2.0 * pgnas::philox_uniform_at(7, salt, i) - 1.0;
  return v;
}

template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

void test_known_answers() {
  struct Kat {
    uint32_t c[4], k[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& kat : kats) {
    const pgnas::Philox4 r = pgnas::philox4x32_10(kat.c[0], kat.c[1], kat.c[2], kat.c[3], kat.k[0], kat.k[1]);
    for (int j = 0; j < 4; ++j) expect(r.w[j] == kat.out[j], "philox known answer", r.w[j], kat.out[j]);
  }
}

void test_uniform_mapping() {
  // u = ((w0 >> 8) + 0.5) 2^-24 rounded to float32, below 1; the vector fill equals the scalar one
  const uint64_t seed = (1ull << 62) + 3, stream = (1ull << 60) + 9, offset = (1ull << 34) + 1;
  std::vector<float> u(4097);
  pgnas::cpu::philox_uniform(u.data(), static_cast<int64_t>(u.size()), seed, stream, offset);
  for (size_t j = 0; j < u.size(); ++j) {
    const uint64_t i = offset + j;
    const pgnas::Philox4 r = pgnas::philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                                                  static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    float want = static_cast<float>(((r.w[0] >> 8) + 0.5) * std::ldexp(1.0, -24));
    if (want > PGNAS_U_MAX) want = PGNAS_U_MAX;
    expect(u[j] == want, "philox_uniform element", u[j], want);
    expect(u[j] > 0.0f && u[j] < 1.0f, "0 < u < 1", u[j], 0.5);
  }
}

template <typename T>
void test_gated_apply(pgnas::cpu::Layout layout, double tol) {
  const int64_t batch = 3, channels = 5, spatial = 6, n = batch * channels * spatial;
  const std::vector<T> x = as<T>(data(n, 2)), grad = as<T>(data(n, 3));
  const std::vector<double> keep = data(batch * channels, 4);
  std::vector<T> out(n), grad_x(n);
  std::vector<double> grad_keep(batch * channels);
  pgnas::cpu::gated_apply<T, double>(out.data(), x.data(), keep.data(), batch, channels, spatial, layout);
  pgnas::cpu::gated_apply_backward<T, double>(grad_x.data(), grad_keep.data(), grad.data(), x.data(), keep.data(),
                                              batch, channels, spatial, layout);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c) {
      double dot = 0;
      for (int64_t s = 0; s < spatial; ++s) {
        const int64_t e = layout == pgnas::cpu::Layout::nchw ? (b * channels + c) * spatial + s
                                                             : (b * spatial + s) * channels + c;
        const double k = keep[b * channels + c];
        expect_close(out[e], static_cast<double>(x[e]) * k, tol, "gated_apply");
        expect_close(grad_x[e], static_cast<double>(grad[e]) * k, tol, "gated_apply grad_x");
        dot += static_cast<double>(grad[e]) * static_cast<double>(x[e]);
      }
      expect_close(grad_keep[b * channels + c], dot, tol, "gated_apply grad_keep");
    }
  std::vector<double> grad_p(channels);
  pgnas::cpu::gate_keep_backward<double>(grad_p.data(), grad_keep.data(), keep.data(), batch, channels, 0.2);
  for (int64_t c = 0; c < channels; ++c) {
    double want = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const double k = keep[b * channels + c];
      want -= grad_keep[b * channels + c] * k * (1 - k) / 0.2;
    }
    expect_close(grad_p[c], want, 1e-12, "gate_keep_backward");
  }
}

void test_branch_combine(bool per_example) {
  const int64_t batch = 3, per_batch = 2 * pgnas::cpu::kChunk + 5, branches = 3, n = batch * per_batch;
  std::vector<std::vector<float>> ys;
  std::vector<const float*> y_ptrs;
  for (int s = 0; s < branches; ++s) ys.push_back(as<float>(data(n, 10 + s)));
  for (auto& y : ys) y_ptrs.push_back(y.data());
  const std::vector<float> skip = as<float>(data(n, 20)), grad = as<float>(data(n, 21));
  const std::vector<double> w = data(per_example ? batch * branches : branches, 22);
  std::vector<float> out(n);
  pgnas::cpu::branch_combine<float, double>(out.data(), y_ptrs.data(), branches, w.data(), per_example, skip.data(),
                                            batch, per_batch);
  std::vector<std::vector<float>> grad_ys(branches, std::vector<float>(n));
  std::vector<float*> gy_ptrs;
  for (auto& g : grad_ys) gy_ptrs.push_back(g.data());
  std::vector<double> grad_w(w.size());
  pgnas::cpu::branch_combine_backward<float, double>(gy_ptrs.data(), grad_w.data(), grad.data(), y_ptrs.data(),
                                                     branches, w.data(), per_example, batch, per_batch);
  std::vector<double> want_w(w.size(), 0.0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t e = 0; e < per_batch; ++e) {
      const int64_t i = b * per_batch + e;
      double want = skip[i];
      for (int64_t s = 0; s < branches; ++s) {
        const double ws = per_example ? w[b * branches + s] : w[s];
        want += ws * ys[s][i];
        expect_close(grad_ys[s][i], grad[i] * ws, 1e-6, "branch_combine grad_y");
        want_w[(per_example ? b * branches : 0) + s] += static_cast<double>(grad[i]) * ys[s][i];
      }
      expect_close(out[i], want, 1e-6, "branch_combine");
    }
  for (size_t j = 0; j < w.size(); ++j) expect_close(grad_w[j], want_w[j], 1e-9, "branch_combine grad_w");
}

void test_regularizer() {
  // a grouped conv [6, 2, 3] (groups 3) and a linear [4, 5]; float weights, double and float logits
  const std::vector<double> conv = data(6 * 2 * 3, 30), linear = data(4 * 5, 31);
  const std::vector<float> convf = as<float>(conv);
  const std::vector<double> z_conv = data(6, 32);
  const std::vector<float> z_lin = as<float>(data(5, 33));
  std::vector<pgnas::cpu::RegSegment> segs(2);
  std::vector<float> gw_conv(conv.size());
  std::vector<double> gw_lin(linear.size()), gz_conv(6);
  std::vector<float> gz_lin(5);
  segs[0] = {convf.data(), gw_conv.data(), z_conv.data(), gz_conv.data(), true, 6, 2, 3, 3,
             &pgnas::cpu::rows_squares<float>};
  segs[1] = {linear.data(), gw_lin.data(), z_lin.data(), gz_lin.data(), false, 4, 5, 1, 1,
             &pgnas::cpu::rows_squares<double>};
  const double wr = 3.0, dr = 2.0, n_train = 10.0;
  const double r = pgnas::cpu::regularizer(segs, wr, dr, n_train);
  pgnas::cpu::regularizer_backward(segs, 1.0, wr, dr, n_train);
  double want = 0;
  std::vector<double> sq_conv(6, 0.0), sq_lin(5, 0.0);
  for (int o = 0; o < 6; ++o)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 3; ++k) {
        const int c = (o / 2) * 2 + j, e = (o * 2 + j) * 3 + k;
        const double p = 1 / (1 + std::exp(-z_conv[c])), w = convf[e];
        want += wr / n_train * (1 - p) * w * w;
        sq_conv[c] += w * w;
        expect_close(gw_conv[e], 2 * wr / n_train * (1 - p) * w, 1e-6, "regularizer grad conv weight");
      }
  for (int o = 0; o < 4; ++o)
    for (int c = 0; c < 5; ++c) {
      const double p = 1 / (1 + std::exp(-static_cast<double>(z_lin[c]))), w = linear[o * 5 + c];
      want += wr / n_train * (1 - p) * w * w;
      sq_lin[c] += w * w;
      expect_close(gw_lin[o * 5 + c], 2 * wr / n_train * (1 - p) * w, 1e-12, "regularizer grad linear weight");
    }
  for (int c = 0; c < 6; ++c) {
    const double p = 1 / (1 + std::exp(-z_conv[c]));
    want += dr / n_train * (p * std::log(p) + (1 - p) * std::log(1 - p));
    expect_close(gz_conv[c], p * (1 - p) * (dr / n_train * z_conv[c] - wr / n_train * sq_conv[c]), 1e-12,
                 "regularizer grad conv logit");
  }
  for (int c = 0; c < 5; ++c) {
    const double z = z_lin[c], p = 1 / (1 + std::exp(-z));
    want += dr / n_train * (p * std::log(p) + (1 - p) * std::log(1 - p));
    expect_close(gz_lin[c], p * (1 - p) * (dr / n_train * z - wr / n_train * sq_lin[c]), 1e-6,
                 "regularizer grad linear logit");
  }
  expect_close(r, want, 1e-12, "regularizer value");
}

// A layer taller than one work item (kRowsPerItem rows): partial sums across items.
void test_regularizer_tall_layer() {
  const int64_t out = 3 * pgnas::cpu::kRowsPerItem + 5, in = 3, taps = 2;
  const std::vector<double> w = data(static_cast<size_t>(out * in * taps), 40), z = data(in, 41);
  std::vector<double> gw(w.size()), gz(in);
  std::vector<pgnas::cpu::RegSegment> segs(1);
  segs[0] = {w.data(), gw.data(), z.data(), gz.data(), true, out, in, taps, 1,
             &pgnas::cpu::rows_squares<double>};
  const double r = pgnas::cpu::regularizer(segs, 1.0, 0.0, 1.0);
  pgnas::cpu::regularizer_backward(segs, 1.0, 1.0, 0.0, 1.0);
  std::vector<double> sq(in, 0.0);
  for (int64_t e = 0; e < out * in * taps; ++e) sq[(e / taps) % in] += w[e] * w[e];
  double want = 0;
  for (int64_t c = 0; c < in; ++c) {
    const double p = 1 / (1 + std::exp(-z[c]));
    want += (1 - p) * sq[c];
    expect_close(gz[c], -p * (1 - p) * sq[c], 1e-12, "tall layer grad logit");
  }
  expect_close(r, want, 1e-12, "tall layer value");

  // the fused call: the value and the gradients for grad 1 from one pass, the same bits as the two calls
  std::vector<double> fused_gw(w.size()), fused_gz(in);
  segs[0].grad_weight = fused_gw.data();
  segs[0].grad_p_logit = fused_gz.data();
  const double fused_r = pgnas::cpu::regularizer_with_grad(segs, 1.0, 0.0, 1.0);
  expect(fused_r == r, "fused regularizer value bit-equal", fused_r, r);
  for (size_t e = 0; e < w.size(); ++e) expect(fused_gw[e] == gw[e], "fused grad weight bit-equal", fused_gw[e], gw[e]);
  for (int64_t c = 0; c < in; ++c) expect(fused_gz[c] == gz[c], "fused grad logit bit-equal", fused_gz[c], gz[c]);
}

// ---- the Gaussian family (csrc/cpu/gaussian.h) ----------------------------------------------------

void test_normal_known_answers() {
  // eps of element j: lane j mod 4 of counter j div 4's quad (values from pgnas_fast.reference.philox,
  // which tests/test_gaussian_ops.py checks against an independent numpy float32 version)
  struct Kat {
    uint64_t seed, stream, j;
    float eps;
  };
  const Kat kats[] = {
      {0, 0, 0, 0x1.fb7666p-1f},  // words 0x6627e8d5, 0xe169c58d: Random123's answer for counter 0, key 0
      {0, 0, 1, -0x1.d96d64p-1f},
      {0, 0, 2, -0x1.3c3742p-1f},
      {0, 0, 3, -0x1.eda360p-2f},
      {(1ull << 62) + 3, (1ull << 60) + 9, (1ull << 32) + 5, 0x1.14375cp+0f},
  };
  for (const Kat& kat : kats) {
    const float eps = pgnas::philox_normal_at(kat.seed, kat.stream, kat.j);
    expect(eps == kat.eps, "Box-Muller known answer", eps, kat.eps);
    const float lane = pgnas::philox_normal_quad(kat.seed, kat.stream, kat.j >> 2).v[kat.j & 3];
    expect(lane == kat.eps, "Box-Muller known answer of the whole quad", lane, kat.eps);
  }
}

// The vectorised runs of csrc/cpu/gaussian.h give philox_normal_at's bits: dense runs from every lead
// (first mod 4) and length (tails), strided runs, counters past 2^32.
void test_normal_runs_match_the_scalar_normal() {
  struct Run {
    uint64_t first, stride;
    int64_t len;
  };
  const uint64_t high = (1ull << 34) + 1;
  const Run runs[] = {{0, 1, pgnas::cpu::kChunk}, {1, 1, 1}, {2, 1, 5}, {3, 1, pgnas::cpu::kChunk},
                      {high, 1, 1001}, {high + 2, 1, 2}, {5, 3, 700}, {high, 7, pgnas::cpu::kChunk}, {6, 4, 9}};
  std::vector<float> eps(pgnas::cpu::kChunk);
  for (const Run& run : runs) {
    pgnas::cpu::normals(eps.data(), run.len, run.first, run.stride, 13, (1ull << 40) + 3);
    for (int64_t j = 0; j < run.len; ++j) {
      const float want = pgnas::philox_normal_at(13, (1ull << 40) + 3, run.first + static_cast<uint64_t>(j) * run.stride);
      expect(std::memcmp(&eps[j], &want, sizeof want) == 0, "vectorised normal run", eps[j], want);
    }
  }
}

// Both layouts give every element the normal of its logical index; forward and backward by formula.
// channels_last with S and offset multiples of 4 takes the tiles of four positions, else one counter
// per element.
template <typename T>
void test_gaussian_noise(pgnas::cpu::Layout layout, double tol, int64_t spatial = 5,
                         uint64_t offset = (1ull << 32) - 7) {
  const int64_t batch = 3, channels = 2500, n = batch * channels * spatial;  // C > one chunk
  const uint64_t seed = 11, stream = 12;
  const std::vector<T> mu = as<T>(data(n, 21)), grad = as<T>(data(n, 22));
  std::vector<T> var = as<T>(data(n, 23));  // about half negative: std from 0, zero d var
  var[5] = T(0);
  std::vector<T> out(n), grad_var(n);
  pgnas::cpu::NoiseShape g{batch, channels, spatial, layout};
  if (layout == pgnas::cpu::Layout::nchw) g = {1, 1, n, layout};  // dense row-major: one flat run
  pgnas::cpu::gaussian_noise<T>(out.data(), mu.data(), var.data(), g, seed, stream, offset);
  pgnas::cpu::gaussian_noise_backward<T>(grad_var.data(), grad.data(), var.data(), g, seed, stream, offset);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t s = 0; s < spatial; ++s) {
        const int64_t logical = (b * channels + c) * spatial + s;
        const int64_t e = layout == pgnas::cpu::Layout::nchw ? logical : (b * spatial + s) * channels + c;
        const double eps = pgnas::philox_normal_at(seed, stream, offset + static_cast<uint64_t>(logical));
        const double v = static_cast<double>(var[e]);
        const double sd = std::sqrt(std::fmax(v, 0.0) + 1e-8);
        expect_close(static_cast<double>(out[e]), static_cast<double>(mu[e]) + sd * eps, tol, "gaussian_noise");
        const double d = v > 0 ? static_cast<double>(grad[e]) * eps / (2.0 * sd) : 0.0;
        expect_close(static_cast<double>(grad_var[e]), d, tol * 10, "gaussian_noise_backward");
        if (v <= 0) expect(grad_var[e] == T(0), "zero d var where var <= 0", static_cast<double>(grad_var[e]), 0);
      }
}

void test_gaussian_kl() {
  const std::vector<double> a = data(300, 31);
  std::vector<float> a32(a.begin(), a.end());
  std::vector<float> grad32(a.size());
  std::vector<double> grad64(3);
  const double a64[3] = {-8.0, 0.0, 8.0};
  std::vector<pgnas::cpu::KlSegment> segs = {
      {a32.data(), grad32.data(), false, static_cast<int64_t>(a32.size()), 9.0 / 1000.0},
      {a64, grad64.data(), true, 3, 2.0 / 1000.0},
  };
  const double k1 = 0.63576, k2 = 1.87320, k3 = 1.48695;
  auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  double want = 0;
  for (const pgnas::cpu::KlSegment& s : segs)
    for (int64_t c = 0; c < s.channels; ++c) {
      const double x = pgnas::cpu::kl_load(s, c);
      want += s.scale * (k1 - k1 * sig(k2 + k3 * x) + 0.5 * std::log(1.0 + std::exp(-x)));
    }
  expect_close(pgnas::cpu::gaussian_kl(segs), want, 1e-12, "gaussian_kl");
  pgnas::cpu::gaussian_kl_backward(segs, 1.5);
  for (int64_t c = 0; c < 3; ++c) {  // central differences of the per-channel term
    const double h = 1e-5, x = a64[c];
    auto f = [&](double y) { return k1 - k1 * sig(k2 + k3 * y) + 0.5 * std::log(1.0 + std::exp(-y)); };
    expect_close(grad64[c], 1.5 * 2.0 / 1000.0 * (f(x + h) - f(x - h)) / (2 * h), 1e-8, "gaussian_kl_backward");
  }
  expect_close(grad32[0], 1.5 * 9.0 / 1000.0 * pgnas::cpu::kl_derivative(a32[0]), 1e-6, "gaussian_kl_backward f32");
}

}  // namespace

int main() {
  test_known_answers();
  test_uniform_mapping();
  test_gated_apply<float>(pgnas::cpu::Layout::nchw, 1e-6);
  test_gated_apply<float>(pgnas::cpu::Layout::nhwc, 1e-6);
  test_gated_apply<double>(pgnas::cpu::Layout::nchw, 1e-12);
  test_gated_apply<double>(pgnas::cpu::Layout::nhwc, 1e-12);
  test_branch_combine(true);
  test_branch_combine(false);
  test_regularizer();
  test_regularizer_tall_layer();
  test_normal_known_answers();
  test_normal_runs_match_the_scalar_normal();
  test_gaussian_noise<float>(pgnas::cpu::Layout::nchw, 1e-6);
  test_gaussian_noise<float>(pgnas::cpu::Layout::nhwc, 1e-6);
  test_gaussian_noise<float>(pgnas::cpu::Layout::nhwc, 1e-6, 8, (1ull << 32) + 4);  // tiles of 4 positions
  test_gaussian_noise<float>(pgnas::cpu::Layout::nhwc, 1e-6, 8, 6);
  test_gaussian_noise<double>(pgnas::cpu::Layout::nchw, 1e-14);
  test_gaussian_noise<double>(pgnas::cpu::Layout::nhwc, 1e-14);
  test_gaussian_kl();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("all cpu kernel checks passed\n");
  return EXIT_SUCCESS;
}
