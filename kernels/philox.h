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
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(c0, kM0, &hi0, &lo0);
    philox_mulhilo(c2, kM1, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
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
  return u < PGNAS_U_MAX ? u : PGNAS_U_MAX;
}

// u of element i of stream `stream` under key `seed` (all 64-bit).
PGNAS_HD float philox_uniform_at(uint64_t seed, uint64_t stream, uint64_t i) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                                  static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return philox_word_uniform(r.w[0]);
}

// 2 pi in float64, the reference's (2.0 * math.pi).
#define PGNAS_TWO_PI 6.283185307179586

// Box-Muller on two of the contract's uniforms: sqrt(-2 log u1) cos(2 pi u2) evaluated in float64 and
// rounded once to float32, as pgnas_fast.reference.philox.normal (float64 log and cos of different
// libraries differ in their last bits only, which the rounding removes but for one case in ~2^29).
PGNAS_HD float box_muller(float u1, float u2) {
  const double radius = sqrt(-2.0 * log(static_cast<double>(u1)));
  return static_cast<float>(radius * cos(PGNAS_TWO_PI * static_cast<double>(u2)));
}

// eps (standard normal) of element i of stream `stream` under key `seed`: Box-Muller on the uniforms
// of words 0 and 1 of counter i (the Gaussian family's local reparameterization).
PGNAS_HD float philox_normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32),
                                  static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return box_muller(philox_word_uniform(r.w[0]), philox_word_uniform(r.w[1]));
}

}  // namespace pgnas
