"""The drop-in layers `Conv2d_with_CD` / `Linear_with_CD` (pgnas-method.md section 2, "Drop-in compatibility").

The oracles below are written from the description of the authors' `NAS_utils/ops.py` (never imported):
signatures, state-dict layout, split expansion, the deterministic floor(u + p) mask, the relaxed gate
1 - sigmoid((logit p + L) / 0.2) per (example, channel) shared over H and W, and KLreg, including the
authors' broadcasting formula of `Linear_with_CD.KLreg`.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import integrate, special, stats

import pgnas_fast.compat as compat
from pgnas_fast import ops
from pgnas_fast.compat import TRAINING_SIZE, Conv2d_with_CD, Linear_with_CD
from pgnas_fast.nn import GatedConv2d, GatedLinear
from pgnas_fast.ops.streams import Domain, stream_id

pytestmark = pytest.mark.filterwarnings("ignore:Conv2d_with_CD\\(deterministic=True\\):UserWarning")

TAU = 0.2
COMPAT_STREAM = stream_id(Domain.COMPAT, 0)


# ---- oracles (from the description of the authors' code) -----------------------------------------
def expand_split(p_logit: torch.Tensor, in_channels: int, split: int, split_pattern) -> torch.Tensor:
    """Authors' expansion: group 0 -> split_pattern[0] channels, every later group -> split_pattern[1]."""
    if split_pattern:
        parts = [p_logit[0].expand(split_pattern[0])]
        if split > 1:
            parts.append(p_logit[1:].view(-1, 1).expand(split - 1, split_pattern[1]).reshape(-1))
        return torch.cat(parts)
    return p_logit[0].expand(in_channels)


def neg_entropy(p: torch.Tensor) -> torch.Tensor:
    return p * torch.log(p) + (1.0 - p) * torch.log(1.0 - p)


def conv_klreg_oracle(weight, z_channel, weight_reg, drop_reg, groups=1):
    """weight_reg/N * sum_{o,c,i,j} (1 - p_c) W[o,c,i,j]^2 + drop_reg/N * sum_{every input channel} H'(p_c).

    z_channel: drop logits per input channel. Grouped convs: output o of group g reads input channels
    g * C_in/G + j, j < C_in/G.
    """
    w = weight.double()
    p = z_channel.double().sigmoid()
    out_channels, per_group = w.shape[0], w.shape[1]
    in_channels = p.shape[0]
    assert in_channels == groups * per_group
    out_per_group = out_channels // groups
    total = torch.zeros((), dtype=torch.float64)
    for g in range(groups):
        w_g = w[g * out_per_group:(g + 1) * out_per_group]  # [O/G, C_in/G, k, k]
        p_g = p[g * per_group:(g + 1) * per_group]
        total = total + (weight_reg / TRAINING_SIZE) * torch.sum(w_g ** 2 * (1.0 - p_g).view(1, -1, 1, 1))
    return total + (drop_reg / TRAINING_SIZE) * torch.sum(neg_entropy(p))


def linear_klreg_authors_oracle(weight, p_logit, weight_reg, drop_reg):
    """The authors' Linear_with_CD.KLreg, literally (broadcasts to [1, in, out, in])."""
    in_features = weight.shape[1]
    _weight_reg, _drop_reg = weight_reg / TRAINING_SIZE, drop_reg / TRAINING_SIZE
    _p = p_logit.sigmoid()
    weight_regularizer = _weight_reg * torch.sum((weight ** 2) * (1.0 - _p.view([1, in_features, 1, 1])))
    dropout_regularizer = _p * torch.log(_p)
    dropout_regularizer += (1.0 - _p) * torch.log(1.0 - _p)
    dropout_regularizer *= _drop_reg
    return torch.sum(weight_regularizer + dropout_regularizer)


def linear_klreg_intended_oracle(weight, p_logit, weight_reg, drop_reg):
    p = p_logit.double().sigmoid()
    w = weight.double()
    return (weight_reg / TRAINING_SIZE) * torch.sum(w ** 2 * (1.0 - p).view(1, -1)) + (
        drop_reg / TRAINING_SIZE
    ) * torch.sum(neg_entropy(p))


def deterministic_mask_oracle(u: torch.Tensor, z_channel: torch.Tensor) -> torch.Tensor:
    """1 - floor(u + p), [1, C, 1, 1], from per-channel logits (float32, as the authors)."""
    return 1.0 - torch.floor(u + z_channel.sigmoid().view(1, -1, 1, 1))


def relaxed_keep_oracle(p_channel: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """keep [rows, C] = 1 - sigmoid((logit p + L) / tau), L = log u - log(1 - u), u from the contract."""
    channels = p_channel.shape[0]
    u = ops.philox_uniform(rows * channels, seed=seed, stream=COMPAT_STREAM).double().view(rows, channels)
    logistic = torch.log(u) - torch.log1p(-u)
    return 1.0 - torch.sigmoid((p_channel.double() + logistic) / TAU)


def expected_relaxed_keep(p_logit: float) -> float:
    """E[1 - sigmoid((z + L) / tau)] over standard logistic L, by quadrature over u."""
    value, _ = integrate.quad(lambda u: special.expit(-(p_logit + special.logit(u)) / TAU), 0.0, 1.0, limit=200)
    return value


def identity_1x1(channels: int, **kwargs) -> Conv2d_with_CD:
    m = Conv2d_with_CD(channels, channels, 1, bias=False, **kwargs)
    with torch.no_grad():
        m.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return m


@pytest.fixture
def fixed_seed(monkeypatch):
    """Pin the per-call seed the stochastic forward draws, so the gates can be recomputed."""
    seed = 123456789012345

    monkeypatch.setattr(compat, "_fresh_seed", lambda: seed)
    return seed


# ---- signatures, classes, state dicts -------------------------------------------------------------
CONV_PARAMS = [
    ("in_channels", inspect.Parameter.empty), ("out_channels", inspect.Parameter.empty),
    ("kernel_size", inspect.Parameter.empty), ("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1),
    ("bias", True), ("weight_reg", 10.0), ("drop_reg", 1.0), ("p_init", 0.1), ("deterministic", True),
    ("debug", False), ("split", 1), ("split_pattern", None),
]
LINEAR_PARAMS = [
    ("in_features", inspect.Parameter.empty), ("out_features", inspect.Parameter.empty), ("bias", True),
    ("weight_reg", 10.0), ("drop_reg", 1.0), ("p_init", 0.1), ("deterministic", False), ("debug", False),
    ("split", 1), ("split_pattern", None),
]


@pytest.mark.parametrize("cls, expected", [(Conv2d_with_CD, CONV_PARAMS), (Linear_with_CD, LINEAR_PARAMS)])
def test_signature_matches_authors(cls, expected):
    params = list(inspect.signature(cls).parameters.values())
    positional = [p for p in params if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == expected
    assert params[: len(positional)] == positional  # the authors' parameters come first, in order
    extras = params[len(positional):]
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in extras)
    for p in positional:  # defaults of the right type too (e.g. 10.0, not 10)
        if p.default is not inspect.Parameter.empty and p.default is not None:
            assert type(p.default) is type(dict(expected)[p.name])


def test_subclasses_and_constants():
    assert TRAINING_SIZE == 1281167.0
    conv = Conv2d_with_CD(3, 4, 3, deterministic=False)
    lin = Linear_with_CD(3, 4)
    assert isinstance(conv, nn.Conv2d) and isinstance(lin, nn.Linear)
    assert conv._weight_reg == pytest.approx(10.0 / TRAINING_SIZE, rel=1e-15)
    assert conv._drop_reg == pytest.approx(1.0 / TRAINING_SIZE, rel=1e-15)
    custom = Linear_with_CD(3, 4, weight_reg=50.0, drop_reg=2.0)
    assert custom._weight_reg == pytest.approx(50.0 / TRAINING_SIZE, rel=1e-15)
    assert custom._drop_reg == pytest.approx(2.0 / TRAINING_SIZE, rel=1e-15)
    # the nn.Conv2d hyper-parameters pass through
    c = Conv2d_with_CD(4, 6, (3, 5), stride=2, padding=1, dilation=2, groups=2, bias=False)
    assert (c.kernel_size, c.stride, c.padding, c.dilation, c.groups) == ((3, 5), (2, 2), (1, 1), (2, 2), 2)
    assert c.bias is None and c.weight.shape == (6, 2, 3, 5)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_state_dict_layout(deterministic, bias):
    m = Conv2d_with_CD(6, 5, 3, bias=bias, deterministic=deterministic, split=2, split_pattern=[2, 4], p_init=0.3)
    sd = m.state_dict()
    keys = ["weight"] + (["bias"] if bias else []) + ["p_logit"] + (["unif_noise_variable"] if deterministic else [])
    assert list(sd.keys()) == keys
    assert sd["weight"].shape == (5, 6, 3, 3)
    assert sd["p_logit"].shape == (2,)
    assert torch.allclose(sd["p_logit"], torch.full((2,), math.log(0.3 / 0.7)))
    assert isinstance(m.p_logit, nn.Parameter) and m.p_logit.requires_grad
    assert m.weight.requires_grad
    if deterministic:
        u = m.unif_noise_variable
        assert isinstance(u, nn.Parameter) and not u.requires_grad
        assert u.shape == (1, 6, 1, 1) and torch.equal(u, torch.zeros(1, 6, 1, 1))
        # the authors' second name for the same storage: a candidate's noise written through it is used
        m.unif_noise_var.uniform_(0, 1, generator=torch.Generator().manual_seed(2))
        assert torch.equal(m.unif_noise_variable, m.unif_noise_var) and m.unif_noise_variable.any()
        assert "unif_noise_var" not in m.state_dict()
    else:
        assert not hasattr(m, "unif_noise_variable") and not hasattr(m, "unif_noise_var")
    names = {name for name, _ in m.named_parameters()}
    assert names == set(keys)  # everything in the state dict is a Parameter (no buffers)


def test_linear_state_dict_layout():
    m = Linear_with_CD(7, 3, p_init=0.2)
    sd = m.state_dict()
    assert list(sd.keys()) == ["weight", "bias", "p_logit"]
    assert sd["weight"].shape == (3, 7) and sd["bias"].shape == (3,)
    assert sd["p_logit"].shape == (7,) and torch.allclose(sd["p_logit"], torch.full((7,), math.log(0.2 / 0.8)))
    assert m.p_logit.requires_grad
    # `deterministic` is accepted and ignored: still no noise variable
    assert list(Linear_with_CD(7, 3, deterministic=True).state_dict().keys()) == ["weight", "bias", "p_logit"]
    # with a split pattern the authors still keep one logit per input feature
    assert Linear_with_CD(7, 3, split=2, split_pattern=[3, 4]).p_logit.shape == (7,)
    assert list(Linear_with_CD(7, 3, bias=False).state_dict().keys()) == ["weight", "p_logit"]


def test_load_authors_state_dict_deterministic_conv():
    gen = torch.Generator().manual_seed(0)
    in_ch, out_ch, split, pattern = 14, 5, 4, [2, 4, 4, 4]
    sd = OrderedDict(
        weight=torch.randn(out_ch, in_ch, 3, 3, generator=gen),
        bias=torch.randn(out_ch, generator=gen),
        p_logit=torch.randn(split, generator=gen),
        unif_noise_variable=torch.rand(1, in_ch, 1, 1, generator=gen),
    )
    m = Conv2d_with_CD(in_ch, out_ch, 3, padding=1, split=split, split_pattern=pattern)
    result = m.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not m.unif_noise_variable.requires_grad  # loading keeps the flag
    x = torch.randn(2, in_ch, 6, 6, generator=gen)
    mask = deterministic_mask_oracle(sd["unif_noise_variable"], expand_split(sd["p_logit"], in_ch, split, pattern))
    assert 0 < mask.sum() < in_ch  # the test is not vacuous
    expected = F.conv2d(x * mask, sd["weight"], sd["bias"], padding=1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    # a non-deterministic layer refuses the noise key (strict), like the authors'
    with pytest.raises(RuntimeError, match="unif_noise_variable"):
        Conv2d_with_CD(in_ch, out_ch, 3, deterministic=False, split=split, split_pattern=pattern).load_state_dict(sd)


def test_load_authors_state_dict_linear(fixed_seed):
    gen = torch.Generator().manual_seed(1)
    sd = OrderedDict(weight=torch.randn(4, 6, generator=gen), bias=torch.randn(4, generator=gen),
                     p_logit=torch.randn(6, generator=gen))
    m = Linear_with_CD(6, 4)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(5, 6, generator=gen)
    keep = relaxed_keep_oracle(sd["p_logit"], 5, fixed_seed).float()
    torch.testing.assert_close(m(x), F.linear(x * keep, sd["weight"], sd["bias"]), rtol=1e-5, atol=1e-5)


# ---- p and KLreg ----------------------------------------------------------------------------------
def test_p_and_klreg_are_properties():
    for cls in (Conv2d_with_CD, Linear_with_CD):
        assert isinstance(inspect.getattr_static(cls, "p"), property)
        assert isinstance(inspect.getattr_static(cls, "KLreg"), property)


CONV_CASES = {
    "split1": dict(in_ch=5, split=1, pattern=None),
    "split1_pattern": dict(in_ch=5, split=1, pattern=[5]),
    "split4": dict(in_ch=14, split=4, pattern=[2, 4, 4, 4]),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("deterministic", [True, False])
def test_conv_p_and_klreg_values(case, deterministic):
    c = CONV_CASES[case]
    torch.manual_seed(2)
    m = Conv2d_with_CD(c["in_ch"], 3, 3, weight_reg=150.0, drop_reg=2.0, deterministic=deterministic,
                       split=c["split"], split_pattern=c["pattern"])
    with torch.no_grad():
        m.p_logit.copy_(torch.randn(c["split"]) * 2)
    p = m.p
    assert isinstance(p, torch.Tensor) and p.shape == (c["split"],)
    torch.testing.assert_close(p, torch.sigmoid(m.p_logit.detach()))
    kl = m.KLreg
    assert isinstance(kl, torch.Tensor) and kl.dim() == 0 and kl.requires_grad
    p_channel = expand_split(m.p_logit.detach(), c["in_ch"], c["split"], c["pattern"])
    expected = conv_klreg_oracle(m.weight.detach(), p_channel, 150.0, 2.0)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=0)
    # gradients equal autograd of the oracle
    kl.backward()
    w = m.weight.detach().double().requires_grad_()
    z = m.p_logit.detach().double().requires_grad_()
    oracle = conv_klreg_oracle(w, expand_split(z, c["in_ch"], c["split"], c["pattern"]), 150.0, 2.0)
    gw, gz = torch.autograd.grad(oracle, (w, z))
    torch.testing.assert_close(m.weight.grad.double(), gw, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(m.p_logit.grad.double(), gz, rtol=1e-4, atol=1e-12)


def test_shared_split_pattern_mutated_after_construction():
    torch.manual_seed(3)
    shared = [2, 4, 4, 4]
    m = Conv2d_with_CD(14, 3, 1, deterministic=False, split=4, split_pattern=shared)
    with torch.no_grad():
        m.p_logit.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]))
    before = m.KLreg.detach().clone()
    shared.append(4)  # a DenseNet block grows the shared list for its next layer
    later = Conv2d_with_CD(18, 3, 1, deterministic=False, split=5, split_pattern=shared)
    shared.append(4)
    shared.append(7)
    assert m.split_pattern is shared  # it is shared, not copied, and expansion reads entries 0 and 1 only
    torch.testing.assert_close(m.KLreg.detach(), before, rtol=0, atol=0)
    expected_z = torch.tensor([-2.0] * 2 + [-0.5] * 4 + [0.5] * 4 + [2.0] * 4)
    torch.testing.assert_close(
        m.KLreg.double(), conv_klreg_oracle(m.weight.detach(), expected_z, 10.0, 1.0), rtol=1e-5, atol=0
    )
    assert m(torch.randn(2, 14, 3, 3)).shape == (2, 3, 3, 3)
    assert later(torch.randn(2, 18, 3, 3)).shape == (2, 3, 3, 3)
    with torch.no_grad():
        later.p_logit.copy_(torch.randn(5))
    p18 = expand_split(later.p_logit.detach(), 18, 5, [2, 4])
    torch.testing.assert_close(
        later.KLreg.double(), conv_klreg_oracle(later.weight.detach(), p18, 10.0, 1.0), rtol=1e-5, atol=0
    )


def test_grouped_conv_klreg_per_input_channel():
    """groups=2: (1 - p_c) must pair each weight with the input channel it reads (the authors' broke here)."""
    torch.manual_seed(4)
    m = Conv2d_with_CD(6, 4, 3, groups=2, deterministic=False, split=2, split_pattern=[2, 4])
    with torch.no_grad():
        m.p_logit.copy_(torch.tensor([-2.5, 1.5]))
    z = expand_split(m.p_logit.detach(), 6, 2, [2, 4])  # channels 0-1 p0, 2-5 p1; group 0 reads 0-2
    expected = conv_klreg_oracle(m.weight.detach(), z, 10.0, 1.0, groups=2)
    torch.testing.assert_close(m.KLreg.double(), expected, rtol=1e-5, atol=0)
    # a wrong pairing (input channel j of every group uses p_j) gives a different value: the test can tell
    w = m.weight.detach().double()
    wrong = (10.0 / TRAINING_SIZE) * torch.sum(w ** 2 * (1 - z[:3].double().sigmoid()).view(1, 3, 1, 1)) + (
        1.0 / TRAINING_SIZE) * neg_entropy(z.double().sigmoid()).sum()
    assert not torch.isclose(wrong, expected, rtol=1e-3)
    # depthwise
    d = Conv2d_with_CD(4, 8, 3, groups=4, deterministic=False)
    with torch.no_grad():
        d.p_logit.fill_(0.7)
    torch.testing.assert_close(
        d.KLreg.double(), conv_klreg_oracle(d.weight.detach(), torch.full((4,), 0.7), 10.0, 1.0, groups=4),
        rtol=1e-5, atol=0,
    )
    # and the forward of the grouped conv runs
    assert d(torch.randn(2, 4, 5, 5)).shape == (2, 8, 3, 3)


def test_klreg_finite_at_extreme_p():
    for z in (-60.0, 60.0, -math.inf, math.inf):  # p exactly 0 and 1 too
        m = Conv2d_with_CD(3, 2, 1, deterministic=False)
        lin = Linear_with_CD(3, 2)
        with torch.no_grad():
            m.p_logit.fill_(z)
            lin.p_logit.fill_(z)
        for layer in (m, lin):
            kl = layer.KLreg
            assert torch.isfinite(kl)
            kl.backward()
            assert torch.isfinite(layer.p_logit.grad).all() and torch.isfinite(layer.weight.grad).all()
        # p -> 0: only the weight term survives (H'(0) = 0); p -> 1: everything vanishes
        expected = 0.0 if z > 0 else (10.0 / TRAINING_SIZE) * m.weight.detach().double().square().sum().item()
        assert m.KLreg.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("in_features, out_features", [(3, 4), (5, 2), (1, 1)])
def test_linear_klreg_authors_formula(in_features, out_features):
    torch.manual_seed(5)
    m = Linear_with_CD(in_features, out_features, weight_reg=80.0, drop_reg=1.5)
    with torch.no_grad():
        m.p_logit.copy_(torch.randn(in_features) * 1.5)
    kl = m.KLreg
    assert isinstance(kl, torch.Tensor) and kl.dim() == 0
    w = m.weight.detach().double().requires_grad_()
    z = m.p_logit.detach().double().requires_grad_()
    expected = linear_klreg_authors_oracle(w, z, 80.0, 1.5)
    torch.testing.assert_close(kl.double(), expected.detach(), rtol=1e-5, atol=0)
    # the same gradients as the literal formula (losses AND training dynamics match the authors')
    kl.backward()
    gw, gz = torch.autograd.grad(expected, (w, z))
    torch.testing.assert_close(m.weight.grad.double(), gw, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(m.p_logit.grad.double(), gz, rtol=1e-4, atol=1e-12)
    # the explicit default and the intended formula
    m2 = Linear_with_CD(in_features, out_features, weight_reg=80.0, drop_reg=1.5, kl_formula="authors")
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.KLreg, kl)
    fixed = Linear_with_CD(in_features, out_features, weight_reg=80.0, drop_reg=1.5, kl_formula="intended")
    fixed.load_state_dict(m.state_dict())
    intended = linear_klreg_intended_oracle(m.weight.detach(), m.p_logit.detach(), 80.0, 1.5)
    torch.testing.assert_close(fixed.KLreg.double(), intended, rtol=1e-5, atol=0)
    if in_features > 1:
        assert not torch.isclose(intended, expected.detach(), rtol=1e-3)


# ---- deterministic forward ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["split1", "split4"])
def test_deterministic_forward_matches_floor_mask(case):
    c = CONV_CASES[case]
    gen = torch.Generator().manual_seed(6)
    in_ch, split, pattern = c["in_ch"], c["split"], c["pattern"]
    probe = identity_1x1(in_ch, split=split, split_pattern=pattern)
    m = Conv2d_with_CD(in_ch, 4, 3, padding=1, split=split, split_pattern=pattern)
    z = torch.randn(split, generator=gen) * 1.5 if split > 1 else torch.tensor([0.0])
    u = torch.rand(1, in_ch, 1, 1, generator=gen)
    z_channel = expand_split(z, in_ch, split, pattern)
    u[0, :2, 0, 0] = 1.0 - z_channel[:2].sigmoid()  # on the boundary u + p = 1 (floor decides) as well
    for layer in (probe, m):
        with torch.no_grad():
            layer.p_logit.copy_(z)
            layer.unif_noise_variable.copy_(u)
    mask = deterministic_mask_oracle(u, z_channel)
    assert 0 < mask.sum() < in_ch
    x = torch.randn(3, in_ch, 5, 5, generator=gen)
    # with identity 1x1 weights the output is the masked input: the mask agrees exactly
    ones = torch.ones(3, in_ch, 2, 2)
    assert torch.equal(probe(ones), mask.expand(3, in_ch, 2, 2))
    assert torch.equal(probe(x), x * mask)
    # the same mask for every example, applied in eval mode too, and deterministic
    out = m(x)
    torch.testing.assert_close(out, F.conv2d(x * mask, m.weight, m.bias, padding=1), rtol=1e-5, atol=1e-5)
    m.eval()
    assert torch.equal(m(x), out)
    # p_logit gets a zero gradient through the hard mask (the authors' floor: momentum and hooks see it),
    # weight a real one
    m(x).sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert m.p_logit.grad is not None and torch.equal(m.p_logit.grad, torch.zeros_like(m.p_logit))
    assert m.unif_noise_variable.grad is None
    half = m.half()  # the zero-gradient term keeps the data's dtype
    assert half(x.half()).dtype == torch.float16


def test_zero_noise_default_keeps_everything_and_warns_once(monkeypatch):
    monkeypatch.setattr(compat, "_warned_zero_noise", False)
    with pytest.warns(UserWarning, match="unif_noise_variable"):
        m = Conv2d_with_CD(4, 3, 3, padding=1, p_init=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Conv2d_with_CD(4, 3, 3)  # no second warning
        Conv2d_with_CD(4, 3, 3, deterministic=False)
        Linear_with_CD(4, 3)
    x = torch.randn(2, 4, 5, 5)
    # u = 0: nothing dropped even with p = 0.9 (floor(0 + 0.9) = 0): the plain conv
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, padding=1), rtol=0, atol=0)
    # stochastic layers do not warn at all
    monkeypatch.setattr(compat, "_warned_zero_noise", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Conv2d_with_CD(4, 3, 3, deterministic=False)


# ---- stochastic forward ---------------------------------------------------------------------------
def test_stochastic_conv_reproducible_with_manual_seed():
    m = Conv2d_with_CD(5, 3, 3, padding=1, deterministic=False)
    x = torch.randn(4, 5, 6, 6)
    torch.manual_seed(7)
    a = m(x)
    b = m(x)
    torch.manual_seed(7)
    assert torch.equal(m(x), a)
    assert torch.equal(m(x), b)
    assert not torch.equal(a, b)  # a fresh draw per call


@pytest.mark.parametrize("case", ["split1", "split4"])
def test_stochastic_conv_matches_relaxed_gate_oracle(case, fixed_seed):
    c = CONV_CASES[case]
    gen = torch.Generator().manual_seed(8)
    in_ch, split, pattern = c["in_ch"], c["split"], c["pattern"]
    m = Conv2d_with_CD(in_ch, 4, 3, padding=1, deterministic=False, split=split, split_pattern=pattern)
    with torch.no_grad():
        m.p_logit.copy_(torch.randn(split, generator=gen))
    x = torch.randn(3, in_ch, 5, 5, generator=gen)
    keep = relaxed_keep_oracle(expand_split(m.p_logit.detach(), in_ch, split, pattern), 3, fixed_seed).float()
    # one gate per (example, channel), shared over H and W, no 1 / (1 - p) rescaling
    expected = F.conv2d(x * keep.view(3, in_ch, 1, 1), m.weight, m.bias, padding=1)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    m.eval()  # the authors never read self.training: still gated in eval mode
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_stochastic_gradients_match_oracle(fixed_seed):
    gen = torch.Generator().manual_seed(9)
    m = Conv2d_with_CD(14, 3, 3, padding=1, deterministic=False, split=4, split_pattern=[2, 4, 4, 4])
    with torch.no_grad():
        m.p_logit.copy_(torch.randn(4, generator=gen))
    x = torch.randn(2, 14, 4, 4, generator=gen)
    g = torch.randn(2, 3, 4, 4, generator=gen)
    (m(x) * g).sum().backward()
    assert torch.isfinite(m.p_logit.grad).all() and m.p_logit.grad.abs().min() > 0
    assert m.weight.grad.abs().sum() > 0 and m.bias.grad.abs().sum() > 0

    z = m.p_logit.detach().double().requires_grad_()
    w = m.weight.detach().double().requires_grad_()
    keep = relaxed_keep_oracle(expand_split(z, 14, 4, [2, 4, 4, 4]), 2, fixed_seed)
    out = F.conv2d(x.double() * keep.view(2, 14, 1, 1), w, m.bias.detach().double(), padding=1)
    gz, gw = torch.autograd.grad((out * g.double()).sum(), (z, w))
    torch.testing.assert_close(m.p_logit.grad.double(), gz, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.weight.grad.double(), gw, rtol=1e-4, atol=1e-5)


def test_stochastic_keep_law_matches_relaxed_gate():
    """Mean keep over many draws = E[1 - sigmoid((logit p + L) / 0.2)], and L is standard logistic."""
    torch.manual_seed(10)
    z = [math.log(0.1 / 0.9), 0.0, 1.0]
    m = identity_1x1(3, deterministic=False, split=3, split_pattern=[1, 1, 1])
    with torch.no_grad():
        m.p_logit.copy_(torch.tensor(z))
    batch = 20000
    with torch.no_grad():
        keep = m(torch.ones(batch, 3, 2, 2))
    assert torch.equal(keep[:, :, :1, :1].expand_as(keep), keep)  # shared over H and W
    keep = keep[:, :, 0, 0].double()
    assert keep.min() >= 0 and keep.max() <= 1
    for c in range(3):
        assert keep[:, c].mean().item() == pytest.approx(expected_relaxed_keep(z[c]), abs=0.01)
        # the whole law: keep = sigmoid(-(z + L) / tau), so P(keep <= k) = P(L >= -tau * logit(k) - z)
        for k in (0.1, 0.5, 0.9):
            prob = 1.0 - special.expit(-TAU * special.logit(k) - z[c])
            assert (keep[:, c] <= k).double().mean().item() == pytest.approx(prob, abs=0.015)
    # independent across channels and examples: channel correlations near 0
    corr = np.corrcoef(keep.numpy().T)
    assert np.abs(corr - np.eye(3)).max() < 0.05


def test_stochastic_logistic_noise_ks(fixed_seed):
    """The implied L of every gate is standard logistic (KS test on exact gates from one draw)."""
    lin = Linear_with_CD(50, 1, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    rows = 200
    keep = relaxed_keep_oracle(lin.p_logit.detach(), rows, fixed_seed)
    logistic = -TAU * torch.logit(keep) - lin.p_logit.detach().double()
    finite = logistic[torch.isfinite(logistic)]
    assert finite.numel() > 0.95 * rows * 50
    assert stats.kstest(finite.numpy(), "logistic").pvalue > 1e-3


def test_linear_p_is_the_drop_probability_of_each_input_feature():
    m = Linear_with_CD(6, 3, split=2, split_pattern=[2, 4])  # (the authors' linear keeps one p per feature)
    logits = torch.tensor([-1.5, 0.7, 2.0, -0.2, 0.0, 1.1])
    with torch.no_grad():
        m.p_logit.copy_(logits)
    torch.testing.assert_close(m.p, torch.sigmoid(logits), rtol=0, atol=0)


def test_linear_without_split_pattern_and_3d_input(fixed_seed):
    gen = torch.Generator().manual_seed(11)
    m = Linear_with_CD(6, 4)  # the authors' version raised here (self.in_channels)
    with torch.no_grad():
        m.p_logit.copy_(torch.randn(6, generator=gen))
    x = torch.randn(3, 5, 6, generator=gen)
    out = m(x)
    assert out.shape == (3, 5, 4)
    keep = relaxed_keep_oracle(m.p_logit.detach(), 15, fixed_seed).float()  # one gate per (row, feature)
    expected = F.linear(x.reshape(15, 6) * keep, m.weight, m.bias).view(3, 5, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out2 = m(x[:, 0])  # 2-D input: the first 3 rows of the same stream
    torch.testing.assert_close(out2, F.linear(x[:, 0] * keep[:3], m.weight, m.bias), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(m.p_logit.grad).all() and m.p_logit.grad.abs().sum() > 0
    assert m.weight.grad.abs().sum() > 0


def test_linear_stochastic_in_eval_and_reproducible():
    m = Linear_with_CD(8, 3).eval()
    x = torch.randn(4, 8)
    torch.manual_seed(12)
    a = m(x)
    torch.manual_seed(12)
    assert torch.equal(m(x), a)
    assert not torch.equal(m(x), a)
    assert not torch.allclose(a, F.linear(x, m.weight, m.bias))


def test_debug_prints_p_logit_grad(capsys):
    m = Conv2d_with_CD(3, 2, 1, deterministic=False, debug=True)
    m.KLreg.backward()
    assert "p_logit grad" in capsys.readouterr().out
    lin = Linear_with_CD(3, 2, debug=True)
    lin.KLreg.backward()
    assert "p_logit grad" in capsys.readouterr().out


# ---- bad arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize("p_init", [0.0, 1.0, -0.1, 1.5])
def test_bad_p_init(p_init):
    with pytest.raises(ValueError, match="p_init"):
        Conv2d_with_CD(3, 2, 1, p_init=p_init)
    with pytest.raises(ValueError, match="p_init"):
        Linear_with_CD(3, 2, p_init=p_init)


def test_bad_split_pattern():
    with pytest.raises(ValueError, match="split_pattern"):
        Conv2d_with_CD(14, 2, 1, split=4, split_pattern=[2, 4, 4, 5])  # sums to 15
    with pytest.raises(ValueError, match="split_pattern"):
        Conv2d_with_CD(14, 2, 1, split=3, split_pattern=[2, 4, 4, 4])  # wrong length
    with pytest.raises(ValueError, match="split_pattern"):
        Linear_with_CD(6, 2, split=2, split_pattern=[3, 4])
    with pytest.raises(ValueError, match="split"):
        Conv2d_with_CD(4, 2, 1, split=2)  # split > 1 needs a pattern
    with pytest.raises(ValueError, match="split"):
        Linear_with_CD(4, 2, split=0)
    for pattern in ([-2, 16], [0, 14], [2.5, 11.5], [True, 13], ["2", 12], [None, 14], [torch.tensor([1, 1]), 12]):
        with pytest.raises(ValueError, match=r"split_pattern must hold channel counts \(ints >= 1\)"):
            Conv2d_with_CD(14, 2, 1, split=2, split_pattern=pattern)


def test_regularisation_strengths_beyond_float32_are_named_at_construction():
    for name in ("weight_reg", "drop_reg"):
        for layer in (lambda **k: Conv2d_with_CD(3, 2, 1, **k), lambda **k: Linear_with_CD(3, 2, **k)):
            with pytest.raises(ValueError, match=f"{name} must be <= 4.35959e\\+44 .*got 1e\\+300"):
                layer(**{name: 1e300})
            layer(**{name: 1e40}).KLreg  # large but inside float32 once divided by N


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("-inf")])
def test_negative_or_nan_regularisation_strengths_are_refused(value):
    """(a NaN strength made KLreg NaN, a negative one rewarded large weights)"""
    for name in ("weight_reg", "drop_reg"):
        for layer in (lambda **k: Conv2d_with_CD(3, 2, 1, **k), lambda **k: Linear_with_CD(3, 2, **k)):
            with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value!r}"):
                layer(**{name: value})


def test_a_zero_regularisation_strength_switches_its_term_off():
    """0 is a strength like any other (a run without weight decay or without the entropy term): KLreg is then
    the other term alone, for either layer."""
    torch.manual_seed(4)
    for weight_reg, drop_reg in ((0.0, 2.0), (150.0, 0.0), (0, 0)):
        conv = Conv2d_with_CD(5, 3, 3, deterministic=False, weight_reg=weight_reg, drop_reg=drop_reg, p_init=0.3)
        expected = conv_klreg_oracle(conv.weight.detach(), conv.p_logit.detach().expand(5), weight_reg, drop_reg)
        torch.testing.assert_close(conv.KLreg.double(), expected, rtol=1e-5, atol=0)
        lin = Linear_with_CD(4, 3, weight_reg=weight_reg, drop_reg=drop_reg, p_init=0.3)
        expected = linear_klreg_authors_oracle(lin.weight.detach().double(), lin.p_logit.detach().double(),
                                               weight_reg, drop_reg)
        torch.testing.assert_close(lin.KLreg.double(), expected, rtol=1e-5, atol=0)
    assert Conv2d_with_CD(5, 3, 3, deterministic=False, weight_reg=0.0, drop_reg=0.0).KLreg.item() == 0.0


@pytest.mark.parametrize("value", [True, False, torch.tensor(True)])
def test_boolean_strengths_and_p_init_are_refused(value):
    """A bool is no number of the authors' (True would have been taken as 1.0, False as 0.0): refused by name."""
    for name in ("weight_reg", "drop_reg", "p_init"):
        for layer in (lambda **k: Conv2d_with_CD(3, 2, 1, **k), lambda **k: Linear_with_CD(3, 2, **k)):
            with pytest.raises(TypeError, match=f"{name} must be a real number, got bool"):
                layer(**{name: value})


def test_split_expansion_reads_entries_0_and_1_only():
    """[2, 4, 3, 5] sums to 14 but the authors' expansion is 2 + 4 + 4 + 4: later groups use entry 1."""
    m = Conv2d_with_CD(14, 2, 1, deterministic=False, split=4, split_pattern=[2, 4, 3, 5])
    with torch.no_grad():
        m.p_logit.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    z = torch.tensor([-1.0] * 2 + [0.0] * 4 + [1.0] * 4 + [2.0] * 4)
    torch.testing.assert_close(m.KLreg.double(), conv_klreg_oracle(m.weight.detach(), z, 10.0, 1.0), rtol=1e-5, atol=0)


def test_split_pattern_the_expansion_cannot_cover():
    # sums to in_channels, but group 0 + later groups of split_pattern[1] channels do not: say so at use
    m = Conv2d_with_CD(10, 2, 1, deterministic=False, split=3, split_pattern=[2, 3, 5])
    with pytest.raises(ValueError, match="split_pattern"):
        m.KLreg
    with pytest.raises(ValueError, match="split_pattern"):
        m(torch.randn(1, 10, 2, 2))


def test_bad_kl_formula():
    with pytest.raises(ValueError, match="kl_formula"):
        Linear_with_CD(3, 2, kl_formula="paper")


def test_a_numpy_split_is_taken_and_bad_sizes_and_backends_are_named_at_construction():
    m = Conv2d_with_CD(6, 2, 1, deterministic=False, split=np.int64(2), split_pattern=[2, 4])
    assert type(m.split) is int and m.split == 2 and m.p_logit.shape == (2,)
    # a numpy split_pattern (whose truth value numpy refuses) expands like the list
    listed = Conv2d_with_CD(10, 2, 1, deterministic=False, split=3, split_pattern=[2, 4, 4])
    arrayed = Conv2d_with_CD(10, 2, 1, deterministic=False, split=3, split_pattern=np.array([2, 4, 4]))
    with torch.no_grad():
        arrayed.p_logit.copy_(torch.randn(3))
        listed.p_logit.copy_(arrayed.p_logit)
        listed.weight.copy_(arrayed.weight)
    torch.testing.assert_close(arrayed._p_logit_per_channel(), listed._p_logit_per_channel(), rtol=0, atol=0)
    torch.testing.assert_close(arrayed.KLreg, listed.KLreg, rtol=0, atol=0)
    with pytest.raises(ValueError, match="split=3 needs a split_pattern"):
        Conv2d_with_CD(10, 2, 1, split=3, split_pattern=np.array([], dtype=int))
    # sizes are checked before nn.Conv2d / nn.Linear see them (torch: "negative dimension"; a zero
    # out_channels would have failed inside the regulariser, under an op argument's name)
    for make, name, value in ((lambda v: Linear_with_CD(v, 2), "in_features", 0),
                              (lambda v: Linear_with_CD(v, 2), "in_features", -1),
                              (lambda v: Linear_with_CD(3, v), "out_features", 0),
                              (lambda v: Conv2d_with_CD(v, 2, 1), "in_channels", 0),
                              (lambda v: Conv2d_with_CD(v, 2, 1), "in_channels", -1),
                              (lambda v: Conv2d_with_CD(3, v, 1, deterministic=False), "out_channels", 0),
                              (lambda v: Conv2d_with_CD(v, 2, 1), "in_channels", 2.0)):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1, got {value!r}"):
            make(value)
    with pytest.raises(ValueError, match="split_pattern must be a list of channel counts .*got int 5"):
        Conv2d_with_CD(5, 2, 1, split_pattern=5)
    for make in (lambda: Conv2d_with_CD(3, 2, 1, backend="bogus"), lambda: Linear_with_CD(3, 2, backend="bogus"),
                 lambda: GatedConv2d(3, 2, 1, backend="bogus"), lambda: GatedLinear(3, 2, backend="bogus")):
        with pytest.raises(ValueError, match="backend must be one of auto, reference.*got 'bogus'"):
            make()  # (a deterministic layer would never have called an op to find out)


def test_runs_without_cuda_and_moves_with_to():
    """The authors hard-coded .cuda(); these follow the module's device and dtype."""
    m = Conv2d_with_CD(3, 2, 3, deterministic=False).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = m(x)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    d = Conv2d_with_CD(3, 2, 3).double()
    assert d(x).dtype == torch.float64
    assert Linear_with_CD(3, 2).double()(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


# ---- what the authors' code may pass and read: shapes, scalar types, backends, dtypes, attributes ----
def test_linear_rejects_wrong_in_features_and_takes_empty_batches():
    lin = Linear_with_CD(6, 4)
    for shape in [(4, 3), (2, 5, 3), (5, 4)]:
        with pytest.raises(ValueError, match=r"to have 6 features \(in_features\)"):
            lin(torch.randn(*shape))
    assert lin(torch.randn(0, 6)).shape == (0, 4)
    assert lin(torch.randn(2, 0, 6)).shape == (2, 0, 4)


@pytest.mark.parametrize("deterministic", [True, False])
def test_conv_input_checks_and_unbatched_input(deterministic, fixed_seed):
    m = Conv2d_with_CD(8, 6, 3, padding=1, deterministic=deterministic)
    with pytest.raises(ValueError, match="to have 8 channels"):
        m(torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 8))
    x = torch.randn(8, 5, 5)
    torch.testing.assert_close(m(x), m(x.unsqueeze(0)).squeeze(0))
    assert m(x).shape == (6, 5, 5)


@pytest.mark.parametrize("deterministic", [True, False])
def test_integer_inputs_are_named_for_the_layer_in_either_mode(deterministic):
    """A deterministic layer used to fail inside torch's conv, a stochastic one under the op's `x`."""
    for layer, x in ((Conv2d_with_CD(3, 2, 1, deterministic=deterministic), torch.ones(1, 3, 2, 2, dtype=torch.long)),
                     (Linear_with_CD(3, 2, deterministic=deterministic), torch.ones(2, 3, dtype=torch.int32)),
                     (GatedConv2d(3, 2, 1), torch.ones(1, 3, 2, 2, dtype=torch.uint8)),
                     (GatedLinear(3, 2), torch.ones(2, 3, dtype=torch.bool))):
        with pytest.raises(TypeError, match=f"{type(layer).__name__}: input must have dtype in "
                                            r"\(float32, float16, bfloat16, float64\), got (int64|int32|uint8|bool)"):
            layer(x)


def test_assigning_unif_noise_var_loads_the_candidate_noise():
    """The authors' attribute could be rebound; ours copies into unif_noise_variable (the forward's noise)."""
    m = Conv2d_with_CD(4, 4, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        m.p_logit.fill_(0.0)  # p = 0.5: drop where u >= 0.5
    noise = torch.tensor([0.9, 0.1, 0.7, 0.2]).view(1, 4, 1, 1)
    m.unif_noise_var = noise
    assert torch.equal(m.unif_noise_variable, noise) and m.unif_noise_variable.requires_grad is False
    x = torch.rand(2, 4, 3, 3) + 0.5
    torch.testing.assert_close(m(x), x * torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unif_noise_var must be a tensor of shape \(1, 4, 1, 1\), got shape \(4,\)"):
        m.unif_noise_var = torch.rand(4)


def test_authors_linear_klreg_of_a_half_layer_does_not_overflow():
    """||W||^2 beyond float16's 65504 is summed in float32: the float32 layer's value, a finite gradient."""
    torch.manual_seed(0)
    lin = Linear_with_CD(300, 300)
    with torch.no_grad():
        lin.weight.normal_()  # ||W||^2 ~ 9e4
    expected = lin.KLreg.item()
    for dtype in (torch.float16, torch.bfloat16):
        layer = Linear_with_CD(300, 300).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(lin.weight.to(dtype))
            layer.p_logit.copy_(lin.p_logit.to(dtype))
        kl = layer.KLreg
        kl.backward()
        assert kl.dtype == torch.float32 and torch.isfinite(layer.p_logit.grad).all()
        # (the weights rounded to dtype: bfloat16 keeps 8 bits)
        assert kl.item() == pytest.approx(expected, rel=1e-2 if dtype == torch.bfloat16 else 1e-3)


def test_regs_and_p_init_take_numpy_and_tensor_scalars():
    m = Conv2d_with_CD(3, 2, 1, deterministic=False, weight_reg=np.float32(80.0), drop_reg=torch.tensor(2.0),
                       p_init=np.float64(0.2))
    assert m._weight_reg == pytest.approx(80.0 / TRAINING_SIZE) and m._drop_reg == pytest.approx(2.0 / TRAINING_SIZE)
    with pytest.raises(TypeError, match="p_init"):
        Linear_with_CD(3, 2, p_init="0.1")
    with pytest.raises(TypeError, match="weight_reg"):
        Linear_with_CD(3, 2, weight_reg="10")


def test_module_backend_is_honoured():
    for m, x in ((Conv2d_with_CD(4, 3, 1, deterministic=False), torch.randn(2, 4, 3, 3)),
                 (Linear_with_CD(4, 3), torch.randn(2, 4))):
        m.backend = "no-such-backend"
        with pytest.raises(ValueError, match="backend"):
            m(x)
        with pytest.raises(ValueError, match="backend"):
            m.KLreg
        m.backend = "reference"
        m(x)


def test_float64_layers_keep_float64_regulariser():
    c = Conv2d_with_CD(4, 3, 3, deterministic=False).double()
    assert c.KLreg.dtype == torch.float64 and Linear_with_CD(4, 3).double().KLreg.dtype == torch.float64
    assert c(torch.randn(2, 4, 5, 5, dtype=torch.float64)).dtype == torch.float64
    assert Conv2d_with_CD(4, 3, 3, deterministic=False).KLreg.dtype == torch.float32


def test_authors_private_attributes():
    c, lin = Conv2d_with_CD(4, 3, 1), Linear_with_CD(4, 3, p_init=0.3)
    assert c._det_mode is True and c._p_init == 0.1 and c._noise_shape == (4, 1, 1) and c._eps == 1e-8
    assert lin._p_init == 0.3 and lin._noise_shape == (4,)
