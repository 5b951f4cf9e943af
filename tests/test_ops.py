"""The public functional op set (design.md "Public functional API", "Numerics"), read as a specification.

Every op is checked, on every live CPU backend, against a plain-torch formula written here in float64;
the uniforms come from `philox_uniform`, whose bits tests/test_philox.py pins to Philox4x32-10.
"""
from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest
import torch
from scipy import stats
from torch._library.custom_ops import CustomOpDef

import pgnas_fast as pf
from pgnas_fast.ops import _library, dispatch
from pgnas_fast.ops.streams import Domain, stream_id

from conftest import TOLERANCE, DispatchLog, interpreted, rel_err

SEED = 20200207
STREAM = stream_id(Domain.TRAIN, 3, 1)
DATA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- independent formulas -----------------------------------------------------------------------
def uniforms(batch: int, channels: int, seed: int = SEED, stream: int = STREAM) -> torch.Tensor:
    """u of gate (b, c) = element b*C + c of the stream, as float32 [B, C]."""
    return pf.ops.philox_uniform(batch * channels, seed=seed, stream=stream, backend="reference").view(batch, channels)


def expected_keep(p_logit, batch, *, seed=SEED, stream=STREAM, tau=0.2, mode="relaxed") -> torch.Tensor:
    """keep [B, C] in float64 (differentiable in p_logit for `relaxed`)."""
    channels = p_logit.shape[0]
    u = uniforms(batch, channels, seed, stream)
    if mode == "full":
        return torch.ones(batch, channels, dtype=torch.float64)
    if mode == "hard":  # drop iff u + p >= 1, evaluated in the gate dtype
        gate_dtype = p_logit.dtype
        drop = u.to(gate_dtype) + torch.sigmoid(p_logit.detach()) >= 1.0
        return (~drop).to(torch.float64)
    u = u.to(torch.float64)
    logistic = torch.log(u) - torch.log(1.0 - u)
    d = torch.sigmoid((p_logit.to(torch.float64) + logistic) / tau)  # relaxed drop indicator
    return 1.0 - d


def broadcast_keep(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return keep.reshape(*keep.shape, *([1] * (x.dim() - 2)))


def make_x(shape, dtype, layout, generator):
    """Random data (never zero) of `shape` in one of the layouts the op must accept."""
    if layout == "contiguous":
        x = torch.randn(shape, generator=generator)
    elif layout == "channels_last":
        x = torch.randn(shape, generator=generator).to(memory_format=torch.channels_last)
    elif layout == "channel_slice":  # every other channel of a wider tensor
        wide = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=generator)
        x = wide[:, ::2]
    elif layout == "spatial_transpose":
        x = torch.randn(*shape[:2], shape[3], shape[2], generator=generator).transpose(2, 3)
    elif layout == "batch_channel_transpose":
        x = torch.randn(shape[1], shape[0], *shape[2:], generator=generator).transpose(0, 1)
    elif layout == "expanded":  # zero strides over H and W
        x = torch.randn(*shape[:2], 1, 1, generator=generator).expand(shape)
    else:
        raise AssertionError(layout)
    x = x.to(dtype)
    assert tuple(x.shape) == tuple(shape)
    return x


def literal_regularizer(weights, p_logits, weight_reg, drop_reg, n_train) -> torch.Tensor:
    """R = wr/N sum (1 - p_c) W^2 + dr/N sum_c H'(p_c), in float64, H' written literally.

    A weight [O, C_in/G, ...] of a conv with G groups: output o reads input channel
    (o // (O / G)) * (C_in / G) + j at its position j.
    """
    total = torch.zeros((), dtype=torch.float64)
    for w, z in zip(weights, p_logits):
        w64, p = w.to(torch.float64), torch.sigmoid(z.to(torch.float64))
        out_channels, per_group = w.shape[0], w.shape[1]
        groups = z.shape[0] // per_group
        o = torch.arange(out_channels)[:, None]
        j = torch.arange(per_group)[None, :]
        channel = (o // (out_channels // groups)) * per_group + j  # [O, C_in/G]
        keep_prob = (1.0 - p)[channel].reshape(out_channels, per_group, *([1] * (w.dim() - 2)))
        total = total + weight_reg / n_train * (keep_prob * w64.square()).sum()
        total = total + drop_reg / n_train * (p * torch.log(p) + (1.0 - p) * torch.log(1.0 - p)).sum()
    return total


# ---- philox_uniform -----------------------------------------------------------------------------
def test_philox_uniform_shape_dtype_device_and_statistics(backend):
    u = pf.ops.philox_uniform(100_000, seed=SEED, stream=STREAM, device="cpu", backend=backend)
    assert u.shape == (100_000,) and u.dtype == torch.float32 and u.device.type == "cpu"
    assert stats.kstest(u.double().numpy(), "uniform").pvalue > 1e-3
    assert torch.equal(u, pf.ops.philox_uniform(100_000, seed=SEED, stream=STREAM, backend=backend))
    other = pf.ops.philox_uniform(100_000, seed=SEED, stream=STREAM + 1, backend=backend)
    assert (u == other).double().mean().item() < 1e-3
    assert pf.ops.philox_uniform(0, seed=SEED, stream=STREAM, backend=backend).shape == (0,)


def test_backends_agree_bit_for_bit_with_reference(backend):
    for seed, stream, offset in [(0, 0, 0), (SEED, STREAM, 12345), ((1 << 62) + 3, (1 << 60) + 9, (1 << 34) + 1)]:
        ours = pf.ops.philox_uniform(4097, seed=seed, stream=stream, offset=offset, backend=backend)
        ref = pf.ops.philox_uniform(4097, seed=seed, stream=stream, offset=offset, backend="reference")
        assert torch.equal(ours, ref)
    p_logit = torch.randn(37, generator=torch.Generator().manual_seed(0))
    hard = pf.ops.gate_keep(p_logit, 11, seed=SEED, stream=STREAM, mode="hard", backend=backend)
    assert torch.equal(hard, pf.ops.gate_keep(p_logit, 11, seed=SEED, stream=STREAM, mode="hard", backend="reference"))


# ---- gate_keep values ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch, channels", [(1, 1), (3, 7), (64, 33)])
@pytest.mark.parametrize("tau", [0.2, 2 / 3, 1.5])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_gate_keep_relaxed_values(backend, batch, channels, tau, gate_dtype):
    p_logit = (2.0 * torch.randn(channels, generator=torch.Generator().manual_seed(batch))).to(gate_dtype)
    keep = pf.ops.gate_keep(p_logit, batch, seed=SEED, stream=STREAM, tau=tau, backend=backend)
    assert keep.shape == (batch, channels) and keep.dtype == gate_dtype
    assert ((keep >= 0) & (keep <= 1)).all()
    assert rel_err(keep, expected_keep(p_logit, batch, tau=tau)) < TOLERANCE[gate_dtype]


def test_gate_keep_default_tau_is_0_2(backend):
    p_logit = torch.randn(9, generator=torch.Generator().manual_seed(1))
    default = pf.ops.gate_keep(p_logit, 4, seed=SEED, stream=STREAM, backend=backend)
    assert torch.equal(default, pf.ops.gate_keep(p_logit, 4, seed=SEED, stream=STREAM, tau=0.2, backend=backend))
    assert rel_err(default, expected_keep(p_logit, 4, tau=0.2)) < 1e-5


def test_gate_keep_rows_use_consecutive_elements(backend):
    """Row b of the gates is elements b*C .. b*C + C - 1 of the stream."""
    batch, channels = 5, 6
    p_logit = torch.randn(channels, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = pf.ops.gate_keep(p_logit, batch, seed=SEED, stream=STREAM, backend=backend)
    for b in range(batch):
        u = pf.ops.philox_uniform(channels, seed=SEED, stream=STREAM, offset=b * channels).double()
        row = torch.sigmoid(-(p_logit + torch.log(u) - torch.log1p(-u)) / 0.2)
        torch.testing.assert_close(keep[b], row, rtol=1e-12, atol=0)
    # a larger batch extends, and does not reshuffle, the first rows
    more = pf.ops.gate_keep(p_logit, batch + 3, seed=SEED, stream=STREAM, backend=backend)
    assert torch.equal(more[:batch], keep)


def test_gate_keep_of_a_layer_without_channels(backend):
    """C = 0: an empty keep [batch, 0] and gradient [0], as the reference (triton once divided its
    grid size by a block of next_power_of_2(0) = 0; the cpu backward rejected the empty gradient's
    strides)."""
    p_logit = torch.zeros(0, requires_grad=True)
    for mode in ("relaxed", "hard"):
        keep = pf.ops.gate_keep(p_logit, 4, seed=SEED, stream=STREAM, mode=mode, backend=backend)
        assert keep.shape == (4, 0)
        keep.sum().backward()
        assert p_logit.grad.shape == (0,)


def test_gate_keep_depends_on_seed_and_stream(backend):
    p_logit = torch.zeros(16)
    a = pf.ops.gate_keep(p_logit, 8, seed=1, stream=2, backend=backend)
    assert not torch.equal(a, pf.ops.gate_keep(p_logit, 8, seed=2, stream=2, backend=backend))
    assert not torch.equal(a, pf.ops.gate_keep(p_logit, 8, seed=1, stream=3, backend=backend))


# ---- gate_keep distribution ---------------------------------------------------------------------
def relaxed_drop_cdf(t: np.ndarray, p: float, tau: float) -> np.ndarray:
    """P(d <= t) for d = sigmoid((logit p + L) / tau), L standard logistic:
    d <= t  <=>  L <= tau * logit(t) - logit(p), and P(L <= l) = sigmoid(l)."""
    t = np.clip(t, 1e-300, 1.0 - 1e-16)
    logit_t = np.log(t) - np.log1p(-t)
    return 1.0 / (1.0 + np.exp(-(tau * logit_t - math.log(p / (1.0 - p)))))


def relaxed_drops(p: float, tau: float, gate_dtype, case: int, n_channels=100, batch=200) -> np.ndarray:
    """20000 relaxed drop indicators d = 1 - keep, all with drop probability p (own stream per case)."""
    p_logit = torch.full((n_channels,), math.log(p / (1.0 - p)), dtype=gate_dtype)
    keep = pf.ops.gate_keep(p_logit, batch, seed=SEED, stream=stream_id(Domain.TRAIN, 50, case), tau=tau)
    return (1.0 - keep.to(torch.float64)).flatten().numpy()


# float64 gate math at the paper's tau = 0.2; float32 at larger tau, where 1 - keep does not round
# to exactly 0 or 1 often enough to bias the statistic.
KS_CASES = [(case, *c) for case, c in enumerate([
    (0.3, 0.2, torch.float64), (0.5, 0.2, torch.float64), (0.9, 0.2, torch.float64),
    (0.1, 1.0, torch.float32), (0.5, 2 / 3, torch.float32)])]


@pytest.mark.parametrize("case, p, tau, gate_dtype", KS_CASES)
def test_relaxed_drop_follows_the_concrete_distribution(case, p, tau, gate_dtype):
    d = relaxed_drops(p, tau, gate_dtype, case)
    assert stats.kstest(d, lambda t: relaxed_drop_cdf(t, p, tau)).pvalue > 1e-3
    # the test has power: a 0.05 shift of p, or another tau, is rejected
    assert stats.kstest(d, lambda t: relaxed_drop_cdf(t, p - 0.05, tau)).pvalue < 1e-6
    assert stats.kstest(d, lambda t: relaxed_drop_cdf(t, p, 1.5 * tau)).pvalue < 1e-6
    # whatever tau, d > 1/2 exactly when logit p + L > 0, which has probability p
    assert abs((d > 0.5).mean() - p) < 5.0 * math.sqrt(p * (1.0 - p) / d.size)


@pytest.mark.parametrize("case, p, tau, gate_dtype", KS_CASES)
def test_relaxed_drop_matches_torch_relaxed_bernoulli(case, p, tau, gate_dtype):
    d = relaxed_drops(p, tau, gate_dtype, case)
    torch.manual_seed(12345 + case)
    dist = torch.distributions.RelaxedBernoulli(
        torch.tensor(tau, dtype=torch.float64), logits=torch.tensor(math.log(p / (1 - p)), dtype=torch.float64)
    )
    samples = dist.sample((d.size,)).numpy()
    assert stats.ks_2samp(d, samples).pvalue > 1e-3


# ---- hard and full gates ------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_hard_gate_drop_frequency_is_p(backend, p):
    channels, batch = 100, 200
    p_logit = torch.full((channels,), math.log(p / (1.0 - p)))
    keep = pf.ops.gate_keep(p_logit, batch, seed=SEED, stream=stream_id(Domain.CANDIDATE, 5, 2), mode="hard",
                            backend=backend)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    n = keep.numel()
    drop_rate = 1.0 - keep.double().mean().item()
    assert abs(drop_rate - p) < 5.0 * math.sqrt(p * (1.0 - p) / n)


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_hard_gate_drops_iff_u_plus_p_at_least_one(backend, gate_dtype):
    batch, channels = 50, 41
    p_logit = (1.5 * torch.randn(channels, generator=torch.Generator().manual_seed(3))).to(gate_dtype)
    keep = pf.ops.gate_keep(p_logit, batch, seed=SEED, stream=STREAM, mode="hard", backend=backend)
    u = uniforms(batch, channels).to(gate_dtype)
    drop = u + torch.sigmoid(p_logit) >= 1.0
    assert torch.equal(keep, (~drop).to(gate_dtype))
    assert 0 < drop.sum() < drop.numel()  # both outcomes occur


def test_a_nan_drop_logit_drops_its_channel_in_hard_mode(backend):
    """keep iff u + p < 1, as the reference writes it: a NaN p drops (triton tested u + p >= 1 and kept)."""
    p_logit = torch.tensor([float("nan"), 0.0, -3.0, float("nan")])
    for keep in (pf.ops.gate_keep(p_logit, 3, seed=1, stream=2, mode="hard", backend=backend),
                 pf.ops.candidate_keep(p_logit, torch.tensor([3, 4]), seed=1, layer=0, backend=backend)):
        assert (keep[:, [0, 3]] == 0).all()
    assert torch.equal(pf.ops.gate_keep(p_logit, 3, seed=1, stream=2, mode="hard", backend=backend),
                       pf.ops.gate_keep(p_logit, 3, seed=1, stream=2, mode="hard", backend="reference"))


def test_hard_gate_at_the_boundary_drops():
    """u + p == 1 exactly drops (the authors' 1 - floor(u + p)); one ulp less of p keeps."""
    u = uniforms(1, 16)[0].to(torch.float64)
    on_boundary, below = [], []
    for u_c in u.tolist():
        z = math.log((1.0 - u_c) / u_c)
        candidates = [z]
        for _ in range(64):
            candidates = [np.nextafter(candidates[0], -np.inf), *candidates, np.nextafter(candidates[-1], np.inf)]
        p = torch.sigmoid(torch.tensor(candidates, dtype=torch.float64))
        hits = (u_c + p == 1.0).nonzero().flatten().tolist()
        if hits and u_c + p[hits[0] - 1].item() < 1.0:
            on_boundary.append(candidates[hits[0]])
            below.append(candidates[hits[0] - 1])
        else:
            on_boundary.append(float("nan"))  # no exact tie reachable for this u: not checked
            below.append(float("nan"))
    checked = [c for c, z in enumerate(on_boundary) if not math.isnan(z)]
    assert len(checked) >= 4
    tie = torch.tensor(on_boundary, dtype=torch.float64)[checked]
    less = torch.tensor(below, dtype=torch.float64)[checked]
    all_tie = torch.zeros(16, dtype=torch.float64)
    all_tie[checked] = tie
    all_less = torch.zeros(16, dtype=torch.float64)
    all_less[checked] = less
    keep_tie = pf.ops.gate_keep(all_tie, 1, seed=SEED, stream=STREAM, mode="hard")[0]
    keep_less = pf.ops.gate_keep(all_less, 1, seed=SEED, stream=STREAM, mode="hard")[0]
    assert (keep_tie[checked] == 0).all()
    assert (keep_less[checked] == 1).all()


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_hard_masks_near_ties_equal_the_reference(backend, gate_dtype):
    """p_logit at logit(1 - u) per channel, so that u + p is within a few ulps of 1: every hard-gated
    op drops exactly the reference's gates (found by tests/test_ops_fuzz.py: the triton kernels took
    p = 1 / (1 + exp(-z)) in-kernel, off torch's sigmoid in the last bit, and 8 of these 4096 masks
    differed in float32, 10 in float64)."""
    channels = 4096
    u = uniforms(1, channels)[0].to(torch.float64)
    p_logit = torch.log((1.0 - u.to(gate_dtype).double()) / u.to(gate_dtype).double()).to(gate_dtype)
    assert ((u + torch.sigmoid(p_logit.double()) - 1.0).abs() < 1e-6).all()  # every gate near its tie
    x = torch.randn(1, channels, generator=torch.Generator().manual_seed(16)).to(gate_dtype)
    ones, zeros = torch.ones(channels, dtype=gate_dtype), torch.zeros(channels, dtype=gate_dtype)
    calls = {
        "gate_keep": lambda b: pf.ops.gate_keep(p_logit, 1, seed=SEED, stream=STREAM, mode="hard", backend=b),
        "gated_apply": lambda b: pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, mode="hard", backend=b),
        "affine_relu_gate": lambda b: pf.ops.affine_relu_gate(x.abs(), ones, zeros, p_logit, seed=SEED, stream=STREAM,
                                                              mode="hard", backend=b),
        "gated_copies": lambda b: pf.ops.gated_copies(x, p_logit[None], seed=SEED, streams=[STREAM], mode="hard",
                                                      backend=b),
    }
    for name, call in calls.items():
        assert torch.equal(call(backend), call("reference")), name


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_full_gate_is_all_ones(backend, gate_dtype):
    p_logit = torch.randn(13, dtype=gate_dtype)
    keep = pf.ops.gate_keep(p_logit, 6, seed=SEED, stream=STREAM, mode="full", backend=backend)
    assert keep.dtype == gate_dtype and torch.equal(keep, torch.ones(6, 13, dtype=gate_dtype))


def test_extreme_p_logits_give_saturated_finite_gates(backend):
    p_logit = torch.tensor([-1000.0, -40.0, 40.0, 1000.0])
    relaxed = pf.ops.gate_keep(p_logit, 64, seed=SEED, stream=STREAM, backend=backend)
    assert torch.isfinite(relaxed).all()
    assert (relaxed[:, :2] > 0.999).all() and (relaxed[:, 2:] < 1e-3).all()
    hard = pf.ops.gate_keep(p_logit, 64, seed=SEED, stream=STREAM, mode="hard", backend=backend)
    assert (hard[:, :2] == 1).all() and (hard[:, 2:] == 0).all()


# ---- gated_apply values -------------------------------------------------------------------------
SHAPES_AND_LAYOUTS = [
    ((3, 7, 5, 5), "contiguous"),
    ((3, 7, 5, 5), "channels_last"),
    ((3, 7, 5, 5), "channel_slice"),
    ((3, 7, 5, 6), "spatial_transpose"),
    ((3, 7, 5, 5), "batch_channel_transpose"),
    ((3, 7, 5, 5), "expanded"),
    ((2, 16, 4, 4), "channels_last"),
    ((1, 1, 1, 1), "contiguous"),
    ((5, 9), "contiguous"),  # linear input [B, in]
    ((4, 6, 11), "contiguous"),  # conv1d input
]


@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("shape, layout", SHAPES_AND_LAYOUTS)
def test_gated_apply_values(backend, shape, layout, dtype, mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout)).encode()))
    x = make_x(shape, dtype, layout, gen)
    p_logit = 1.5 * torch.randn(shape[1], generator=gen)
    out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, mode=mode, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    keep = expected_keep(p_logit, shape[0], mode=mode)
    expected = x.to(torch.float64) * broadcast_keep(keep, x)
    assert rel_err(out, expected) < TOLERANCE[dtype]
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    if layout == "contiguous":
        assert out.is_contiguous()


def test_gated_apply_is_x_times_gate_keep(backend):
    x = torch.randn(4, 10, 3, 3, dtype=torch.float64)
    p_logit = torch.randn(10, dtype=torch.float64)
    for mode in ("relaxed", "hard", "full"):
        keep = pf.ops.gate_keep(p_logit, 4, seed=SEED, stream=STREAM, tau=0.5, mode=mode, backend=backend)
        out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, tau=0.5, mode=mode, backend=backend)
        torch.testing.assert_close(out, x * keep[:, :, None, None], rtol=1e-14, atol=0)


def test_gated_apply_float64_data_with_float32_gates(backend):
    x = torch.randn(3, 7, 5, 5, dtype=torch.float64)
    p_logit = torch.randn(7)
    out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend=backend)
    assert out.dtype == torch.float64
    assert rel_err(out, x * broadcast_keep(expected_keep(p_logit, 3), x)) < 1e-5


# ---- gradients: gate_keep and gated_apply -------------------------------------------------------
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_gate_keep_gradcheck(backend, tau):
    p_logit = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    fn = lambda p: pf.ops.gate_keep(p, 3, seed=SEED, stream=STREAM, tau=tau, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p_logit,))


@pytest.mark.parametrize("mode", ["hard", "full"])
def test_gate_keep_hard_and_full_have_zero_gradient(backend, mode):
    p_logit = torch.randn(5, requires_grad=True)
    keep = pf.ops.gate_keep(p_logit, 3, seed=SEED, stream=STREAM, mode=mode, backend=backend)
    keep.backward(torch.randn(3, 5))
    assert torch.equal(p_logit.grad, torch.zeros(5))


@pytest.mark.parametrize("tau", [0.2, 1.0])
@pytest.mark.parametrize("shape, layout", [((3, 4, 2, 3), "contiguous"), ((2, 5, 3, 3), "channels_last"),
                                           ((3, 4, 3, 2), "channel_slice"), ((4, 6), "contiguous")])
def test_gated_apply_gradcheck_relaxed(backend, shape, layout, tau):
    gen = torch.Generator().manual_seed(5)
    x = make_x(shape, torch.float64, layout, gen).requires_grad_()
    p_logit = torch.randn(shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda x, p: pf.ops.gated_apply(x, p, seed=SEED, stream=STREAM, tau=tau, backend=backend)  # noqa: E731
    # fast mode (a random projection of the Jacobian) under the Triton interpreter: same shapes and
    # layouts, a few launches instead of hundreds at ~0.1 s each
    assert torch.autograd.gradcheck(fn, (x, p_logit), fast_mode=interpreted(backend))


@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_gated_apply_relaxed_gradients_match_formula(backend, dtype, layout):
    """Low-precision data, float32 gates: grads against autograd of the float64 formula."""
    gen = torch.Generator().manual_seed(6)
    x = make_x((3, 7, 5, 5), dtype, layout, gen).requires_grad_()
    p_logit = torch.randn(7, generator=gen, requires_grad=True)
    dy = torch.randn(3, 7, 5, 5, generator=gen).to(dtype)
    out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend=backend)
    out.backward(dy)

    x64 = x.detach().to(torch.float64).requires_grad_()
    p64 = p_logit.detach().to(torch.float64).requires_grad_()
    expected = x64 * broadcast_keep(expected_keep(p64, 3), x64)
    expected.backward(dy.to(torch.float64))
    assert x.grad.dtype == dtype and p_logit.grad.dtype == torch.float32
    assert rel_err(x.grad, x64.grad) < TOLERANCE[dtype]
    assert rel_err(p_logit.grad, p64.grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("mode", ["hard", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gated_apply_hard_and_full_gradients(backend, mode, dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, 3, 3, generator=gen).to(dtype).requires_grad_()
    p_logit = torch.randn(6, generator=gen, requires_grad=True)
    dy = torch.randn(4, 6, 3, 3, generator=gen).to(dtype)
    pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, mode=mode, backend=backend).backward(dy)
    assert torch.equal(p_logit.grad, torch.zeros(6))
    keep = expected_keep(p_logit, 4, mode=mode)
    assert rel_err(x.grad, dy.to(torch.float64) * broadcast_keep(keep, x)) < TOLERANCE[dtype]
    if mode == "full":
        assert torch.equal(x.grad, dy)


def size_one_dims_restrided(t: torch.Tensor) -> torch.Tensor:
    """t's values, still dense (is_contiguous()), but with other strides in its size-1 dims, as some
    autograd backwards hand gradients on (a slice of a wider tensor there)."""
    dense = t.contiguous()
    view = dense.as_strided(dense.shape, [97 if n == 1 else st for n, st in zip(dense.shape, dense.stride())])
    assert view.is_contiguous() and view.stride() != t.stride() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("shape", [(1, 1), (3, 1, 4), (2, 5, 1, 1)])
def test_gated_apply_gradient_whose_size_one_dims_have_other_strides(backend, shape):
    """A dense incoming gradient whose size-1 dims have other strides than x's (found by
    tests/test_ops_fuzz.py: x [1, 1], grad strides (2, 1)): the cpu binding compared every stride
    and raised "grad must have the memory layout of x"."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(shape, generator=gen).requires_grad_()
    p_logit = torch.randn(shape[1], generator=gen, requires_grad=True)
    dy = size_one_dims_restrided(torch.randn(shape, generator=gen))
    pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend=backend).backward(dy)
    x64, p64 = x.detach().double().requires_grad_(), p_logit.detach().double().requires_grad_()
    (x64 * broadcast_keep(expected_keep(p64, shape[0]), x64)).backward(dy.double())
    assert rel_err(x.grad, x64.grad) < 1e-5 and rel_err(p_logit.grad, p64.grad) < 1e-5


# ---- element offset: a data-parallel shard draws its rows of the concatenated batch ---------------
SHARDS = 3  # ranks, each with ROWS examples of the concatenated batch of SHARDS * ROWS


@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_gate_keep_offset_gives_rows_of_the_concatenated_batch(backend, mode, gate_dtype):
    rows, channels = 2, 7
    gen = torch.Generator().manual_seed(31)
    p_logit = (1.5 * torch.randn(channels, generator=gen)).to(gate_dtype)
    dy = torch.randn(SHARDS * rows, channels, generator=gen).to(gate_dtype)
    whole_p = p_logit.clone().requires_grad_()
    whole = pf.ops.gate_keep(whole_p, SHARDS * rows, seed=SEED, stream=STREAM, mode=mode, backend=backend)
    whole.backward(dy)
    assert rel_err(whole, expected_keep(p_logit, SHARDS * rows, mode=mode)) < TOLERANCE[gate_dtype]
    grad_sum = torch.zeros_like(p_logit)
    for r in range(SHARDS):
        shard_p = p_logit.clone().requires_grad_()
        shard = pf.ops.gate_keep(shard_p, rows, seed=SEED, stream=STREAM, mode=mode, offset=r * rows * channels,
                                 backend=backend)
        # the same elements of the stream; relaxed values may differ in the last bit (vectorised tails)
        exact = mode != "relaxed"
        tol = 0 if exact else (1e-6 if gate_dtype == torch.float32 else 1e-14)
        torch.testing.assert_close(shard, whole[r * rows:(r + 1) * rows].detach(), rtol=tol, atol=tol)
        shard.backward(dy[r * rows:(r + 1) * rows])
        grad_sum += shard_p.grad
    # the shards' gradients add up to the concatenated batch's (DDP sums them, up to its 1 / world)
    torch.testing.assert_close(grad_sum, whole_p.grad, rtol=TOLERANCE[gate_dtype], atol=TOLERANCE[gate_dtype])
    if mode == "relaxed":
        assert grad_sum.abs().sum() > 0


@pytest.mark.parametrize("mode", ["relaxed", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, layout", [((2, 5, 3, 3), "contiguous"), ((2, 6, 3, 5), "channels_last"),
                                           ((1, 4, 3, 2), "channel_slice"), ((3, 9), "contiguous")])
def test_gated_apply_offset_gives_rows_of_the_concatenated_batch(backend, shape, layout, dtype, mode):
    """Values, dx and d p_logit of each shard (offset r * B * C) against the call on the whole batch."""
    rows, channels = shape[0], shape[1]
    whole_shape = (SHARDS * rows, *shape[1:])
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout)).encode()))
    x = make_x(whole_shape, dtype, layout, gen)
    p_logit = 1.5 * torch.randn(channels, generator=gen)
    dy = torch.randn(whole_shape, generator=gen).to(dtype)
    tol = max(TOLERANCE[dtype], TOLERANCE[p_logit.dtype])  # float32 gate math bounds float64 data
    whole_x, whole_p = x.detach().clone().requires_grad_(), p_logit.clone().requires_grad_()
    whole = pf.ops.gated_apply(whole_x, whole_p, seed=SEED, stream=STREAM, mode=mode, backend=backend)
    whole.backward(dy)
    expected = x.to(torch.float64) * broadcast_keep(expected_keep(p_logit, SHARDS * rows, mode=mode), x)
    assert rel_err(whole, expected) < tol
    grad_p = torch.zeros_like(p_logit)
    for r in range(SHARDS):
        at = slice(r * rows, (r + 1) * rows)
        shard_x, shard_p = x[at].detach().requires_grad_(), p_logit.clone().requires_grad_()
        shard = pf.ops.gated_apply(shard_x, shard_p, seed=SEED, stream=STREAM, mode=mode,
                                   offset=r * rows * channels, backend=backend)
        shard.backward(dy[at])
        assert rel_err(shard, whole[at]) < tol
        assert rel_err(shard_x.grad, whole_x.grad[at]) < tol
        grad_p += shard_p.grad
    if mode == "relaxed":
        assert grad_p.abs().sum() > 0
    assert rel_err(grad_p, whole_p.grad) < tol


def test_gate_offset_uses_64_bit_element_indices(backend):
    """Offsets past 2^32 (the counter's high word) and up to the last element below 2^63."""
    p_logit = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(32))
    x = torch.randn(3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(33))
    for offset in ((1 << 32) - 7, (1 << 40) + 3, (1 << 63) - 15):
        keep = pf.ops.gate_keep(p_logit, 3, seed=SEED, stream=STREAM, offset=offset, backend=backend)
        u = pf.ops.philox_uniform(15, seed=SEED, stream=STREAM, offset=offset, backend="reference").double()
        expected = torch.sigmoid(-(p_logit + torch.log(u.view(3, 5)) - torch.log1p(-u.view(3, 5))) / 0.2)
        torch.testing.assert_close(keep, expected, rtol=1e-12, atol=0)
        out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, offset=offset, backend=backend)
        torch.testing.assert_close(out, x * expected[:, :, None], rtol=1e-12, atol=0)


# ---- branch_combine -----------------------------------------------------------------------------
def expected_combine(ys, weights, skip=None) -> torch.Tensor:
    out = torch.zeros(ys[0].shape, dtype=torch.float64) if skip is None else skip.to(torch.float64).clone()
    for s, y in enumerate(ys):
        w = weights[s] if weights.dim() == 1 else weights[:, s].reshape(-1, *([1] * (y.dim() - 1)))
        out = out + w.to(torch.float64) * y.to(torch.float64)
    return out


@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("with_skip", [False, True])
@pytest.mark.parametrize("n_branches", [1, 2, 3])
@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_branch_combine_values(backend, per_example, with_skip, n_branches, dtype, layout):
    gen = torch.Generator().manual_seed(8)
    ys = [make_x((3, 7, 5, 5), dtype, layout, gen) for _ in range(n_branches)]
    weights = torch.rand(3, n_branches, generator=gen) if per_example else torch.rand(n_branches, generator=gen)
    weights = weights + 0.1
    skip = make_x((3, 7, 5, 5), dtype, layout, gen) if with_skip else None
    out = pf.ops.branch_combine(ys, weights, skip=skip, backend=backend)
    assert out.shape == ys[0].shape and out.dtype == dtype
    assert rel_err(out, expected_combine(ys, weights, skip)) < TOLERANCE[dtype]
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_branch_combine_of_many_16_bit_branches_rounds_once(backend, dtype):
    """More branches than one launch takes (triton: 4): the running sum stays in float32 between
    launches (it was rounded to the data dtype: bf16 256 + 0.5 - 256 gave 0, float16 4 x 30000 gave inf)."""
    values, weights = ([256.0, 0.5, 0.0, 0.0, -256.0], [1.0] * 5) if dtype == torch.bfloat16 else \
        ([30000.0] * 4 + [-30000.0] + [1.0] * 4, [1.0] * 4 + [4.0] + [0.25] * 4)
    ys = [torch.full((3, 5), v, dtype=dtype) for v in values]
    got = pf.ops.branch_combine(ys, torch.tensor(weights), backend=backend)
    want = pf.ops.branch_combine(ys, torch.tensor(weights), backend="reference")
    assert torch.isfinite(want).all() and torch.equal(got, want)


def test_branch_combine_forward_ignores_backward_weights(backend):
    gen = torch.Generator().manual_seed(9)
    ys = [torch.randn(4, 3, 2, 2, generator=gen) for _ in range(2)]
    weights, backward_weights = torch.rand(4, 2, generator=gen), torch.rand(4, 2, generator=gen)
    out = pf.ops.branch_combine(ys, weights, backward_weights=backward_weights, backend=backend)
    assert rel_err(out, expected_combine(ys, weights)) < 1e-6


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (5, 3), (4,)])
@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("with_skip", [False, True])
def test_branch_combine_gradcheck(backend, shape, per_example, with_skip):
    gen = torch.Generator().manual_seed(10)
    n_branches = 3
    ys = [torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(n_branches)]
    wshape = (shape[0], n_branches) if per_example else (n_branches,)
    weights = torch.rand(wshape, dtype=torch.float64, generator=gen, requires_grad=True)
    skip = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True) if with_skip else None

    def fn(weights, *rest):
        ys, skip = (list(rest[:-1]), rest[-1]) if with_skip else (list(rest), None)
        return pf.ops.branch_combine(ys, weights, skip=skip, backend=backend)

    inputs = (weights, *ys, *([skip] if with_skip else []))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted(backend))  # see gated_apply's gradcheck


@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("with_skip", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_branch_combine_backward_weights_shake_shake(backend, per_example, with_skip, dtype):
    """With backward_weights, dy_s = dout * backward_weight_s and the forward weights get zero grad."""
    gen = torch.Generator().manual_seed(11)
    batch, n_branches, shape = 4, 2, (4, 3, 5, 5)
    ys = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(n_branches)]
    wshape = (batch, n_branches) if per_example else (n_branches,)
    weights = torch.rand(wshape, generator=gen, requires_grad=True)
    backward_weights = torch.rand(wshape, generator=gen)
    skip = torch.randn(shape, generator=gen).to(dtype).requires_grad_() if with_skip else None
    dout = torch.randn(shape, generator=gen).to(dtype)
    pf.ops.branch_combine(ys, weights, skip=skip, backward_weights=backward_weights, backend=backend).backward(dout)

    assert torch.equal(weights.grad, torch.zeros(wshape))
    for s, y in enumerate(ys):
        bw = backward_weights[s] if not per_example else backward_weights[:, s].reshape(-1, 1, 1, 1)
        assert rel_err(y.grad, dout.to(torch.float64) * bw.to(torch.float64)) < TOLERANCE[dtype]
    if with_skip:
        assert torch.equal(skip.grad, dout)


@pytest.mark.parametrize("dtype", DATA_DTYPES)
def test_branch_combine_weight_gradients_match_formula(backend, dtype):
    gen = torch.Generator().manual_seed(12)
    ys = [torch.randn(3, 7, 5, 5, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
    weights = torch.rand(3, 2, generator=gen, requires_grad=True)
    dout = torch.randn(3, 7, 5, 5, generator=gen).to(dtype)
    pf.ops.branch_combine(ys, weights, backend=backend).backward(dout)
    expected = torch.stack([(dout.double() * y.double()).flatten(1).sum(1) for y in ys], dim=1)
    assert weights.grad.dtype == torch.float32
    assert rel_err(weights.grad, expected) < TOLERANCE[dtype]
    for s, y in enumerate(ys):
        assert rel_err(y.grad, dout.double() * weights[:, s].double().reshape(-1, 1, 1, 1)) < TOLERANCE[dtype]


@pytest.mark.parametrize("per_example", [True, False])
def test_branch_combine_tensors_whose_size_one_dims_have_other_strides(backend, per_example):
    """ys[1], skip and the incoming gradient dense, but with other strides than ys[0] in size-1 dims
    (found by tests/test_ops_fuzz.py: ys [1], grad strides (2,)): the cpu binding raised "grad must
    have the memory layout of ys[0]"."""
    gen = torch.Generator().manual_seed(14)
    shape = (1, 3, 1)
    ys = [torch.randn(shape, generator=gen), size_one_dims_restrided(torch.randn(shape, generator=gen))]
    ys = [y.requires_grad_() for y in ys]
    skip = size_one_dims_restrided(torch.randn(shape, generator=gen)).requires_grad_()
    weights = torch.rand((1, 2) if per_example else (2,), generator=gen, requires_grad=True)
    dout = size_one_dims_restrided(torch.randn(shape, generator=gen))
    out = pf.ops.branch_combine(ys, weights, skip=skip, backend=backend)
    assert rel_err(out, expected_combine(ys, weights, skip)) < 1e-6
    out.backward(dout)
    for s, y in enumerate(ys):
        w = weights[s] if not per_example else weights[0, s]
        assert rel_err(y.grad, dout.double() * w.double()) < 1e-6
    expected_w = torch.stack([(dout.double() * y.double()).sum() for y in ys])
    assert rel_err(weights.grad, expected_w.view(weights.shape)) < 1e-6
    assert torch.equal(skip.grad, dout)


@pytest.mark.parametrize("shape", [(0, 3), (0,), (0, 2, 1, 1)])
def test_branch_combine_of_an_empty_batch_with_per_example_weights(backend, shape):
    """B = 0 with weights [0, S]: empty outputs and gradients (found by tests/test_ops_fuzz.py: ys
    [0, 1], weights [0, 1]: the reference backward reshaped its empty product to [0, -1] and raised)."""
    ys = [torch.zeros(shape, requires_grad=True) for _ in range(2)]
    weights = torch.zeros(0, 2, requires_grad=True)
    out = pf.ops.branch_combine(ys, weights, backend=backend)
    assert out.shape == shape
    grads = torch.autograd.grad(out, [weights, *ys], torch.zeros(shape))
    assert grads[0].shape == (0, 2) and all(g.shape == shape for g in grads[1:])


# ---- regularizer --------------------------------------------------------------------------------
def mixed_layers(gen, dtype=torch.float32, gate_dtype=torch.float32):
    """Weights of a conv, a linear, a grouped conv, a depthwise conv, a grouped 1x1 conv whose output
    groups are wider than their inputs, and a conv1d; with one p_logit per input channel."""
    shapes = [  # (weight shape, C_in)
        ((8, 3, 3, 3), 3),
        ((10, 6), 6),
        ((8, 2, 3, 3), 4),  # groups = 2
        ((6, 1, 3, 3), 6),  # depthwise
        ((9, 2, 1, 1), 6),  # groups = 3, 3 outputs per group
        ((5, 4, 3), 4),
    ]
    weights = [(0.5 * torch.randn(s, generator=gen)).to(dtype) for s, _ in shapes]
    p_logits = [(1.5 * torch.randn(c, generator=gen)).to(gate_dtype) for _, c in shapes]
    return weights, p_logits


@pytest.mark.parametrize("weight_reg, drop_reg", [(10.0, 1.0), (0.0, 1.0), (150.0, 0.0), (2.5, 3.0)])
def test_regularizer_value_matches_literal_formula(backend, weight_reg, drop_reg):
    weights, p_logits = mixed_layers(torch.Generator().manual_seed(13))
    n_train = 5e5
    r = pf.ops.regularizer(weights, p_logits, weight_reg=weight_reg, drop_reg=drop_reg, n_train=n_train,
                           backend=backend)
    assert r.shape == () and r.dtype == torch.float32
    assert rel_err(r, literal_regularizer(weights, p_logits, weight_reg, drop_reg, n_train)) < 1e-5


def test_regularizer_single_conv_by_hand():
    """One 1x1 conv, two input channels: R written out term by term."""
    weight = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[-1.0]]]])  # [O=2, C_in=2, 1, 1]
    p_logit = torch.tensor([0.0, math.log(3.0)])  # p = 1/2, 3/4
    r = pf.ops.regularizer([weight], [p_logit], weight_reg=4.0, drop_reg=2.0, n_train=8.0)
    weight_term = (1 - 0.5) * (1.0 + 9.0) + (1 - 0.75) * (4.0 + 1.0)
    h = (0.5 * math.log(0.5) * 2) + (0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert r.item() == pytest.approx(4.0 / 8.0 * weight_term + 2.0 / 8.0 * h, rel=1e-6)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
def test_regularizer_low_precision_weights(backend, weight_dtype):
    weights, p_logits = mixed_layers(torch.Generator().manual_seed(14), dtype=weight_dtype)
    r = pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=1000.0, backend=backend)
    assert r.dtype == torch.float32
    assert rel_err(r, literal_regularizer(weights, p_logits, 10.0, 1.0, 1000.0)) < TOLERANCE[weight_dtype]


def test_regularizer_non_contiguous_weights(backend):
    gen = torch.Generator().manual_seed(15)
    conv = torch.randn(8, 4, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    linear = torch.randn(6, 10, generator=gen).t()  # [10, 6] transposed view
    grouped = torch.randn(8, 4, 3, 3, generator=gen)[:, ::2]  # [8, 2, 3, 3], groups = 2
    weights = [conv, linear, grouped]
    p_logits = [torch.randn(4, generator=gen), torch.randn(6, generator=gen), torch.randn(4, generator=gen)]
    r = pf.ops.regularizer(weights, p_logits, weight_reg=3.0, drop_reg=1.0, n_train=100.0, backend=backend)
    assert rel_err(r, literal_regularizer(weights, p_logits, 3.0, 1.0, 100.0)) < 1e-5


def test_regularizer_gradcheck_grouped_conv(backend):
    gen = torch.Generator().manual_seed(16)
    weight = torch.randn(6, 2, 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)  # groups = 3
    p_logit = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda w, p: pf.ops.regularizer([w], [p], weight_reg=30.0, drop_reg=2.0, n_train=10.0,  # noqa: E731
                                         backend=backend)
    assert torch.autograd.gradcheck(fn, (weight, p_logit))


def test_regularizer_gradcheck_mixed_layers(backend):
    """All layer kinds in one call; fast mode (random projections of the Jacobian) keeps it quick."""
    weights, p_logits = mixed_layers(torch.Generator().manual_seed(16), torch.float64, torch.float64)
    inputs = [t.requires_grad_() for t in (*weights, *p_logits)]
    n = len(weights)

    def fn(*tensors):
        return pf.ops.regularizer(list(tensors[:n]), list(tensors[n:]), weight_reg=30.0, drop_reg=2.0, n_train=10.0,
                                  backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_regularizer_gradients_match_literal_formula(backend, weight_dtype):
    weights, p_logits = mixed_layers(torch.Generator().manual_seed(17), dtype=weight_dtype)
    for t in (*weights, *p_logits):
        t.requires_grad_()
    pf.ops.regularizer(weights, p_logits, weight_reg=50.0, drop_reg=1.0, n_train=1e3, backend=backend).backward()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    p64 = [p.detach().double().requires_grad_() for p in p_logits]
    literal_regularizer(w64, p64, 50.0, 1.0, 1e3).backward()
    for w, ref in zip(weights, w64):
        assert w.grad.dtype == weight_dtype
        assert rel_err(w.grad, ref.grad) < TOLERANCE[weight_dtype]
    for p, ref in zip(p_logits, p64):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, ref.grad) < 1e-5


def test_regularizer_gradients_are_views_of_two_flat_buffers(backend):
    """The backward's contract (ops._library): one flat buffer per kind, in list order, handed to
    autograd as views; a mixed-dtype list gets its own dtypes back."""
    weights, p_logits = mixed_layers(torch.Generator().manual_seed(19))
    weights[1] = weights[1].double()  # promotes the flat weight gradient to float64
    p_logits[2] = p_logits[2].double()  # and the gate math
    flat_w, flat_p = _library.regularizer_backward(torch.tensor(0.7), weights, p_logits, 10.0, 1.0, 1e3, backend)
    ref_w, ref_p = _library.regularizer_backward(torch.tensor(0.7), weights, p_logits, 10.0, 1.0, 1e3, "reference")
    assert flat_w.shape == (sum(w.numel() for w in weights),) and flat_w.dtype == torch.float64
    assert flat_p.shape == (sum(p.numel() for p in p_logits),) and flat_p.dtype == torch.float64
    assert rel_err(flat_w, ref_w) < 1e-5 and rel_err(flat_p, ref_p) < 1e-5

    weights, p_logits = mixed_layers(torch.Generator().manual_seed(20))
    for t in (*weights, *p_logits):
        t.requires_grad_()
    pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=1e3, backend=backend).backward()
    for tensors in (weights, p_logits):  # autograd kept the views: no per-tensor copies
        assert len({t.grad.untyped_storage().data_ptr() for t in tensors}) == 1
        starts = [t.grad.data_ptr() - tensors[0].grad.data_ptr() for t in tensors]
        sizes = [t.numel() * t.element_size() for t in tensors]
        assert starts == [sum(sizes[:k]) for k in range(len(tensors))]


# twice the unit roundoff: a gradient computed in float64 and rounded once to the leaf's dtype
ROUNDED_TO = {torch.float64: 1e-12, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("weight_dtypes, p_dtypes", [
    ((torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16),
     (torch.float32, torch.float64, torch.float32, torch.float32, torch.float64, torch.float32)),
    ((torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.float32),
     (torch.float64, torch.float32, torch.float32, torch.float32, torch.float32, torch.float32)),
], ids=["mixed weights and gates", "narrow weights, one float64 gate layer first"])
def test_regularizer_of_mixed_dtypes_differentiates_in_float64(backend, weight_dtypes, p_dtypes):
    """A whole network of weights in four dtypes and drop logits in two, one call: one float64 p_logit
    puts the gate math (R and both flat gradients' p part) in float64 (math_dtype). R is then the
    float64 formula's value; every leaf gets its gradient in its own dtype, the float64 gradient
    rounded once (float64 leaves: float64-exact); and the reference agrees."""
    gen = torch.Generator().manual_seed(23)
    weights, p_logits = mixed_layers(gen)
    weights = [w.to(d) for w, d in zip(weights, weight_dtypes)]
    p_logits = [p.to(d) for p, d in zip(p_logits, p_dtypes)]
    upstream = 0.7
    results = {}
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (*weights, *p_logits)]
        n = len(weights)
        r = pf.ops.regularizer(leaves[:n], leaves[n:], weight_reg=30.0, drop_reg=2.0, n_train=1e3, backend=name)
        r.backward(torch.tensor(upstream, dtype=r.dtype))
        results[name] = r, [leaf.grad for leaf in leaves]
    exact = [t.detach().to(torch.float64).clone().requires_grad_() for t in (*weights, *p_logits)]
    expected = literal_regularizer(exact[:len(weights)], exact[len(weights):], 30.0, 2.0, 1e3)
    expected.backward(torch.tensor(upstream, dtype=torch.float64))
    r, grads = results[backend]
    assert r.dtype == torch.float64 and rel_err(r, expected) < 1e-12
    for k, (leaf, grad, ref_grad, want) in enumerate(zip((*weights, *p_logits), grads, results["reference"][1],
                                                         exact)):
        assert grad.dtype == ref_grad.dtype == leaf.dtype and grad.shape == leaf.shape, k
        assert rel_err(grad, want.grad) < ROUNDED_TO[leaf.dtype], (k, leaf.dtype)
        assert rel_err(grad, ref_grad) < ROUNDED_TO[leaf.dtype], (k, leaf.dtype)


def test_regularizer_channels_last_weights_are_not_copied(backend, monkeypatch):
    """channels_last conv weights (the CIFAR presets' layout) go to the op as dense views of their own
    storage, so no backend copies them; value and gradients equal the contiguous weights', and the
    gradients come back channels_last, as views of the one flat buffer."""
    weights, p_logits = mixed_layers(torch.Generator().manual_seed(21))
    last = [w.to(memory_format=torch.channels_last) if w.dim() == 4 else w.clone() for w in weights]
    received, original = [], _library.call
    monkeypatch.setattr(_library, "call", lambda name, ws, *rest: received.extend(ws) or original(name, ws, *rest))
    pf.ops.regularizer(last, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=1e3, backend=backend)
    assert [w.data_ptr() for w in received] == [w.data_ptr() for w in last]
    assert all(w.is_contiguous() for w in received)
    monkeypatch.undo()
    for t in (*weights, *last):
        t.requires_grad_()
    r = pf.ops.regularizer(last, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=1e3, backend=backend)
    r.backward()
    pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=1e3, backend=backend).backward()
    assert rel_err(r, literal_regularizer(weights, p_logits, 10.0, 1.0, 1e3)) < 1e-5
    for w, w_last in zip(weights, last):
        assert rel_err(w_last.grad, w.grad) < 1e-5
        if w.dim() == 4 and not w_last.is_contiguous():
            assert w_last.grad.is_contiguous(memory_format=torch.channels_last)
    assert len({w.grad.untyped_storage().data_ptr() for w in last}) == 1


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_regularizer_extreme_p_logits_are_finite(backend, gate_dtype):
    gen = torch.Generator().manual_seed(18)
    weight = torch.randn(6, 6, 3, 3, generator=gen, requires_grad=True)
    # p = 0 and p = 1 exactly (infinite logits) too: H' is 0 there, its limit, and so is its derivative
    p_logit = torch.tensor([-math.inf, -1000.0, -40.0, 40.0, 1000.0, math.inf], dtype=gate_dtype, requires_grad=True)
    r = pf.ops.regularizer([weight], [p_logit], weight_reg=10.0, drop_reg=1.0, n_train=100.0, backend=backend)
    r.backward()
    assert torch.isfinite(r) and torch.isfinite(weight.grad).all() and torch.isfinite(p_logit.grad).all()
    # p -> 0 keeps the whole weight term and H'(0) = 0; p -> 1 removes both terms
    sq = weight.detach().double().square().sum((0, 2, 3))
    expected = 10.0 / 100.0 * (sq[0] + sq[1] + sq[2] * (1 - math.exp(-40.0)) + sq[3] * math.exp(-40.0))
    assert r.item() == pytest.approx(expected.item(), rel=1e-5)
    kept = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).view(1, 6, 1, 1)
    expected_dw = 2 * 10.0 / 100.0 * weight.detach() * kept
    torch.testing.assert_close(weight.grad, expected_dw, rtol=1e-5, atol=1e-12)
    assert p_logit.grad.abs().max().item() < 1e-10  # sigmoid' vanishes at +-40 and beyond


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_regularizer_entropy_keeps_its_digits_near_p_1(backend, gate_dtype):
    """H'(p) = p log p + (1 - p) log(1 - p) for p near 1: 1 - p must be sigmoid(-z), not 1 - sigmoid(z),
    which cancels (z = 25: H' = -e^-z (1 + z + ...); a lost second term is 26x off)."""
    tol = 1e-5 if gate_dtype == torch.float32 else 1e-12
    weight = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(22))
    for z in (18.0, 25.0, 40.0):
        r = pf.ops.regularizer([weight], [torch.tensor([z], dtype=gate_dtype)], weight_reg=0.0, drop_reg=1.0,
                               n_train=1.0, backend=backend)
        p, keep = 1.0 / (1.0 + math.exp(-z)), 1.0 / (1.0 + math.exp(z))
        expected = p * -math.log1p(math.exp(-z)) + keep * (-z - math.log1p(math.exp(-z)))
        assert r.item() == pytest.approx(expected, rel=tol), z


# ---- opcheck ------------------------------------------------------------------------------------
def _opcheck_cases(backend):
    gen = torch.Generator().manual_seed(19)

    def r(*shape, grad=False, dtype=torch.float32):
        return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(grad)

    ys = lambda grad: [r(3, 4, 2, 2, grad=grad) for _ in range(2)]  # noqa: E731
    cases = [("philox_uniform", (257, SEED, STREAM, 5, torch.device("cpu"), backend)),
             ("candidate_keep", (r(7, grad=True), torch.tensor([0, 3, (1 << 40) - 1]), SEED, 5, 2, backend))]
    for mode in ("relaxed", "hard", "full"):
        cases += [
            ("gate_keep", (r(7, grad=True), 3, SEED, STREAM, 0.2, mode, 0, backend)),
            ("gate_keep", (r(7, grad=True), 3, SEED, STREAM, 0.2, mode, (1 << 40) + 7, backend)),
            ("gate_keep_backward", (r(3, 7), torch.rand(3, 7, generator=gen), 0.2, mode, backend)),
            ("gated_apply", (r(3, 7, 5, 5, grad=True), r(7, grad=True), SEED, STREAM, 0.2, mode, 0, backend)),
            ("gated_apply", (r(3, 7, 5, 5).to(memory_format=torch.channels_last).requires_grad_(),
                             r(7, grad=True), SEED, STREAM, 0.5, mode, 42, backend)),
            ("gated_apply", (r(3, 7, dtype=torch.bfloat16).requires_grad_(), r(7, grad=True), SEED, STREAM, 0.2, mode,
                             0, backend)),
            ("gated_apply_backward", (r(3, 7, 5, 5), r(3, 7, 5, 5), r(7), SEED, STREAM, 0.2, mode, 21, backend)),
            ("affine_relu_gate", (r(3, 7, 5, 5, grad=True), r(7, grad=True), r(7, grad=True), r(7, grad=True), SEED,
                                  STREAM, 0.2, mode, 21, backend)),
            ("affine_relu_gate", (r(3, 7, 5, 5).to(memory_format=torch.channels_last).requires_grad_(),
                                  r(7, grad=True), r(7, grad=True), r(7, grad=True), SEED, STREAM, 0.5, mode, 0, backend)),
            ("affine_relu_gate_backward", (r(3, 7, 5, 5), r(3, 7, 5, 5), r(7), r(7), r(7), SEED, STREAM, 0.2, mode, 7,
                                           backend)),
            ("gated_copies", (r(3, 7, 5, 5, grad=True), r(2, 7, grad=True), SEED, [STREAM, 9], 0.2, mode, 14, True,
                              backend)),
            ("gated_copies", (r(3, 7, 5, 5).to(memory_format=torch.channels_last).requires_grad_(),
                              r(3, 7, grad=True), SEED, [1, 2, 3], 0.5, mode, 0, False, backend)),
            ("gated_copies_backward", (r(2, 3, 7, 5, 5), r(3, 7, 5, 5), r(2, 7), SEED, [STREAM, 9], 0.2, mode, 7,
                                       True, backend)),
        ]
    for wshape in ((3, 2), (2,)):
        for bw_grad in (None, False):
            bw = None if bw_grad is None else torch.rand(wshape, generator=gen)
            cases += [
                ("branch_combine", (ys(True), torch.rand(wshape, generator=gen).requires_grad_(), None, bw, backend)),
                ("branch_combine", (ys(True), torch.rand(wshape, generator=gen).requires_grad_(),
                                    r(3, 4, 2, 2, grad=True), bw, backend)),
                ("branch_combine_backward", (r(3, 4, 2, 2), ys(False), torch.rand(wshape, generator=gen), bw, backend)),
            ]
    weights, p_logits = mixed_layers(gen)
    cases += [
        ("regularizer", ([w.clone().requires_grad_() for w in weights], [p.clone().requires_grad_() for p in p_logits],
                         10.0, 1.0, 1e3, backend)),
        ("regularizer_backward", (torch.tensor(0.7), weights, p_logits, 10.0, 1.0, 1e3, backend)),
    ]
    return cases


def _custom_ops():
    """Every torch.library custom op declared in pgnas_fast.ops._library, by its short name."""
    ops = {op._name: op for op in vars(_library).values() if isinstance(op, CustomOpDef)}
    assert all(op._namespace == _library.NAMESPACE for op in ops.values())
    return ops


def test_opcheck_covers_every_custom_op():
    from test_gaussian_ops import opcheck_cases as gaussian_opcheck_cases  # the Gaussian family's own file

    covered = {name for name, _ in _opcheck_cases("reference") + gaussian_opcheck_cases("reference")}
    assert covered == set(_custom_ops())


def test_opcheck_every_custom_op(backend):
    ops = _custom_ops()
    for name, args in _opcheck_cases(backend):
        result = torch.library.opcheck(ops[name], args)
        assert all(v == "SUCCESS" for v in result.values()), (name, result)


def _outputs_and_grads(run, args, seed: int):
    """run(*args)'s outputs, and the gradients of a random projection of them for every input tensor
    (top level or in a list) that requires one."""
    def tensors(values):
        return [t for v in values for t in (tensors(v) if isinstance(v, (tuple, list)) else [v])
                if isinstance(t, torch.Tensor)]

    outs = tensors([run(*args)])
    leaves = [t for t in tensors(args) if t.requires_grad]
    if not leaves:
        return outs, []
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    loss = sum((o.double() * n).sum() for o, n in zip(outs, noise))
    return outs, torch.autograd.grad(loss, leaves, allow_unused=True)


def _every_op_case(backend, device):
    """(name, args) of every op in the op set, the Gaussian family's too, with the tensors on `device`."""
    from test_gaussian_ops import opcheck_cases as gaussian_opcheck_cases

    def to(arg):
        if isinstance(arg, torch.Tensor):
            return arg.detach().to(device).requires_grad_(arg.requires_grad)
        if isinstance(arg, torch.device):
            return torch.device(device)
        return [to(a) for a in arg] if isinstance(arg, list) else arg

    return [(name, tuple(to(a) for a in args)) for name, args in
            _opcheck_cases(backend) + gaussian_opcheck_cases(backend)]


def _assert_eager_calls_equal_the_custom_ops(backend, device="cpu"):
    ops = _custom_ops()
    for k, (name, args) in enumerate(_every_op_case(backend, device)):
        eager, eager_grads = _outputs_and_grads(lambda *a, name=name: _library.call(name, *a), args, k)
        custom, custom_grads = _outputs_and_grads(ops[name], args, k)
        assert (len(eager), len(eager_grads)) == (len(custom), len(custom_grads)), name
        for got, want in zip([*eager, *eager_grads], [*custom, *custom_grads]):
            assert (got is None) == (want is None), name
            if got is not None:
                assert got.dtype == want.dtype and got.stride() == want.stride(), name
                assert torch.equal(got, want), name


def test_eager_calls_equal_the_custom_ops_bit_for_bit(backend):
    """`_library.call` runs an op's body without the dispatcher in eager mode (through its own
    autograd.Function); values and gradients must be the custom op's exactly, for every op, lists of
    tensors included (branch_combine's ys, the regulariser's weights)."""
    _assert_eager_calls_equal_the_custom_ops(backend)


def test_a_second_derivative_through_an_op_raises_instead_of_being_zero(backend):
    """The backward ops are kernels without a derivative of their own. With create_graph=True every op's
    first derivatives are the usual ones, and differentiating them again, with respect to any input,
    raises (torch's once_differentiable let such a second derivative come out as zero whenever the
    incoming gradient was a constant)."""
    checked = set()
    for k, (name, args) in enumerate(_every_op_case(backend, "cpu")):
        leaves = [t for a in args for t in (a if isinstance(a, list) else [a])
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        if name.endswith("_backward") or not leaves:
            continue
        _, plain = _outputs_and_grads(lambda *a, name=name: _library.call(name, *a), args, k)
        with torch.enable_grad():
            outs = _library.call(name, *args)
            outs = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs]) if isinstance(o, torch.Tensor)]
            gen = torch.Generator().manual_seed(k)
            loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
            first = torch.autograd.grad(loss, leaves, allow_unused=True, create_graph=True)
        assert [g is None for g in first] == [g is None for g in plain], name
        for got, want in zip(first, plain):
            assert got is None or torch.equal(got.detach(), want), name
        # the exact second derivatives that are zero: gates that are constant in p (hard, full), and those
        # of an input added to the output as it is (branch_combine's skip, gaussian_noise's mu: their
        # gradient is the incoming one); everywhere else it must raise
        constant = name == "candidate_keep" or "hard" in args or "full" in args
        skip = {"branch_combine": args[2], "gaussian_noise": args[0]}.get(name)
        for g, wrt in zip(first, leaves):
            for leaf in leaves if g is not None else []:
                try:
                    second = torch.autograd.grad(g.double().sum(), leaf, retain_graph=True, allow_unused=True)[0]
                except RuntimeError as err:
                    assert f"{name} has no second derivative" in str(err), (name, err)
                    continue
                assert constant or skip is not None and (wrt is skip or leaf is skip), name
                assert second is None or not second.any(), name
        checked.add(name)
    assert checked == {n for n in _library._autograd}, checked


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_eager_calls_equal_the_custom_ops_on_the_gpu(backend):
    if not pf.backends()[backend][0]:
        pytest.skip(pf.backends()[backend][1])
    _assert_eager_calls_equal_the_custom_ops(backend, "cuda")


def _assert_every_op_matches_the_reference(backend, device):
    """Every op (forward and backward ops, both layouts, bfloat16, offsets past 2^32) on `device`:
    the backend's outputs and gradients against the reference backend's on the same inputs."""
    ops = _custom_ops()
    cases = zip(_every_op_case(backend, device), _every_op_case("reference", device))
    for k, ((name, args), (_, reference_args)) in enumerate(cases):
        got, got_grads = _outputs_and_grads(ops[name], args, k)
        want, want_grads = _outputs_and_grads(ops[name], reference_args, k)
        assert len(got) == len(want) and len(got_grads) == len(want_grads), name
        for ours, ref in zip([*got, *got_grads], [*want, *want_grads]):
            assert (ours is None) == (ref is None), name
            if ours is not None:
                assert ours.shape == ref.shape and ours.dtype == ref.dtype and ours.device.type == device, name
                tolerance = TOLERANCE[ours.dtype] if ours.dtype in (torch.float16, torch.bfloat16) else 1e-5
                assert rel_err(ours, ref) < tolerance, (k, name, rel_err(ours, ref))


def test_every_op_matches_the_reference_backend(backend):
    _assert_every_op_matches_the_reference(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_backends_match_the_reference_on_every_op(backend):
    if not pf.backends()[backend][0]:
        pytest.skip(pf.backends()[backend][1])
    _assert_every_op_matches_the_reference(backend, "cuda")


def test_eager_calls_do_not_enter_the_dispatcher(backend, monkeypatch):
    """pf.ops in eager mode, forward and backward, never calls a custom op (each costs tens of us of
    host time, more than a small op's GPU kernel)."""
    def refuse(*args):
        raise AssertionError("a custom op was called in eager mode")

    monkeypatch.setattr(_library, "_custom", {name: refuse for name in _library._custom})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 3, 3, generator=gen, requires_grad=True)
    p_logits = torch.randn(2, 6, generator=gen, requires_grad=True)
    copies = pf.ops.gated_copies(x, p_logits, seed=SEED, streams=[1, 2], backend=backend)
    y = pf.ops.branch_combine([pf.ops.gated_apply(c, p, seed=SEED, stream=3, backend=backend)
                               for c, p in zip(copies, p_logits)], torch.rand(4, 2, generator=gen), skip=x,
                              backend=backend)
    r = pf.ops.regularizer([torch.randn(5, 6, generator=gen, requires_grad=True)], [p_logits[0]], weight_reg=1.0,
                           drop_reg=1.0, n_train=10.0, backend=backend)
    (y.sum() + r).backward()
    assert x.grad is not None and p_logits.grad is not None and bool(p_logits.grad.abs().sum() > 0)


def test_a_dispatch_mode_sees_each_op_as_one_custom_op(backend):
    """Inside a TorchDispatchMode (fake tensors, FLOP counters) the custom op runs, as under torch.compile."""
    x = torch.randn(3, 5, 2, 2, requires_grad=True)
    p_logit = torch.randn(5, requires_grad=True)
    with DispatchLog() as log:
        pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend=backend).sum().backward()
    assert "pgnas_fast.gated_apply.default" in log.names
    assert "pgnas_fast.gated_apply_backward.default" in log.names


def test_vmap_runs_the_custom_op(backend):
    """Under torch.func transforms the custom op runs too (vmap loops over it in its batched fallback)."""
    xs = torch.randn(4, 3, 5, 2, 2)
    p_logit = torch.randn(5)
    got = torch.vmap(lambda x: pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend=backend))(xs)
    for k in range(xs.shape[0]):
        assert torch.equal(got[k], pf.ops.gated_apply(xs[k], p_logit, seed=SEED, stream=STREAM, backend=backend))


# ---- bad input ----------------------------------------------------------------------------------
X = torch.randn(3, 7, 5, 5)
P = torch.randn(7)
YS = [torch.randn(3, 4), torch.randn(3, 4)]
W = torch.rand(3, 2)
CONV = torch.randn(8, 3, 3, 3)

BAD_CALLS = [
    # philox_uniform
    ("n negative", lambda: pf.ops.philox_uniform(-1, seed=0, stream=0), ValueError, r"\bn must"),
    ("n float", lambda: pf.ops.philox_uniform(4.0, seed=0, stream=0), TypeError, r"\bn must be an int"),
    ("seed negative", lambda: pf.ops.philox_uniform(4, seed=-1, stream=0), ValueError, "seed"),
    ("seed 2^63", lambda: pf.ops.philox_uniform(4, seed=1 << 63, stream=0), ValueError, "seed"),
    ("seed bool", lambda: pf.ops.philox_uniform(4, seed=True, stream=0), TypeError, "seed"),
    ("seed float", lambda: pf.ops.philox_uniform(4, seed=1.0, stream=0), TypeError, "seed"),
    ("stream negative", lambda: pf.ops.philox_uniform(4, seed=0, stream=-5), ValueError, "stream"),
    ("stream 2^63", lambda: pf.ops.philox_uniform(4, seed=0, stream=1 << 63), ValueError, "stream"),
    ("offset negative", lambda: pf.ops.philox_uniform(4, seed=0, stream=0, offset=-1), ValueError, "offset"),
    ("device not a device", lambda: pf.ops.philox_uniform(4, seed=0, stream=0, device="gpu"), ValueError,
     "device must name a torch device"),
    ("stream id of an unknown domain", lambda: pf.ops.stream_id(99, 1), ValueError, "domain must be one of TRAIN"),
    ("stream id of a float step", lambda: pf.ops.stream_id(Domain.TRAIN, 1.5), TypeError,
     "stream major must be an int, got float"),
    ("offset + n past 2^63", lambda: pf.ops.philox_uniform(4, seed=0, stream=0, offset=(1 << 63) - 3), ValueError,
     r"offset \+ n"),
    # gate_keep
    ("p_logit float16", lambda: pf.ops.gate_keep(P.half(), 3, seed=0, stream=0), TypeError, "p_logit"),
    ("p_logit int", lambda: pf.ops.gate_keep(torch.zeros(7, dtype=torch.int64), 3, seed=0, stream=0), TypeError,
     "p_logit"),
    ("p_logit 2-D", lambda: pf.ops.gate_keep(P.view(1, 7), 3, seed=0, stream=0), ValueError, "p_logit must be 1-D"),
    ("p_logit list", lambda: pf.ops.gate_keep([0.0, 1.0], 3, seed=0, stream=0), TypeError, "p_logit"),
    ("batch 0", lambda: pf.ops.gate_keep(P, 0, seed=0, stream=0), ValueError, "batch"),
    ("batch bool", lambda: pf.ops.gate_keep(P, True, seed=0, stream=0), TypeError, "batch"),
    ("tau 0", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau=0.0), ValueError, "tau"),
    ("tau negative", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau=-0.2), ValueError, "tau"),
    ("tau nan", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau=float("nan")), ValueError, "tau"),
    ("tau inf", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau=float("inf")), ValueError, "tau"),
    # the kernels take tau as float32 (triton gave NaN gates for 1e39)
    ("tau above float32's largest", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau=1e39), ValueError,
     r"tau must be a finite number > 0 and <= 3.40282e\+38"),
    ("tau an int beyond float64", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau=10 ** 400), ValueError, "tau"),
    ("tau a string", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, tau="0.2"), TypeError,
     "tau must be a real number, got str"),
    ("mode unknown", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, mode="soft"), ValueError, "mode"),
    ("gate seed negative", lambda: pf.ops.gate_keep(P, 3, seed=-1, stream=0), ValueError, "seed"),
    ("gate seed bool", lambda: pf.ops.gate_keep(P, 3, seed=False, stream=0), TypeError, "seed"),
    ("gate stream 2^63", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=1 << 63), ValueError, "stream"),
    ("gate offset negative", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, offset=-1), ValueError, "offset"),
    ("gate offset bool", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, offset=True), TypeError, "offset"),
    ("gate offset float", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, offset=7.0), TypeError, "offset"),
    ("gate offset 2^63", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, offset=1 << 63), ValueError, "offset"),
    ("gate offset + B*C past 2^63", lambda: pf.ops.gate_keep(P, 3, seed=0, stream=0, offset=(1 << 63) - 20),
     ValueError, r"offset \+ batch \* C"),
    # gated_apply
    ("x int", lambda: pf.ops.gated_apply(X.long(), P, seed=0, stream=0), TypeError, r"\bx must have dtype"),
    ("x 1-D", lambda: pf.ops.gated_apply(torch.randn(7), P, seed=0, stream=0), ValueError, r"\bx must have at least"),
    ("x not a tensor", lambda: pf.ops.gated_apply(X.numpy(), P, seed=0, stream=0), TypeError, r"\bx must be"),
    ("p_logit wrong length", lambda: pf.ops.gated_apply(X, torch.randn(6), seed=0, stream=0), ValueError,
     r"p_logit must have shape \[7\]"),
    ("apply p_logit float16", lambda: pf.ops.gated_apply(X, P.half(), seed=0, stream=0), TypeError, "p_logit"),
    ("apply tau 0", lambda: pf.ops.gated_apply(X, P, seed=0, stream=0, tau=0), ValueError, "tau"),
    ("apply mode", lambda: pf.ops.gated_apply(X, P, seed=0, stream=0, mode="Hard"), ValueError, "mode"),
    ("apply seed 2^63", lambda: pf.ops.gated_apply(X, P, seed=1 << 63, stream=0), ValueError, "seed"),
    ("apply seed bool", lambda: pf.ops.gated_apply(X, P, seed=True, stream=0), TypeError, "seed"),
    ("apply offset negative", lambda: pf.ops.gated_apply(X, P, seed=0, stream=0, offset=-7), ValueError, "offset"),
    ("apply offset float", lambda: pf.ops.gated_apply(X, P, seed=0, stream=0, offset=21.0), TypeError, "offset"),
    ("apply offset + B*C past 2^63", lambda: pf.ops.gated_apply(X, P, seed=0, stream=0, offset=(1 << 63) - 20),
     ValueError, r"offset \+ batch \* C"),
    # branch_combine
    ("ys a tensor", lambda: pf.ops.branch_combine(torch.stack(YS), W), TypeError, "ys"),
    ("ys empty", lambda: pf.ops.branch_combine([], W), TypeError, "ys"),
    ("ys int", lambda: pf.ops.branch_combine([y.long() for y in YS], W), TypeError, r"ys\[0\]"),
    ("ys shape mismatch", lambda: pf.ops.branch_combine([YS[0], torch.randn(3, 5)], W), ValueError, r"ys\[1\]"),
    ("ys dtype mismatch", lambda: pf.ops.branch_combine([YS[0], YS[1].double()], W), ValueError, r"ys\[1\]"),
    ("weights shape", lambda: pf.ops.branch_combine(YS, torch.rand(3, 3)), ValueError, "weights must have shape"),
    ("weights wrong branch count", lambda: pf.ops.branch_combine(YS, torch.rand(3)), ValueError, "weights"),
    ("weights float16", lambda: pf.ops.branch_combine(YS, W.half()), TypeError, "weights"),
    ("backward_weights shape", lambda: pf.ops.branch_combine(YS, W, backward_weights=torch.rand(2)), ValueError,
     "backward_weights"),
    ("backward_weights int", lambda: pf.ops.branch_combine(YS, W, backward_weights=W.long()), TypeError,
     "backward_weights"),
    ("skip shape", lambda: pf.ops.branch_combine(YS, W, skip=torch.randn(3, 5)), ValueError, "skip"),
    ("skip int", lambda: pf.ops.branch_combine(YS, W, skip=YS[0].long()), TypeError, "skip"),
    # (the native backends added a float32 skip to float16 branches in float16)
    ("skip dtype not the branches'", lambda: pf.ops.branch_combine([y.half() for y in YS], W, skip=YS[0]), ValueError,
     r"skip must have the shape and dtype of ys\[0\] \(\(3, 4\), torch.float16\), got \(3, 4\), torch.float32"),
    # regularizer
    ("reg empty", lambda: pf.ops.regularizer([], [], weight_reg=1.0, drop_reg=1.0, n_train=10), ValueError,
     "weights and p_logits"),
    ("reg unequal lengths", lambda: pf.ops.regularizer([CONV, CONV], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0,
                                                       n_train=10), ValueError, "weights and p_logits"),
    ("reg tensor not list", lambda: pf.ops.regularizer(CONV, torch.randn(3), weight_reg=1.0, drop_reg=1.0, n_train=10),
     TypeError, "lists"),
    ("reg weight_reg negative", lambda: pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=-1.0, drop_reg=1.0,
                                                           n_train=10), ValueError, "weight_reg"),
    ("reg weight_reg nan", lambda: pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=float("nan"), drop_reg=1.0,
                                                      n_train=10), ValueError, "weight_reg"),
    ("reg drop_reg negative", lambda: pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=1.0, drop_reg=-2.0,
                                                         n_train=10), ValueError, "drop_reg"),
    ("reg n_train 0", lambda: pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0, n_train=0),
     ValueError, "n_train"),
    ("reg n_train inf", lambda: pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0,
                                                   n_train=float("inf")), ValueError, "n_train"),
    ("reg scale above float32's largest", lambda: pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=3e38,
                                                                      drop_reg=1.0, n_train=0.5), ValueError,
     r"weight_reg / n_train must be <="),
    ("reg p_logits empty", lambda: pf.ops.regularizer([torch.randn(3, 2)], [torch.empty(0)], weight_reg=1.0,
                                                      drop_reg=1.0, n_train=10), ValueError,
     r"p_logits\[0\] must have at least one channel"),
    ("reg p_logits not fitting", lambda: pf.ops.regularizer([CONV], [torch.randn(4)], weight_reg=1.0, drop_reg=1.0,
                                                            n_train=10), ValueError, r"p_logits\[0\]"),
    ("reg groups not dividing outputs", lambda: pf.ops.regularizer([CONV, torch.randn(9, 2, 1, 1)],
                                                                   [torch.randn(3), torch.randn(8)], weight_reg=1.0,
                                                                   drop_reg=1.0, n_train=10), ValueError,
     r"p_logits\[1\]"),
    ("reg p_logits float16", lambda: pf.ops.regularizer([CONV], [torch.randn(3).half()], weight_reg=1.0, drop_reg=1.0,
                                                        n_train=10), TypeError, r"p_logits\[0\]"),
    ("reg p_logits 2-D", lambda: pf.ops.regularizer([CONV], [torch.randn(1, 3)], weight_reg=1.0, drop_reg=1.0,
                                                    n_train=10), ValueError, r"p_logits\[0\]"),
    ("reg weight 1-D", lambda: pf.ops.regularizer([torch.randn(3)], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0,
                                                  n_train=10), ValueError, r"weights\[0\]"),
    ("reg weight int", lambda: pf.ops.regularizer([CONV.long()], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0,
                                                  n_train=10), TypeError, r"weights\[0\]"),
    ("reg weight no outputs", lambda: pf.ops.regularizer([torch.randn(0, 3, 3, 3)], [torch.randn(3)], weight_reg=1.0,
                                                         drop_reg=1.0, n_train=10), ValueError,
     r"weights\[0\] must have no empty dims, got shape \(0, 3, 3, 3\)"),
    ("reg weight no inputs", lambda: pf.ops.regularizer([torch.randn(4, 0, 3, 3)], [torch.randn(3)], weight_reg=1.0,
                                                        drop_reg=1.0, n_train=10), ValueError,
     r"weights\[0\] must have no empty dims, got shape \(4, 0, 3, 3\)"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_philox_uniform_on_cuda_without_cuda_says_why():
    with pytest.raises(pf.BackendUnavailableError, match="no backend runs on cuda: this torch .* sees no CUDA device"):
        pf.ops.philox_uniform(4, seed=0, stream=0, device="cuda")


def test_real_arguments_take_numpy_scalars():
    """tau and the regulariser's scales as numpy scalars (as a config or a sweep may hand them over)."""
    want = pf.ops.gate_keep(P, 3, seed=1, stream=2, tau=float(np.float32(0.3)))
    assert torch.equal(pf.ops.gate_keep(P, 3, seed=1, stream=2, tau=np.float32(0.3)), want)
    reg = pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=np.float32(2.0), drop_reg=np.float64(1.0),
                             n_train=np.int64(10))
    assert torch.isfinite(reg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA device")
def test_device_mismatch_is_rejected():
    with pytest.raises(ValueError, match="p_logit"):
        pf.ops.gated_apply(X.cuda(), P, seed=0, stream=0)
    with pytest.raises(ValueError, match="weights"):
        pf.ops.branch_combine([y.cuda() for y in YS], W)
    with pytest.raises(ValueError, match=r"p_logits\[0\]"):
        pf.ops.regularizer([CONV.cuda()], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0, n_train=10)


# ---- backend selection --------------------------------------------------------------------------
UNAVAILABLE = [name for name, (ok, _) in pf.backends().items() if not ok]


def test_backends_lists_every_backend_with_a_reason():
    listed = pf.backends()
    assert set(listed) == {"reference", "triton", "cuda", "cpu"}
    for name, entry in listed.items():
        assert isinstance(entry, tuple) and len(entry) == 2
        available, reason = entry
        assert isinstance(available, bool) and isinstance(reason, str) and reason, name
    assert listed["reference"][0] is True
    assert pf.backends is pf.ops.backends


@pytest.mark.skipif(not UNAVAILABLE, reason="every backend is available here")
@pytest.mark.parametrize("name", UNAVAILABLE or ["none"])
def test_unavailable_backend_raises_saying_why(name):
    reason = pf.backends()[name][1]
    with pytest.raises(pf.BackendUnavailableError, match=re.escape(reason)) as info:
        pf.ops.philox_uniform(4, seed=0, stream=0, backend=name)
    assert name in str(info.value)
    with pytest.raises(pf.BackendUnavailableError, match=re.escape(reason)):
        pf.ops.gated_apply(X, P, seed=0, stream=0, backend=name)
    with pf.use_backend(name):  # selectable by name; fails at the first op, saying why
        with pytest.raises(pf.BackendUnavailableError, match=re.escape(reason)):
            pf.ops.gate_keep(P, 2, seed=0, stream=0)
        assert pf.ops.gate_keep(P, 2, seed=0, stream=0, backend="reference").shape == (2, 7)  # per call wins


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(pf.BackendUnavailableError, RuntimeError)
    assert pf.BackendUnavailableError is pf.ops.BackendUnavailableError


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        pf.ops.philox_uniform(4, seed=0, stream=0, backend="tpu")
    with pytest.raises(ValueError, match="backend"):
        pf.ops.regularizer([CONV], [torch.randn(3)], weight_reg=1.0, drop_reg=1.0, n_train=10, backend="Reference")
    with pytest.raises(ValueError, match="backend"):
        pf.set_backend("tpu")
    with pytest.raises(ValueError, match="backend"):
        with pf.use_backend("tpu"):
            pass
    assert pf.ops.selected() == "auto"


def test_default_selection_is_auto_and_runs_on_cpu():
    assert pf.ops.selected() == "auto"
    expected = "cpu" if pf.backends()["cpu"][0] else "reference"
    assert dispatch.resolve(None, torch.device("cpu")) == expected
    u = pf.ops.philox_uniform(16, seed=1, stream=2)
    assert torch.equal(u, pf.ops.philox_uniform(16, seed=1, stream=2, backend="reference"))


def test_set_backend_and_use_backend_change_selected():
    pf.set_backend("reference")
    assert pf.ops.selected() == "reference"
    with pf.use_backend("cuda"):
        assert pf.ops.selected() == "cuda"
        with pf.use_backend("auto"):
            assert pf.ops.selected() == "auto"
        assert pf.ops.selected() == "cuda"
    assert pf.ops.selected() == "reference"
    with pytest.raises(KeyError):
        with pf.use_backend("triton"):
            raise KeyError("inside")
    assert pf.ops.selected() == "reference"  # restored after an exception
    pf.set_backend(None)
    assert pf.ops.selected() == "auto"


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("PGNAS_FAST_BACKEND", "reference")
    assert pf.ops.selected() == "reference"
    monkeypatch.setenv("PGNAS_FAST_BACKEND", "cpu")
    assert pf.ops.selected() == "cpu"
    pf.set_backend("reference")  # set_backend beats the environment
    assert pf.ops.selected() == "reference"
    with pf.use_backend("triton"):  # and use_backend beats set_backend
        assert pf.ops.selected() == "triton"
    pf.set_backend(None)
    assert pf.ops.selected() == "cpu"
    monkeypatch.setenv("PGNAS_FAST_BACKEND", "")
    assert pf.ops.selected() == "auto"


def test_invalid_environment_variable_names_it(monkeypatch):
    monkeypatch.setenv("PGNAS_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PGNAS_FAST_BACKEND"):
        pf.ops.selected()
    with pytest.raises(ValueError, match="PGNAS_FAST_BACKEND"):
        pf.ops.gate_keep(P, 2, seed=0, stream=0)
    # a per-call backend and an explicit selection never read the variable
    assert pf.ops.gate_keep(P, 2, seed=0, stream=0, backend="reference").shape == (2, 7)
    with pf.use_backend("reference"):
        assert pf.ops.gate_keep(P, 2, seed=0, stream=0).shape == (2, 7)


@pytest.mark.skipif(not UNAVAILABLE, reason="every backend is available here")
def test_per_call_backend_wins_over_every_other_selection(monkeypatch):
    name = UNAVAILABLE[0]
    monkeypatch.setenv("PGNAS_FAST_BACKEND", name)
    pf.set_backend(name)
    with pf.use_backend(name):
        with pytest.raises(pf.BackendUnavailableError):
            pf.ops.philox_uniform(4, seed=0, stream=0)
        out = pf.ops.gated_apply(X, P, seed=1, stream=2, backend="reference")
    assert rel_err(out, X.double() * broadcast_keep(expected_keep(P, 3, seed=1, stream=2), X)) < 1e-5


# ---- the op layer's own argument checks at their boundaries ----------------------------------------
LAST = 1 << 63  # the end of a stream


def test_ops_take_the_last_elements_of_a_stream():
    """offset + n may reach 2^63 exactly (the stream's last element is 2^63 - 1). Mutants: > for >= in
    each op's end-of-stream check."""
    u = pf.ops.philox_uniform(4, seed=1, stream=2, offset=LAST - 4)
    assert torch.equal(u[1:], pf.ops.philox_uniform(3, seed=1, stream=2, offset=LAST - 3))
    p = torch.randn(7)
    keep = pf.ops.gate_keep(p, 3, seed=1, stream=2, offset=LAST - 21, mode="hard")
    assert torch.equal(keep[1:], pf.ops.gate_keep(p, 2, seed=1, stream=2, offset=LAST - 14, mode="hard"))
    x = torch.randn(3, 7, 2, 2)
    assert torch.equal(pf.ops.gated_apply(x, p, seed=1, stream=2, offset=LAST - 21, mode="hard"),
                       x * keep[:, :, None, None])
    mu, var = torch.randn(2, 5), torch.rand(2, 5)
    noise = pf.ops.gaussian_noise(mu, var, seed=1, stream=2, offset=LAST - 10)
    assert torch.equal(noise[1], pf.ops.gaussian_noise(mu[1:], var[1:], seed=1, stream=2, offset=LAST - 5)[0])
    with pytest.raises(ValueError, match=r"offset \+ n must be <= 2\^63"):
        pf.ops.philox_uniform(4, seed=1, stream=2, offset=LAST - 3)


def test_ops_boundary_arguments():
    """Mutants: 16 copies refused; candidate id 2^40 let through; an affine_relu_gate shift of the wrong
    length let through."""
    x, p = torch.randn(3, 7, 2, 2), torch.randn(16, 7)
    copies = pf.ops.gated_copies(x, p, seed=0, streams=list(range(16)), mode="hard")
    assert copies.shape == (16, 3, 7, 2, 2)
    assert torch.equal(copies[15], pf.ops.gated_apply(x, p[15], seed=0, stream=15, mode="hard"))
    logits = torch.randn(4)
    last = pf.ops.candidate_keep(logits, torch.tensor([(1 << 40) - 1]), seed=0, layer=0)
    assert last.shape == (1, 4)
    with pytest.raises(ValueError, match=r"candidates must be ids in \[0, 2\^40\)"):
        pf.ops.candidate_keep(logits, torch.tensor([1 << 40]), seed=0, layer=0)
    v = torch.randn(7)
    with pytest.raises(ValueError, match=r"shift must have shape \[7\] \(x.shape\[1\]\), got \(6,\)"):
        pf.ops.affine_relu_gate(x, v, torch.randn(6), v, seed=0, stream=0)


@pytest.mark.parametrize("call, match", [
    (lambda b: pf.ops.candidate_keep(torch.randn(4), torch.tensor([1 << 40]), seed=0, layer=0, backend=b),
     r"candidates must be ids in \[0, 2\^40\)"),
    (lambda b: pf.ops.candidate_keep(torch.randn(4), torch.tensor([-1]), seed=0, layer=0, backend=b),
     r"candidates must be ids in \[0, 2\^40\)"),
    (lambda b: pf.ops.gate_keep(torch.randn(7), 0, seed=0, stream=0, backend=b), "batch must be in >= 1, got 0"),
    (lambda b: pf.ops.regularizer([torch.randn(8, 3, 3, 3)], [torch.randn(4)], weight_reg=1.0, drop_reg=1.0, n_train=10,
                               backend=b), r"p_logits\[0\] has 4 channels, which does not fit weights\[0\]"),
    (lambda b: pf.ops.gated_copies(torch.randn(2, 3), torch.zeros(2, 3), seed=0, streams=[1, 2], tau=0.0, backend=b),
     "tau must be a finite number > 0"),
    (lambda b: pf.ops.gated_copies(torch.randn(2, 3), torch.zeros(2, 3), seed=0, streams=[1, 2], mode="soft",
                                   backend=b), "mode must be one of relaxed, hard, full; got 'soft'"),
    (lambda b: pf.ops.gated_copies(torch.randn(2, 3), torch.zeros(2, 3), seed=-1, streams=[1, 2], backend=b),
     r"seed must be in \[0, 9223372036854775808\), got -1"),
    (lambda b: pf.ops.gated_copies(torch.randn(2, 3), torch.zeros(2, 3), seed=0, streams=[1, 2], offset=(1 << 63) - 3,
                                   backend=b), r"offset \+ batch \* C must be <= 2\^63, got 9223372036854775811"),
    (lambda b: pf.ops.affine_relu_gate(torch.randn(2, 3), torch.ones(3), torch.zeros(3), torch.zeros(3), seed=0,
                                       stream=1, offset=(1 << 63) - 3, backend=b),
     r"offset \+ batch \* C must be <= 2\^63, got 9223372036854775811"),
    (lambda b: pf.ops.candidate_keep(torch.randn(4), torch.tensor([1]), seed=0, layer=1 << 16, backend=b),
     r"layer must be in \[0, 65536\), got 65536"),
    (lambda b: pf.ops.regularizer([torch.randn(4, 3)], [torch.zeros(3)], weight_reg=1.0, drop_reg=3e38, n_train=0.1,
                                  backend=b), r"drop_reg / n_train must be <= 3.40282e\+38"),
], ids=["id 2^40", "id -1", "batch 0", "C_in not groups x per-group", "copies tau 0", "copies mode", "copies seed -1",
        "copies offset", "affine offset", "layer 2^16", "drop_reg / n_train"])
def test_ops_refuse_before_any_backend_runs(call, match):
    """The op layer's own checks, not the native binding's (which repeats some): on the reference backend
    nothing else refuses. Mutants: candidate ids up to 2^40 or from -1, batch 0, C_in not a multiple of
    the weight's per-group channels let through."""
    with pytest.raises(ValueError, match=match):
        call("reference")
