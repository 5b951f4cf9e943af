// Philox4x32-10 and the u mapping of the RNG contract (design.md "RNG contract"), shared by the
// C++/OpenMP kernels (csrc/cpu/) and the CUDA kernels (kernels/*.cu): one implementation, so every
// native backend produces the reference's u bit for bit.
//
// key = (seed mod 2^32, seed div 2^32); counter = (i mod 2^32, i div 2^32, s mod 2^32, s div 2^32).
// u = ((w0 >> 8) + 0.5) * 2^-24 evaluated in float32 exactly as the reference does (the + 0.5 rounds
// to nearest even for w0 >> 8 >= 2^23), then clamped to the largest float32 below 1.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__CUDA_ARCH__) && defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "the u mapping needs float arithmetic in float32 (FLT_EVAL_METHOD 0), e.g. SSE, not x87"
#endif

#if defined(__CUDACC__)
#define PGNAS_HD __host__ __device__ __forceinline__
#else
#define PGNAS_HD inline
#endif

namespace pgnas {

struct Philox4 {
  uint32_t w[4];
};

PGNAS_HD void philox_mulhilo(uint32_t a, uint32_t m, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, m);
  *lo = a * m;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(m);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al. 2011; Random123's philox4x32_R(10, ...)).
PGNAS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  const uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  // Straight-line on the host too (the key schedule as k + round * W, the rounds unrolled), so that
  // GCC vectorises loops that call this, as it does everything below up to the normals: integer
  // compares and selects, no float compare (which may trap) and no branch.
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif !defined(__CUDACC__)  // (nvcc's front end does not know the GCC pragma: a warning, an error under -Werror)
#pragma GCC unroll 10
#endif
  for (uint32_t round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(c0, kM0, &hi0, &lo0);
    philox_mulhilo(c2, kM1, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ (k0 + round * kW0);
    const uint32_t n2 = hi0 ^ c3 ^ (k1 + round * kW1);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4 out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

PGNAS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PGNAS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Largest float32 below 1 (1 - 2^-24): the top u would round to 1.0 and make log1p(-u) infinite.
#define PGNAS_U_MAX 0.99999994039535522461f
#define PGNAS_U_SCALE 5.9604644775390625e-08f  // 2^-24

// The contract's u of one Philox word.
PGNAS_HD float philox_word_uniform(uint32_t word) {
  const float top = static_cast<float>(word >> 8);  // < 2^24: exact
#if defined(__CUDA_ARCH__)
  const float u = __fmul_rn(__fadd_rn(top, 0.5f), PGNAS_U_SCALE);  // no contraction: same rounding as float32 torch
#else
  // x86-64 and aarch64 evaluate float in float32 (FLT_EVAL_METHOD 0), and (a + b) * c is not
  // contractible into an fma: both roundings happen as in the reference's float32 torch ops.
  const float u = (top + 0.5f) * PGNAS_U_SCALE;
#endif
  // min(u, U_MAX) on the bit patterns, which order as positive floats do
  const uint32_t bits = float_bits(u), max_bits = 0x3F7FFFFFu;  // PGNAS_U_MAX
  return bits_float(bits < max_bits ? bits : max_bits);
}

// u of element i of stream `stream` under key `seed` (all 64-bit).
PGNAS_HD float philox_uniform_at(uint64_t seed, uint64_t stream, uint64_t i) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                                  static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return philox_word_uniform(r.w[0]);
}

// ---- the Gaussian family's normal (pgnas_fast.reference.philox.normal_quads) ----
// Counter q gives four normals, of elements 4q .. 4q + 3: Box-Muller on the pairs (w0, w1) and (w2, w3),
// r = sqrt(-2 log u(w0)), eps(4q) = r cos 2 pi v(w1), eps(4q + 1) = r sin 2 pi v(w1), and so on. log, cos
// and sin are float32 series written with adds, multiplies and one divide, each rounded to nearest in
// the reference's order, so eps has the reference's bits on every backend. Device code uses the _rn
// intrinsics, which nvcc never contracts into an fma; host code is built with -ffp-contract=off.
PGNAS_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PGNAS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PGNAS_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

PGNAS_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);  // IEEE sqrt: correctly rounded
#endif
}

// log u for u in (0, 1) (reference log_f32): u = m 2^e, m in [sqrt(1/2), sqrt 2),
// log u = e log 2 + 2 atanh(s), s = (m - 1) / (m + 1), the series to s^9.
PGNAS_HD float log_f32(float u) {
  const uint32_t bits = float_bits(u);
  const uint32_t mantissa = bits & 0x7FFFFFu;
  const uint32_t high = mantissa > 0x3504F3u;  // 1.mantissa > sqrt 2 (float32 0x1.6a09e6p+0, bits 0x3FB504F3)
  const float m = bits_float((mantissa | 0x3F800000u) - (high << 23));  // 1.mantissa, halved when high
  const float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 127 + static_cast<int32_t>(high));
  const float s = div_rn(add_rn(m, -1.0f), add_rn(m, 1.0f));
  const float z = mul_rn(s, s);
  float series = add_rn(mul_rn(z, 0x1.c71c72p-3f), 0x1.24924ap-2f);  // 2/9, 2/7
  series = add_rn(mul_rn(series, z), 0x1.99999ap-2f);                 // 2/5
  series = add_rn(mul_rn(series, z), 0x1.555556p-1f);                 // 2/3
  return add_rn(mul_rn(e, 0x1.62e430p-1f), add_rn(add_rn(s, s), mul_rn(mul_rn(s, z), series)));
}

struct CosSin {
  float cos, sin;
};

// (cos 2 pi v, sin 2 pi v), v = ((word >> 8) + 0.5) 2^-24 (reference turn_cos_sin): quarter turn
// q = round(4 v) and x = v - q / 4 in [-1/8, 1/8] in exact integer arithmetic, then Taylor series of
// 2 pi x (to x^10 and x^9), q mod 4 picking signs and roles.
PGNAS_HD CosSin turn_cos_sin(uint32_t word) {
  const int32_t k = static_cast<int32_t>(word >> 8);
  const int32_t q = (k + (1 << 21)) >> 22;
  const float x = mul_rn(add_rn(static_cast<float>(k - (q << 22)), 0.5f), 0x1p-24f);
  const float y = mul_rn(x, x);
  float c = add_rn(mul_rn(y, -0x1.a6d1f2p+4f), 0x1.e1f506p+5f);  // (-1)^k (2 pi)^2k / (2k)!, k = 5, 4
  c = add_rn(mul_rn(c, y), -0x1.55d3c8p+6f);
  c = add_rn(mul_rn(c, y), 0x1.03c1f0p+6f);
  c = add_rn(mul_rn(c, y), -0x1.3bd3ccp+4f);
  c = add_rn(mul_rn(c, y), 1.0f);
  float s = add_rn(mul_rn(y, 0x1.507834p+5f), -0x1.32d2ccp+6f);  // (-1)^k (2 pi)^(2k+1) / (2k+1)!, k = 4, 3
  s = add_rn(mul_rn(s, y), 0x1.466bc6p+6f);
  s = add_rn(mul_rn(s, y), -0x1.4abbcep+5f);
  s = add_rn(mul_rn(s, y), 0x1.921fb6p+2f);
  s = mul_rn(s, x);
  const bool swap = (q & 1) != 0;
  const float cos_abs = swap ? s : c, sin_abs = swap ? c : s;
  return {((q + 1) & 2) ? -cos_abs : cos_abs, (q & 2) ? -sin_abs : sin_abs};
}

// The two normals of one Box-Muller pair: r cos, r sin.
PGNAS_HD CosSin box_muller_pair(uint32_t radius_word, uint32_t turn_word) {
  const float radius = sqrt_rn(mul_rn(-2.0f, log_f32(philox_word_uniform(radius_word))));
  const CosSin t = turn_cos_sin(turn_word);
  return {mul_rn(radius, t.cos), mul_rn(radius, t.sin)};
}

struct Normal4 {
  float v[4];
};

// The four normals of counter `quad` (elements 4 quad .. 4 quad + 3) of stream `stream` under key `seed`.
PGNAS_HD Normal4 philox_normal_quad(uint64_t seed, uint64_t stream, uint64_t quad) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32),
                                  static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const CosSin a = box_muller_pair(r.w[0], r.w[1]), b = box_muller_pair(r.w[2], r.w[3]);
  return {{a.cos, a.sin, b.cos, b.sin}};
}

// eps of element j alone: one pair of its quad's counter (for layouts whose threads do not hold whole quads).
PGNAS_HD float philox_normal_at(uint64_t seed, uint64_t stream, uint64_t j) {
  const uint64_t quad = j >> 2;
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32),
                                  static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const bool second_pair = (j & 2) != 0;
  const CosSin p = box_muller_pair(second_pair ? r.w[2] : r.w[0], second_pair ? r.w[3] : r.w[1]);
  return (j & 1) ? p.sin : p.cos;
}

}  // namespace pgnas
