"""The Gaussian posterior family's ops (design.md "Gaussian family"), read as a specification:
gaussian_noise (the local-reparameterization epilogue) and gaussian_kl (the Molchanov KL).

Every live CPU backend is checked against formulas written here in float64; eps comes from an
independent numpy Philox4x32-10 (pinned to Random123's known answer) and a numpy float32 Box-Muller
(four normals per counter), itself checked against float64 Box-Muller.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import pgnas_fast as pf
from pgnas_fast.ops import _library
from pgnas_fast.ops.streams import Domain, stream_id
from pgnas_fast.reference import philox

from conftest import TOLERANCE, interpreted, rel_err

SEED = 20200207
STREAM = stream_id(Domain.GAUSSIAN, 3, 1)
DATA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
K1, K2, K3 = 0.63576, 1.87320, 1.48695  # Molchanov et al. 2017, eq. 14


# ---- independent formulas -----------------------------------------------------------------------
MASK32 = 0xFFFFFFFF


def philox_words(counter: np.ndarray, stream: int, seed: int):
    """Philox4x32-10 of counters (i mod 2^32, i div 2^32, stream mod 2^32, stream div 2^32), key
    (seed mod 2^32, seed div 2^32), in numpy uint64 (every 32x32 product fits)."""
    c0, c1 = counter & MASK32, counter >> np.uint64(32)
    c2 = np.full_like(counter, stream & MASK32)
    c3 = np.full_like(counter, stream >> 32)
    k0, k1 = seed & MASK32, seed >> 32
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & np.uint64(MASK32),
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & np.uint64(MASK32))
    return c0, c1, c2, c3


def contract_uniform(word: np.ndarray) -> np.ndarray:
    """u = ((w >> 8) + 0.5) 2^-24 in float32, clamped below 1 (the RNG contract)."""
    u = ((word >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    return np.minimum(u, np.float32(1.0 - 2.0 ** -24))


# The normal's float32 series, restated from their formulas (each coefficient rounded to float32)
F32 = np.float32
LOG_COEFFICIENTS = [F32(2.0 / k) for k in (3, 5, 7, 9)]  # log m = 2 s + s^3 (2/3 + s^2 (2/5 + ...))
COS_COEFFICIENTS = [F32((-1) ** k * (2 * math.pi) ** (2 * k) / math.factorial(2 * k)) for k in range(1, 6)]
SIN_COEFFICIENTS = [F32((-1) ** k * (2 * math.pi) ** (2 * k + 1) / math.factorial(2 * k + 1)) for k in range(5)]


def polynomial(coefficients, y):
    """sum_k c[k] y^k by Horner's rule, every step rounded to float32."""
    acc = np.full_like(y, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = acc * y + c
    return acc


def log_f32(u: np.ndarray) -> np.ndarray:
    """u = m 2^e with m in [sqrt(1/2), sqrt 2): e log 2 + 2 atanh s, s = (m - 1) / (m + 1)."""
    bits = u.view(np.uint32)
    m = ((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(np.float32)
    e = (bits >> np.uint32(23)).astype(np.int32) - 127
    high = m > F32(math.sqrt(2.0))
    m = np.where(high, m * F32(0.5), m)
    e = (e + high).astype(np.float32)
    s = (m - F32(1)) / (m + F32(1))
    z = s * s
    return e * F32(math.log(2.0)) + ((s + s) + (s * z) * polynomial(LOG_COEFFICIENTS, z))


def turn_cos_sin(word: np.ndarray):
    """cos and sin of 2 pi v, v = ((w >> 8) + 0.5) 2^-24: v = q / 4 + x, |x| <= 1/8, series in x."""
    k = (word >> np.uint64(8)).astype(np.int64)
    q = (k + (1 << 21)) >> 22
    x = ((k - (q << 22)).astype(np.float32) + F32(0.5)) * F32(2.0 ** -24)
    y = x * x
    c = polynomial([F32(1)] + COS_COEFFICIENTS, y)
    s = polynomial(SIN_COEFFICIENTS, y) * x
    quarter = q % 4
    return (np.select([quarter == 0, quarter == 1, quarter == 2], [c, -s, -c], s),
            np.select([quarter == 0, quarter == 1, quarter == 2], [s, c, -s], -c))


def expected_eps(n: int, seed: int = SEED, stream: int = STREAM, offset: int = 0) -> torch.Tensor:
    """float32 [n]: eps of elements offset .. offset + n - 1: element j is lane j mod 4 of counter
    j div 4, whose words (w0, w1), (w2, w3) give r cos, r sin with r = sqrt(-2 log u(w0)), turn v(w1)."""
    j = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    words = philox_words(j >> np.uint64(2), stream, seed)
    lane = (j & np.uint64(3)).astype(np.int64)
    pair = lane // 2
    radius_word = np.where(pair == 0, words[0], words[2])
    turn_word = np.where(pair == 0, words[1], words[3])
    radius = np.sqrt(F32(-2) * log_f32(contract_uniform(radius_word)))  # numpy's float32 sqrt is IEEE
    cos, sin = turn_cos_sin(turn_word)
    return torch.from_numpy(np.where(lane % 2 == 0, radius * cos, radius * sin).astype(np.float32))


def box_muller_f64(n: int, seed: int = SEED, stream: int = STREAM, offset: int = 0) -> np.ndarray:
    """The same draw as expected_eps with float64 log, sqrt, cos and sin (numpy's libm)."""
    j = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    words = philox_words(j >> np.uint64(2), stream, seed)
    lane = (j & np.uint64(3)).astype(np.int64)
    radius_word = np.where(lane < 2, words[0], words[2])
    turn_word = np.where(lane < 2, words[1], words[3])
    radius = np.sqrt(-2.0 * np.log(contract_uniform(radius_word).astype(np.float64)))
    turn = 2.0 * np.pi * ((turn_word >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0 ** -24
    return np.where(lane % 2 == 0, radius * np.cos(turn), radius * np.sin(turn))


def literal_kl(log_alphas, counts, n_train) -> torch.Tensor:
    """-1/N sum_l count_l sum_c (K1 sigmoid(K2 + K3 a) - 0.5 log(1 + 1/alpha) - K1), float64, differentiable."""
    total = torch.zeros((), dtype=torch.float64)
    for a, count in zip(log_alphas, counts):
        a = a.to(torch.float64)
        neg_kl = K1 * torch.sigmoid(K2 + K3 * a) - 0.5 * torch.log1p(torch.exp(-a)) - K1
        total = total - count / n_train * neg_kl.sum()
    return total


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in memory layout `layout` (the logical tensor is unchanged)."""
    if layout == "contiguous":
        return t
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":  # every other row of dim 1 (or dim 0 of a 1-D tensor) of a wider tensor
        dim = 1 if t.dim() > 1 else 0
        shape = list(t.shape)
        shape[dim] *= 2
        wide = torch.full(shape, 7.0, dtype=t.dtype)
        view = wide[:, ::2] if dim == 1 else wide[::2]
        view.copy_(t)
        return view
    if layout == "transposed":  # dense, but dims 0 and 1 swapped in memory
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    raise AssertionError(layout)


# (shape, layout): odd sizes, 1-D to 4-D, every layout the op must accept
LAYOUT_CASES = [
    ((3, 5, 7, 9), "contiguous"),
    ((3, 5, 7, 9), "channels_last"),
    ((3, 5, 7, 9), "channel_slice"),
    ((3, 5, 7, 9), "transposed"),
    ((2, 6, 1, 1), "channels_last"),
    ((1001,), "contiguous"),
    ((1001,), "channel_slice"),
    ((37, 11), "contiguous"),
    ((37, 11), "transposed"),
    ((4, 3, 17), "channel_slice"),
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-{layout}" for s, layout in LAYOUT_CASES]


def noise(mu, var, backend, seed=SEED, stream=STREAM, offset=0):
    return pf.ops.gaussian_noise(mu, var, seed=seed, stream=stream, offset=offset, backend=backend)


def test_numpy_philox_matches_random123_known_answer():
    words = philox_words(np.zeros(1, dtype=np.uint64), 0, 0)
    assert [int(w[0]) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# ---- gaussian_noise: eps ------------------------------------------------------------------------
def test_float32_box_muller_is_within_a_few_ulp_of_float64():
    """The contract's float32 series against float64 libm on the same words: 2^20 draws, and the
    extreme words (u at both ends, the turn at every quarter)."""
    n = 1 << 20
    got, exact = expected_eps(n).double().numpy(), box_muller_f64(n)
    assert np.max(np.abs(got - exact) / np.maximum(np.abs(exact), 1e-3)) < 1e-6
    for word in (0, 0xFF, 0x100, 0x3FFFFF00, 0x40000000, 0x7FFFFF00, 0x80000000, 0xBFFFFF00, 0xFFFFFFFF):
        w = np.full(4, word, dtype=np.uint64)
        u = contract_uniform(w).astype(np.float32)
        assert abs(log_f32(u)[0] - np.log(u[0].astype(np.float64))) <= 1e-6 * abs(np.log(u[0].astype(np.float64)))
        cos, sin = turn_cos_sin(w)
        turn = 2.0 * np.pi * ((word >> 8) + 0.5) * 2.0 ** -24
        assert abs(cos[0] - math.cos(turn)) < 2e-7 and abs(sin[0] - math.sin(turn)) < 2e-7


def test_the_reference_normal_matches_the_independent_one():
    """pgnas_fast.reference.philox.normal against this file's numpy version, at offsets of every lane."""
    for offset in (0, 1, 2, 3, (1 << 33) + 6):
        assert torch.equal(philox.normal(1000, SEED, STREAM, offset, "cpu"), expected_eps(1000, offset=offset))


@pytest.mark.parametrize("shape, offset", [((2, 8, 4, 4), 0), ((2, 8, 4, 4), 2), ((3, 5, 2, 6), 4), ((1, 3, 1, 4), 8),
                                           ((2, 3, 3, 3), 4), ((2, 70, 2, 2), 12)])
def test_eps_of_every_channels_last_path(backend, shape, offset):
    """channels_last with H W and offset multiples of 4 (whole quads in one channel) and without."""
    mu = in_layout(torch.zeros(shape), "channels_last")
    var = in_layout(torch.ones(shape), "channels_last")
    out = noise(mu, var, backend, offset=offset)
    assert torch.equal(out.contiguous().view(-1), expected_eps(math.prod(shape), offset=offset))


@pytest.mark.parametrize("shape, layout", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_eps_is_bit_identical_to_the_contract(backend, shape, layout):
    """mu = 0 and var = 1 - 1e-8 (1.0 in float32): out is eps itself, indexed by the logical position."""
    n = math.prod(shape)
    mu = in_layout(torch.zeros(shape), layout)
    var = in_layout(torch.full(shape, 1.0 - 1e-8), layout)
    out = noise(mu, var, backend, offset=11)
    assert out.shape == mu.shape and out.dtype == torch.float32
    assert out.stride() == torch.empty_like(mu).stride()
    assert torch.equal(out.contiguous().view(-1), expected_eps(n, offset=11))


# (shape, layout, offset) reaching every GPU kernel path: dense packs (offset a multiple of 4) and
# quads cut by the offset, channels_last quads (H W and offset multiples of 4) and single elements
GPU_EPS_CASES = [((4, 8, 16, 16), "contiguous", 0), ((4, 8, 16, 16), "contiguous", 6), ((3, 5, 7, 9), "contiguous", 1),
                 ((1001,), "contiguous", 3), ((4, 8, 16, 16), "channels_last", 0), ((4, 8, 16, 16), "channels_last", 2),
                 ((3, 5, 7, 7), "channels_last", 4), ((2, 70, 6, 2), "channels_last", (1 << 32) - 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, layout, offset", GPU_EPS_CASES)
def test_gpu_eps_is_bit_identical_to_the_contract(gpu_backend, dtype, shape, layout, offset):
    """On CUDA tensors the GPU kernels draw the numpy contract's eps bit for bit (no fma contraction,
    correctly rounded divide and sqrt), forward and regenerated in backward (mu = 0, var = 1: out =
    eps; grad = 2: d var = eps)."""
    if not torch.cuda.is_available() or not pf.backends()[gpu_backend][0]:
        pytest.skip(f"{gpu_backend} needs a CUDA device")
    mu = in_layout(torch.zeros(shape, dtype=dtype), layout).cuda()
    var = in_layout(torch.ones(shape, dtype=dtype), layout).cuda()
    eps = expected_eps(math.prod(shape), offset=offset).view(shape)
    out = noise(mu, var, gpu_backend, offset=offset)
    assert out.stride() == mu.stride()
    assert torch.equal(out.cpu(), eps.to(dtype))
    grad_var = _library.gaussian_noise_backward(torch.full_like(var, 2.0), var, SEED, STREAM, offset, gpu_backend)
    torch.testing.assert_close(grad_var.cpu().float(), eps.to(dtype).float(), rtol=2e-7, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eps_of_a_large_tensor_spread_over_threads(backend, layout):
    if interpreted(backend):
        pytest.skip("the Triton interpreter: the small cases cover the kernel")
    shape = (8, 16, 20, 20)
    out = noise(in_layout(torch.zeros(shape), layout), in_layout(torch.ones(shape), layout), backend, offset=5)
    assert torch.equal(out.contiguous().view(-1), expected_eps(math.prod(shape), offset=5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_eps_in_other_dtypes_is_the_float32_eps(backend, dtype):
    shape = (2, 3, 4, 5)
    out = noise(torch.zeros(shape, dtype=dtype), torch.ones(shape, dtype=dtype), backend)
    eps = expected_eps(math.prod(shape)).view(shape)
    assert out.dtype == dtype
    if dtype == torch.float64:  # sqrt(1 + 1e-8) is not 1 in float64
        torch.testing.assert_close(out, eps.double() * math.sqrt(1.0 + 1e-8), rtol=1e-15, atol=0)
    elif dtype == torch.bfloat16 and interpreted(backend):
        # Triton's interpreter narrows float32 to bfloat16 toward zero (GPUs round to nearest): 1 ulp
        assert ((out.float() - eps).abs() <= eps.abs() * 2.0 ** -7).all()
    else:
        assert torch.equal(out, eps.to(dtype))


def test_offset_shifts_the_draw(backend):
    """Element i of a draw at offset k is element k + i of a draw at offset 0."""
    long = noise(torch.zeros(300), torch.ones(300), backend)
    for k in (1, 77, 299):
        shifted = noise(torch.zeros(300 - k), torch.ones(300 - k), backend, offset=k)
        assert torch.equal(shifted, long[k:])


def test_offset_carries_into_the_high_counter_word(backend):
    offset = (1 << 32) - 5  # elements straddle i = 2^32
    out = noise(torch.zeros(3, 4), torch.ones(3, 4), backend, offset=offset)
    assert torch.equal(out.view(-1), expected_eps(12, offset=offset))


# every lead (offset mod 4 = 1, 2, 3) against every tail (n mod 4 = 1, 2, 3), lead + tail past a
# whole quad or not; and sizes past the cpu kernels' 2048-element chunks and the interpreter's 8192-quad
# programs (32766: lead 3 needs a second program)
TAIL_SIZES = [1, 2, 3, 5, 6, 7, 13, 2 * 2048 + 3, 32766]
TAIL_OFFSETS = [1, 2, 3, 6, (1 << 32) - 3, (1 << 33) + 7]


@pytest.mark.parametrize("n", TAIL_SIZES)
def test_eps_tails_at_offsets_that_cut_a_quad_match_the_reference(backend, n):
    """Sizes no multiple of 4 at offsets no multiple of 4: eps (mu = 0, var = 1: out is eps) and the
    backward's regenerated eps (grad 2: d var = eps) equal the reference's bit for bit, every element
    of the tail included; random mu and var give the reference's values."""
    if n > 8000 and interpreted(backend):
        offsets = TAIL_OFFSETS[2:3]  # (the interpreter's second program: one case is enough)
    else:
        offsets = TAIL_OFFSETS
    gen = torch.Generator().manual_seed(n)
    mu, var = torch.randn(n, generator=gen), torch.rand(n, generator=gen) + 0.05
    for offset in offsets:
        zeros, ones = torch.zeros(n), torch.ones(n)
        eps = noise(zeros, ones, backend, offset=offset)
        ref = noise(zeros, ones, "reference", offset=offset)
        assert torch.equal(eps, ref), offset
        assert torch.equal(ref, expected_eps(n, offset=offset)), offset
        grad_var = _library.gaussian_noise_backward(torch.full((n,), 2.0), ones, SEED, STREAM, offset, backend)
        assert torch.equal(grad_var, ref), offset
        out = noise(mu, var, backend, offset=offset)
        assert rel_err(out, noise(mu, var, "reference", offset=offset)) < TOLERANCE[torch.float32], offset


@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (1, 5, 1, 7), (3, 2, 2, 3)])
def test_channels_last_eps_at_offsets_that_cut_a_quad_match_the_reference(backend, shape):
    """channels_last of H W no multiple of 4 (each element draws its own pair): every lead."""
    n = math.prod(shape)
    zeros = in_layout(torch.zeros(shape), "channels_last")
    ones = in_layout(torch.ones(shape), "channels_last")
    for offset in (1, 2, 3, (1 << 32) - 1):
        eps = noise(zeros, ones, backend, offset=offset)
        assert eps.stride() == zeros.stride()
        assert torch.equal(eps, noise(zeros, ones, "reference", offset=offset)), offset
        assert torch.equal(eps.contiguous().view(-1), expected_eps(n, offset=offset)), offset


def test_draw_depends_on_seed_and_stream_only(backend):
    mu, var = torch.zeros(4096), torch.ones(4096)
    base = noise(mu, var, backend)
    assert torch.equal(base, noise(mu, var, backend))
    for other in (noise(mu, var, backend, seed=SEED + 1), noise(mu, var, backend, stream=STREAM + 1)):
        assert (base == other).double().mean().item() < 1e-2


def test_eps_is_standard_normal(backend):
    """Fixed seed, 2^17 draws: KS test against N(0, 1) and moments within 5 standard errors."""
    n = 1 << 17
    eps = noise(torch.zeros(n), torch.ones(n), backend).double()
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1.0) < 5 * math.sqrt(2.0 / n)


def test_out_has_mean_mu_and_variance_var(backend):
    n = 1 << 17
    gen = torch.Generator().manual_seed(1)
    mu = torch.full((n,), 0.3)
    var = torch.full((n,), 2.5)
    out = noise(mu, var, backend, stream=STREAM + 5).double()
    assert abs(out.mean().item() - 0.3) < 5 * math.sqrt(2.5 / n)
    assert abs(out.var().item() - 2.5) < 5 * 2.5 * math.sqrt(2.0 / n)
    # standardised by per-element moments, the draws are N(0, 1)
    mu, var = torch.randn(n, generator=gen), 0.1 + torch.rand(n, generator=gen)
    z = (noise(mu, var, backend).double() - mu.double()) / torch.sqrt(var.double() + 1e-8)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


# ---- gaussian_noise: values ---------------------------------------------------------------------
def expected_noise(mu, var, offset=0) -> torch.Tensor:
    eps = expected_eps(mu.numel(), offset=offset).double().view(mu.shape)
    return mu.double() + torch.sqrt(var.double().clamp_min(0.0) + 1e-8) * eps


@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("shape, layout", LAYOUT_CASES[:5] + LAYOUT_CASES[7:8], ids=LAYOUT_IDS[:5] + LAYOUT_IDS[7:8])
def test_noise_values(backend, shape, layout, dtype):
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(shape, generator=gen).to(dtype)
    var = (torch.rand(shape, generator=gen) * 2.0 - 0.2).to(dtype)  # ~10% negative: clamped to 0
    out = noise(in_layout(mu, layout), in_layout(var, layout), backend, offset=3)
    assert out.dtype == dtype and out.stride() == torch.empty_like(in_layout(mu, layout)).stride()
    assert rel_err(out, expected_noise(mu, var, offset=3)) < TOLERANCE[dtype]
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected_noise(mu, var, offset=3).float(), rtol=1e-5, atol=1e-6)


def test_dense_inputs_whose_size_one_dims_have_other_strides(backend):
    gen = torch.Generator().manual_seed(10)
    mu = torch.randn(3, 1, 5, generator=gen)
    var = torch.rand(1, 3, 5, generator=gen).transpose(0, 1)  # contiguous too: strides (5, 15, 1)
    assert var.is_contiguous() and var.stride() != mu.stride()
    torch.testing.assert_close(noise(mu, var, backend).double(), expected_noise(mu, var), rtol=1e-5, atol=1e-6)
    grad = torch.randn(1, 3, 5, generator=gen).transpose(0, 1)
    got = _library.gaussian_noise_backward(grad, var.contiguous(), SEED, STREAM, 0, backend)
    eps = expected_eps(15).double().view(3, 1, 5)
    torch.testing.assert_close(got.double(), grad.double() * eps / (2.0 * torch.sqrt(var.double() + 1e-8)),
                               rtol=1e-5, atol=1e-7)


def test_empty_tensor(backend):
    out = noise(torch.zeros(0, 3), torch.zeros(0, 3), backend)
    assert out.shape == (0, 3)
    mu = torch.zeros(0, 3, requires_grad=True)
    noise(mu, torch.zeros(0, 3), backend).sum().backward()
    assert mu.grad.shape == (0, 3)


# ---- gaussian_noise: gradients ------------------------------------------------------------------
@pytest.mark.parametrize("shape, layout", [((2, 3, 2, 3), "contiguous"), ((2, 3, 2, 2), "channels_last"),
                                           ((3, 4, 3), "channel_slice"), ((7,), "contiguous")])
def test_noise_gradcheck(backend, shape, layout):
    gen = torch.Generator().manual_seed(3)
    mu = in_layout(torch.randn(shape, generator=gen, dtype=torch.float64), layout).requires_grad_()
    var = in_layout(0.2 + torch.rand(shape, generator=gen, dtype=torch.float64), layout).requires_grad_()
    fn = lambda m, v: noise(m, v, backend, offset=9)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, var), fast_mode=interpreted(backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_noise_gradients_match_formula(backend, dtype, layout):
    """d mu = grad; d var = grad eps / (2 sqrt(var + 1e-8)) where var > 0, exactly 0 where var <= 0."""
    gen = torch.Generator().manual_seed(4)
    shape = (3, 5, 4, 6)
    mu0 = torch.randn(shape, generator=gen).to(dtype)
    var0 = (torch.rand(shape, generator=gen) * 2.0 - 0.5).to(dtype)
    var0.view(-1)[::7] = 0.0
    mu = in_layout(mu0, layout).requires_grad_()
    var = in_layout(var0, layout).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(dtype)
    noise(mu, var, backend, offset=21).backward(grad)
    assert torch.equal(mu.grad, grad)
    eps = expected_eps(mu0.numel(), offset=21).double().view(shape)
    v = var0.double()
    expected = torch.where(v > 0, grad.double() * eps / (2.0 * torch.sqrt(v.clamp_min(0.0) + 1e-8)), 0.0)
    assert var.grad.dtype == dtype and var.grad.stride() == torch.empty_like(var).stride()
    assert rel_err(var.grad, expected) < TOLERANCE[dtype]
    assert torch.equal(var.grad[v <= 0], torch.zeros_like(var.grad[v <= 0]))


def test_backward_float64_matches_formula(backend):
    gen = torch.Generator().manual_seed(5)
    var = torch.rand(4, 9, generator=gen, dtype=torch.float64) - 0.25
    grad = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    got = _library.gaussian_noise_backward(grad, var, SEED, STREAM, 2, backend)
    eps = expected_eps(36, offset=2).double().view(4, 9)
    expected = torch.where(var > 0, grad * eps / (2.0 * torch.sqrt(var.clamp_min(0.0) + 1e-8)), 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


# ---- gaussian_kl --------------------------------------------------------------------------------
def kl_layers(gen, n_layers=53, dtype=torch.float32):
    """log alphas of mixed sizes (1 to 700 channels, > one kernel block) in [-8, 8] and their counts."""
    sizes = [1, 2, 3, 700, 257, 256] + [int(s) for s in torch.randint(1, 300, (n_layers - 6,), generator=gen)]
    log_alphas = [(16.0 * torch.rand(s, generator=gen) - 8.0).to(dtype) for s in sizes]
    counts = [int(c) for c in torch.randint(1, 5000, (n_layers,), generator=gen)]
    return log_alphas, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_value_and_gradient_match_closed_formula(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    log_alphas, counts = kl_layers(gen, dtype=dtype)
    leaves = [a.clone().requires_grad_() for a in log_alphas]
    kl = pf.ops.gaussian_kl(leaves, counts, n_train=50_000, backend=backend)
    assert kl.shape == () and kl.dtype == dtype
    exact = [a.double().requires_grad_() for a in log_alphas]
    expected = literal_kl(exact, counts, 50_000)
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert kl.item() == pytest.approx(expected.item(), rel=tol)
    kl.backward(torch.tensor(1.7, dtype=dtype))
    assert all(leaf.grad.dtype == dtype for leaf in leaves)
    # over the whole network: float32's s (1 - s) loses digits where s is near 1, in one channel
    assert rel_err(torch.cat([leaf.grad for leaf in leaves]), 1.7 * torch.cat([a.grad for a in exact])) < tol
    # the backward writes one flat buffer (ops._library) that autograd hands out as views
    assert len({leaf.grad.untyped_storage().data_ptr() for leaf in leaves}) == 1


def test_kl_mixed_precision_list_accumulates_in_float64(backend):
    gen = torch.Generator().manual_seed(7)
    log_alphas, counts = kl_layers(gen, n_layers=8)
    log_alphas[3] = log_alphas[3].double()
    kl = pf.ops.gaussian_kl(log_alphas, counts, n_train=1000.0, backend=backend)
    assert kl.dtype == torch.float64
    assert kl.item() == pytest.approx(literal_kl(log_alphas, counts, 1000.0).item(), rel=1e-6)
    leaves = [a.clone().requires_grad_() for a in log_alphas]
    pf.ops.gaussian_kl(leaves, counts, n_train=1000.0, backend=backend).backward()
    exact = [a.double().requires_grad_() for a in log_alphas]
    literal_kl(exact, counts, 1000.0).backward()
    for leaf, ref in zip(leaves, exact):  # each gradient in its own tensor's dtype, from the float64 buffer
        assert leaf.grad.dtype == leaf.dtype and rel_err(leaf.grad, ref.grad) < 1e-6


@pytest.mark.parametrize("float64_layers", [(3,), (0, 5), (7,)], ids=lambda layers: f"float64 at {layers}")
def test_kl_of_mixed_dtypes_is_float64_throughout(backend, float64_layers):
    """float32 and float64 log alphas in one call: the KL and its one flat gradient are float64
    (math_dtype) wherever the float64 layers sit in the list. The value is the float64 formula's to
    1e-12 (a float32 sum would be ~1e-7 off); each leaf's gradient has its own dtype, float64 leaves
    float64-exact and float32 leaves the float64 gradient rounded once; the reference agrees."""
    gen = torch.Generator().manual_seed(8)
    log_alphas, counts = kl_layers(gen, n_layers=8)
    log_alphas = [a.double() if k in float64_layers else a for k, a in enumerate(log_alphas)]
    results = {}
    for name in (backend, "reference"):
        leaves = [a.clone().requires_grad_() for a in log_alphas]
        kl = pf.ops.gaussian_kl(leaves, counts, n_train=1000.0, backend=name)
        kl.backward(torch.tensor(1.3, dtype=kl.dtype))
        results[name] = kl, [leaf.grad for leaf in leaves]
    exact = [a.detach().double().clone().requires_grad_() for a in log_alphas]
    expected = literal_kl(exact, counts, 1000.0)
    expected.backward(torch.tensor(1.3, dtype=torch.float64))
    kl, grads = results[backend]
    assert kl.dtype == torch.float64 and kl.item() == pytest.approx(expected.item(), rel=1e-12)
    rounding = {torch.float64: 1e-12, torch.float32: 2.0 ** -23}
    for k, (a, grad, ref_grad, want) in enumerate(zip(log_alphas, grads, results["reference"][1], exact)):
        assert grad.dtype == ref_grad.dtype == a.dtype, k
        assert rel_err(grad, want.grad) < rounding[a.dtype], (k, a.dtype)
        assert rel_err(grad, ref_grad) < rounding[a.dtype], (k, a.dtype)


def test_kl_by_hand():
    """One channel at log alpha 0: KL = 1/N * count * (K1 - K1 sigmoid(K2) + 0.5 log 2)."""
    kl = pf.ops.gaussian_kl([torch.zeros(1, dtype=torch.float64)], [10], n_train=4.0, backend="reference")
    by_hand = 10 / 4.0 * (K1 - K1 / (1.0 + math.exp(-K2)) + 0.5 * math.log(2.0))
    assert kl.item() == pytest.approx(by_hand, rel=1e-14)


def test_kl_gradcheck(backend):
    gen = torch.Generator().manual_seed(8)
    inputs = [(6.0 * torch.rand(s, generator=gen, dtype=torch.float64) - 3.0).requires_grad_() for s in (3, 1, 5)]
    fn = lambda *a: pf.ops.gaussian_kl(list(a), [9, 2, 40], n_train=7.0, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=interpreted(backend))


def test_kl_extreme_log_alphas_are_finite(backend):
    a = torch.tensor([-60.0, -20.0, 0.0, 20.0, 60.0], requires_grad=True)
    kl = pf.ops.gaussian_kl([a], [3], n_train=1.0, backend=backend)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(a.grad).all()
    expected = literal_kl([a.detach()], [3], 1.0)
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_keeps_its_digits_at_large_log_alphas(backend, dtype):
    """Where sigmoid(K2 + K3 a) is near 1, K1 - K1 sigmoid(..) and s (1 - s) cancel unless written as
    K1 sigmoid(-(K2 + K3 a)) and sigmoid(t) sigmoid(-t): one channel each, value and gradient to the
    dtype's precision against the closed forms in float64 (a = 12, 20: the KL is the 1e-6 .. 1e-9 tail)."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for value in (12.0, 20.0, 30.0, -30.0):
        a = torch.tensor([value], dtype=dtype, requires_grad=True)
        kl = pf.ops.gaussian_kl([a], [7], n_train=2.0, backend=backend)
        kl.backward()
        t = K2 + K3 * value
        sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
        expected = 7 / 2.0 * (K1 * sig(-t) + 0.5 * math.log1p(math.exp(-value)))
        expected_grad = 7 / 2.0 * (-K1 * K3 * sig(t) * sig(-t) - 0.5 * sig(-value))
        assert kl.item() == pytest.approx(expected, rel=tol), value
        assert a.grad.item() == pytest.approx(expected_grad, rel=tol), value


def test_kl_of_empty_layers(backend):
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    kl = pf.ops.gaussian_kl([empty, a], [5, 3], n_train=2.0, backend=backend)
    kl.backward()
    assert kl.item() == pytest.approx(literal_kl([a.detach()], [3], 2.0).item(), rel=1e-12)
    assert empty.grad.shape == (0,)
    only_empty = pf.ops.gaussian_kl([empty.detach()], [5], n_train=2.0, backend=backend)
    assert only_empty.item() == 0.0


# ---- opcheck ------------------------------------------------------------------------------------
def opcheck_cases(backend):
    """(op name, args) for torch.library.opcheck of the Gaussian family's custom ops."""
    gen = torch.Generator().manual_seed(9)

    def r(*shape, grad=False, dtype=torch.float32, low=None):
        t = torch.rand(shape, generator=gen) + low if low is not None else torch.randn(shape, generator=gen)
        return t.to(dtype).requires_grad_(grad)

    alphas = [r(5, grad=True), r(1, grad=True), r(300, grad=True)]
    return [
        ("gaussian_noise", (r(3, 4, 5, 5, grad=True), r(3, 4, 5, 5, grad=True, low=0.1), SEED, STREAM, 0, backend)),
        ("gaussian_noise", (r(3, 4, 5, 5).to(memory_format=torch.channels_last).requires_grad_(),
                            r(3, 4, 5, 5, low=0.1).to(memory_format=torch.channels_last).requires_grad_(), SEED,
                            STREAM, 17, backend)),
        ("gaussian_noise", (r(6, 7, dtype=torch.bfloat16, grad=True), r(6, 7, dtype=torch.bfloat16, low=-0.2, grad=True),
                            SEED, STREAM, 3, backend)),
        ("gaussian_noise_backward", (r(3, 4, 5), r(3, 4, 5, low=-0.2), SEED, STREAM, 5, backend)),
        ("gaussian_kl", (alphas, [7, 1, 30], 1e3, backend)),
        ("gaussian_kl_backward", (torch.tensor(0.7), [a.detach() for a in alphas], [7, 1, 30], 1e3, backend)),
    ]


def test_opcheck_gaussian_ops(backend):
    for name, args in opcheck_cases(backend):
        result = torch.library.opcheck(getattr(_library, name), args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


# ---- bad input ----------------------------------------------------------------------------------
MU = torch.randn(3, 4, 5)
VAR = torch.rand(3, 4, 5)
LA = [torch.randn(4), torch.randn(6)]

BAD_CALLS = [
    ("mu not a tensor", lambda: pf.ops.gaussian_noise(MU.numpy(), VAR, seed=0, stream=0), TypeError, r"\bmu must be"),
    ("mu int", lambda: pf.ops.gaussian_noise(MU.long(), VAR, seed=0, stream=0), TypeError, r"\bmu must have dtype"),
    ("mu 0-D", lambda: pf.ops.gaussian_noise(torch.tensor(1.0), torch.tensor(1.0), seed=0, stream=0), ValueError,
     r"\bmu must have at least 1"),
    ("var int", lambda: pf.ops.gaussian_noise(MU, VAR.long(), seed=0, stream=0), TypeError, r"\bvar must have dtype"),
    ("var shape", lambda: pf.ops.gaussian_noise(MU, VAR[:2], seed=0, stream=0), ValueError,
     r"var must have the shape and dtype of mu"),
    ("var dtype", lambda: pf.ops.gaussian_noise(MU, VAR.double(), seed=0, stream=0), ValueError,
     r"var must have the shape and dtype of mu"),
    ("var on another device", lambda: pf.ops.gaussian_noise(MU, VAR.to("meta"), seed=0, stream=0), ValueError,
     "var is on meta but mu is on cpu"),
    ("seed negative", lambda: pf.ops.gaussian_noise(MU, VAR, seed=-1, stream=0), ValueError, "seed"),
    ("seed float", lambda: pf.ops.gaussian_noise(MU, VAR, seed=1.0, stream=0), TypeError, "seed"),
    ("stream 2^63", lambda: pf.ops.gaussian_noise(MU, VAR, seed=0, stream=1 << 63), ValueError, "stream"),
    ("offset negative", lambda: pf.ops.gaussian_noise(MU, VAR, seed=0, stream=0, offset=-1), ValueError, "offset"),
    ("offset float", lambda: pf.ops.gaussian_noise(MU, VAR, seed=0, stream=0, offset=2.0), TypeError, "offset"),
    ("offset + numel past 2^63", lambda: pf.ops.gaussian_noise(MU, VAR, seed=0, stream=0, offset=(1 << 63) - 10),
     ValueError, r"offset \+ mu.numel\(\)"),
    ("kl tensor not list", lambda: pf.ops.gaussian_kl(LA[0], [3], n_train=10), TypeError, "log_alphas"),
    ("kl counts tensor", lambda: pf.ops.gaussian_kl(LA, torch.tensor([3, 4]), n_train=10), TypeError,
     "weights_per_channel"),
    ("kl empty", lambda: pf.ops.gaussian_kl([], [], n_train=10), ValueError, "non-empty"),
    ("kl unequal lengths", lambda: pf.ops.gaussian_kl(LA, [3], n_train=10), ValueError, "equal length"),
    ("kl count float", lambda: pf.ops.gaussian_kl(LA, [3, 4.0], n_train=10), TypeError, r"weights_per_channel\[1\]"),
    ("kl count bool", lambda: pf.ops.gaussian_kl(LA, [True, 4], n_train=10), TypeError, r"weights_per_channel\[0\]"),
    ("kl count 0", lambda: pf.ops.gaussian_kl(LA, [3, 0], n_train=10), ValueError, r"weights_per_channel\[1\]"),
    ("kl count 2^63", lambda: pf.ops.gaussian_kl(LA, [3, 1 << 63], n_train=10), ValueError,
     r"weights_per_channel\[1\] must be in \[1, 9223372036854775808\)"),
    ("kl n_train so small its inverse overflows float32", lambda: pf.ops.gaussian_kl(LA, [3, 4], n_train=1e-39),
     ValueError, r"1 / n_train must be <="),
    ("kl n_train 0", lambda: pf.ops.gaussian_kl(LA, [3, 4], n_train=0), ValueError, "n_train"),
    ("kl n_train nan", lambda: pf.ops.gaussian_kl(LA, [3, 4], n_train=float("nan")), ValueError, "n_train"),
    ("kl log_alpha float16", lambda: pf.ops.gaussian_kl([LA[0], LA[1].half()], [3, 4], n_train=10), TypeError,
     r"log_alphas\[1\]"),
    ("kl log_alpha on another device", lambda: pf.ops.gaussian_kl([LA[0], LA[1].to("meta")], [3, 4], n_train=10),
     ValueError, r"log_alphas\[1\] is on meta"),
    ("kl log_alpha 2-D", lambda: pf.ops.gaussian_kl([LA[0].view(2, 2)], [3], n_train=10), ValueError,
     r"log_alphas\[0\]"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


NATIVE_BAD_CALLS = [  # the raw `_C.cpu` entry points check again, naming the argument
    ("var strides", lambda ops: ops.gaussian_noise(MU, VAR.transpose(0, 1).contiguous().transpose(0, 1), 0, 0, 0),
     ValueError, "var must have the memory layout of mu"),
    ("mu strided", lambda ops: ops.gaussian_noise(MU[:, ::2], VAR[:, ::2], 0, 0, 0), ValueError,
     "mu must be contiguous or channels_last"),
    ("grad dtype", lambda ops: ops.gaussian_noise_backward(MU.double(), VAR, 0, 0, 0), TypeError,
     "grad must have the dtype of var"),
    ("offset negative", lambda ops: ops.gaussian_noise(MU, VAR, 0, 0, -3), ValueError, "offset must be"),
    ("offset + numel", lambda ops: ops.gaussian_noise(MU, VAR, 0, 0, (1 << 63) - 10), ValueError, "offset must be"),
    ("seed negative", lambda ops: ops.gaussian_noise(MU, VAR, -1, 0, 0), ValueError, "seed"),
    ("kl empty", lambda ops: ops.gaussian_kl([], [], 1.0), ValueError, "non-empty"),
    ("kl count 0", lambda ops: ops.gaussian_kl(LA, [1, 0], 1.0), ValueError, r"weights_per_channel\[1\]"),
    ("kl n_train", lambda ops: ops.gaussian_kl(LA, [1, 2], -1.0), ValueError, "n_train"),
    ("kl log_alpha int", lambda ops: ops.gaussian_kl([LA[0].long()], [1], 1.0), TypeError, r"log_alphas\[0\]"),
    ("kl grad shape", lambda ops: ops.gaussian_kl_backward(torch.ones(2), LA, [1, 2], 1.0), ValueError, "grad"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in NATIVE_BAD_CALLS], ids=[c[0] for c in NATIVE_BAD_CALLS])
def test_cpu_bindings_reject_bad_input_naming_the_argument(call, error, match):
    from pgnas_fast import cpu_backend

    if cpu_backend.unavailable_reason() is not None:
        pytest.skip(cpu_backend.unavailable_reason())
    with pytest.raises(error, match=match):
        call(cpu_backend._C.cpu)
