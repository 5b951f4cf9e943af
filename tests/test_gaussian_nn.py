"""The Gaussian posterior family in the gated modules (pgnas_fast.nn, `set_posterior(model, "gaussian")`).

Oracles are plain-torch expressions written from the formulas (design.md "Gaussian family"):
relaxed out = mu + sqrt(var + 1e-8) * eps with mu = conv(x, W) + b and var = conv(x^2, alpha W^2),
alpha = exp(clip(log alpha, -8, 8)) of W's input channel (built here weight by weight), eps from the
RNG contract's stream (GAUSSIAN, step, gate-layer index) at element offset + flat index, recovered
through `ops.gaussian_noise` on mu = 0, var = 1 - 1e-8. The network KL is Molchanov et al.'s
approximation summed over every weight, / N.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pgnas_fast import ops
from pgnas_fast.nn import (
    POSTERIORS,
    GatedConv2d,
    GatedLinear,
    clip_log_alpha_,
    gated_layers,
    stacked_candidate_masks,
    network_regularizer,
    posterior_of,
    set_gates,
    set_posterior,
)
from pgnas_fast.ops.streams import Domain, stream_id
from pgnas_fast.search.export import architecture_record
from pgnas_fast.search.rank import uniform_drop_logits
from pgnas_fast.search.train import mean_drop_probability

SEED = 97531
K1, K2, K3 = 0.63576, 1.87320, 1.48695


# ---- oracles --------------------------------------------------------------------------------------
def eps_of(shape, seed: int, stream: int, offset: int = 0) -> torch.Tensor:
    """The contract's standard normals of elements offset + i, float64."""
    zeros = torch.zeros(shape, dtype=torch.float64)
    return ops.gaussian_noise(zeros, torch.full(shape, 1.0 - 1e-8, dtype=torch.float64), seed=seed, stream=stream,
                              offset=offset, backend="reference")


def alpha_per_weight(weight: torch.Tensor, log_alpha: torch.Tensor, groups: int) -> torch.Tensor:
    """alpha of the input channel each weight W[o, j, ...] multiplies, one weight at a time."""
    out_channels, per_group = weight.shape[:2]
    alpha = torch.exp(log_alpha.clamp(-8.0, 8.0))
    rows = []
    for o in range(out_channels):
        group = o // (out_channels // groups)
        rows.append(torch.stack([alpha[group * per_group + j] for j in range(per_group)]))
    return torch.stack(rows).view(out_channels, per_group, *([1] * (weight.dim() - 2)))


def conv_literal(layer: GatedConv2d, x: torch.Tensor, log_alpha: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    mu = F.conv2d(x, layer.weight, layer.bias, *args)
    var = F.conv2d(x ** 2, alpha_per_weight(layer.weight, log_alpha, layer.groups) * layer.weight ** 2, None, *args)
    return mu + torch.sqrt(var + 1e-8) * eps


def linear_literal(layer: GatedLinear, x: torch.Tensor, log_alpha: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    mu = x @ layer.weight.T + layer.bias
    var = (x ** 2) @ (alpha_per_weight(layer.weight, log_alpha, 1) * layer.weight ** 2).T
    return mu + torch.sqrt(var + 1e-8) * eps


def kl_literal(log_alpha: torch.Tensor) -> torch.Tensor:
    a = log_alpha.clamp(-8.0, 8.0)
    return K1 - K1 * torch.sigmoid(K2 + K3 * a) + 0.5 * torch.log1p(torch.exp(-a))


def random_log_alpha(layer, low=-4.0, high=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        u = torch.rand(layer.p_logit.shape, generator=g, dtype=layer.p_logit.dtype)
        layer.p_logit.copy_(low + (high - low) * u)


def gaussian(layer, step=3, index=0, **gates):
    """A single gated layer as a one-layer net with the Gaussian family in relaxed mode."""
    net = nn.Sequential(layer)
    set_posterior(net, "gaussian")
    set_gates(net, "relaxed", seed=SEED, step=step, **gates)
    return net


CONVS = {  # name: (constructor arguments, input shape)
    "plain": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, gate_groups=[1, 2]), (3, 3, 7, 5)),
    "strided": (dict(in_channels=5, out_channels=4, kernel_size=(3, 2), stride=2, dilation=(1, 2), gate_groups=2),
                (2, 5, 9, 11)),
    "grouped": (dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3, gate_groups=[1, 3, 2]),
                (3, 6, 5, 5)),
    "depthwise": (dict(in_channels=5, out_channels=10, kernel_size=3, padding=1, groups=5, gate_groups=2),
                  (2, 5, 6, 7)),
}


# ---- relaxed forward and gradients ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relaxed_conv_equals_the_literal_formula_with_gradients(name, dtype):
    kwargs, shape = CONVS[name]
    torch.manual_seed(1)
    layer = GatedConv2d(**kwargs).to(dtype)
    random_log_alpha(layer, seed=len(name))
    net = gaussian(layer, step=5)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = net(x)
    eps = eps_of(out.shape, SEED, stream_id(Domain.GAUSSIAN, 5, 0)).to(dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = conv_literal(layer, x_ref, layer.p_logit_per_channel(), eps)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    assert (out - F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                           layer.groups)).abs().mean() > 0.05  # the noise is there
    grad = torch.randn_like(out)
    params = [layer.weight, layer.bias, layer.p_logit]
    got = torch.autograd.grad(out, [x, *params], grad)
    want = torch.autograd.grad(ref, [x_ref, *params], grad)
    for g, w, what in zip(got, want, ("x", "weight", "bias", "log alpha")):
        assert g.abs().sum() > 0, what
        torch.testing.assert_close(g, w, **tol, msg=lambda m, what=what: f"grad of {what}: {m}")


@pytest.mark.parametrize("leading", [(4,), (2, 3)])
def test_relaxed_linear_equals_the_literal_formula_with_gradients(leading):
    torch.manual_seed(2)
    layer = GatedLinear(7, 5, gate_groups=3).double()
    random_log_alpha(layer, seed=7)
    net = gaussian(layer, step=11)
    x = torch.randn(*leading, 7, dtype=torch.float64, requires_grad=True)
    out = net(x)
    assert out.shape == (*leading, 5)
    eps = eps_of(out.shape, SEED, stream_id(Domain.GAUSSIAN, 11, 0))
    ref = linear_literal(layer, x, layer.p_logit_per_channel(), eps)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(out)
    params = [x, layer.weight, layer.bias, layer.p_logit]
    for g, w in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_relaxed_conv_on_channels_last_and_non_contiguous_inputs():
    torch.manual_seed(3)
    layer = GatedConv2d(4, 6, 3, padding=1, gate_groups=2).double()
    random_log_alpha(layer, seed=3)
    net = gaussian(layer, step=2)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    want = net(x)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), want, rtol=1e-9, atol=1e-10)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not transposed.is_contiguous()
    torch.testing.assert_close(net(transposed), want, rtol=1e-9, atol=1e-10)


def test_streams_per_step_and_gate_layer_index():
    torch.manual_seed(4)
    net = nn.Sequential(GatedConv2d(3, 4, 3, padding=1), nn.ReLU(), GatedConv2d(4, 4, 1))
    set_posterior(net, "gaussian")
    for step in (0, 7):
        set_gates(net, "relaxed", seed=SEED, step=step)
        assert [layer.gate_stream for _, layer in gated_layers(net)] == [
            stream_id(Domain.GAUSSIAN, step, 0), stream_id(Domain.GAUSSIAN, step, 1)]
    x = torch.randn(2, 3, 5, 5)
    set_gates(net, "relaxed", seed=SEED, step=1)
    a = net(x)
    set_gates(net, "relaxed", seed=SEED, step=2)
    assert not torch.allclose(a, net(x))
    set_gates(net, "relaxed", seed=SEED, step=1)
    assert torch.equal(a, net(x))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_row_offset_draws_what_the_concatenated_batch_would(kind):
    """Data parallel: rank r's rows with row_offset = r * B equal rows r*B.. of one process's batch."""
    torch.manual_seed(5)
    if kind == "conv":
        layer, x = GatedConv2d(3, 5, 3, padding=1, gate_groups=[2, 1]).double(), torch.randn(6, 3, 5, 4).double()
    else:  # leading dims: an example is a [3, in] block of rows
        layer, x = GatedLinear(4, 3).double(), torch.randn(6, 3, 4).double()
    random_log_alpha(layer, seed=5)
    whole = gaussian(layer, step=9)(x)
    for rank in range(3):
        rows = slice(2 * rank, 2 * rank + 2)
        part = gaussian(layer, step=9, row_offset=2 * rank)(x[rows])
        torch.testing.assert_close(part, whole[rows], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gaussian(layer, step=9)(x[2:4]), whole[2:4])  # the offset matters
    if kind == "conv":  # an unbatched [C, H, W] input is one example: row_offset r gives row r's draw
        torch.testing.assert_close(gaussian(layer, step=9, row_offset=3)(x[3]), whole[3], rtol=1e-12, atol=1e-12)


# ---- clipping -------------------------------------------------------------------------------------
def test_log_alpha_is_clipped_to_plus_minus_8():
    torch.manual_seed(6)
    layer = GatedConv2d(4, 3, 3, padding=1, gate_groups=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        layer.p_logit.copy_(torch.tensor([12.0, -30.0, 8.0, 0.5], dtype=torch.float64))
    net = gaussian(layer, step=1)
    out = net(x)
    eps = eps_of(out.shape, SEED, stream_id(Domain.GAUSSIAN, 1, 0))
    clipped = torch.tensor([8.0, -8.0, 8.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(out, conv_literal(layer, x, clipped, eps), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.log_alpha_per_channel(), clipped)
    (grad,) = torch.autograd.grad(out.square().sum(), layer.p_logit)
    assert grad[0] == 0 and grad[1] == 0 and grad[3] != 0  # beyond the clip, log alpha gets no gradient


def test_clip_log_alpha_puts_logits_back_where_they_train_again():
    layer = GatedConv2d(4, 3, 3, padding=1, gate_groups=1)
    concrete = GatedLinear(4, 2, gate_groups=1)
    with torch.no_grad():
        layer.p_logit.copy_(torch.tensor([12.0, -30.0, 8.0, 0.5]))
        concrete.p_logit.copy_(torch.tensor([12.0, -30.0, 8.0, 0.5]))
    net = gaussian(layer, step=1)
    x = torch.randn(2, 4, 5, 5)
    (frozen,) = torch.autograd.grad(net(x).square().sum(), layer.p_logit)
    assert frozen[0] == 0 and frozen[1] == 0  # beyond the clip: no gradient, ever
    clip_log_alpha_(nn.Sequential(net, concrete))
    assert torch.equal(layer.p_logit.detach(), torch.tensor([8.0, -8.0, 8.0, 0.5]))
    assert torch.equal(concrete.p_logit.detach(), torch.tensor([12.0, -30.0, 8.0, 0.5]))  # concrete: unbounded
    (moving,) = torch.autograd.grad(net(x).square().sum(), layer.p_logit)
    assert (moving != 0).all()  # on the limit the clip passes the gradient


def test_candidates_and_reported_p_read_the_clipped_log_alpha():
    """Training draws its noise from log alpha clipped to +-8; candidates, p, the random baseline's
    rate and the logged mean p use the same clipped values (p = alpha / (1 + alpha))."""
    def net_with(logits, family):
        conv = GatedConv2d(len(logits), 2, 1, gate_groups=1)
        with torch.no_grad():
            conv.p_logit.copy_(torch.tensor(logits))
        net = nn.Sequential(conv)
        set_posterior(net, family)
        return net

    # 4096 channels at log alpha 9: p 0.99988 unclipped against 0.99966 clipped, so that over 8
    # candidates the kept channels (u < 1 - p) of the two differ
    beyond, on_limit = net_with([9.0] * 4096, "gaussian"), net_with([8.0] * 4096, "gaussian")
    masks = stacked_candidate_masks(beyond, SEED, range(8))["0"]
    assert torch.equal(masks, stacked_candidate_masks(on_limit, SEED, range(8))["0"])
    assert not torch.equal(masks, stacked_candidate_masks(net_with([9.0] * 4096, "concrete"), SEED, range(8))["0"])

    logits = [12.0, -30.0, 8.0, 0.5]
    net, clipped = net_with(logits, "gaussian"), torch.tensor([8.0, -8.0, 8.0, 0.5])
    torch.testing.assert_close(net[0].p, torch.sigmoid(clipped), rtol=0, atol=0)
    torch.testing.assert_close(net[0].drop_logit_per_channel(), clipped, rtol=0, atol=0)
    mean_p = torch.sigmoid(clipped).mean().item()
    assert mean_drop_probability(net) == pytest.approx(mean_p, rel=1e-6)
    assert torch.sigmoid(uniform_drop_logits(net)["0"]).mean().item() == pytest.approx(mean_p, rel=1e-6)
    record = architecture_record(net, {"0": torch.ones(4)}, config={"preset": "p", "posterior": "gaussian"}, seed=0,
                                 candidate={"id": 0, "score": 0.5, "kept_fraction": 1.0}, test_accuracy=None,
                                 size={"params": 1, "macs": 1})
    assert record["layers"][0]["p"] == pytest.approx(torch.sigmoid(clipped).tolist(), rel=1e-6)


# ---- full and hard modes --------------------------------------------------------------------------
def test_full_mode_is_the_plain_layer_and_hard_masks_come_from_p():
    torch.manual_seed(7)
    conv = GatedConv2d(6, 4, 3, padding=1, groups=2, gate_groups=[2, 4])
    random_log_alpha(conv, low=-3.0, high=3.0, seed=8)
    linear = GatedLinear(4, 3)
    random_log_alpha(linear, low=-3.0, high=3.0, seed=9)
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    set_posterior(net, "gaussian")
    x = torch.randn(3, 6, 5, 5)
    set_gates(net, "full")
    plain = F.linear(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1, groups=2)).mean((2, 3)),
                     linear.weight, linear.bias)
    torch.testing.assert_close(net(x), plain)
    for candidate in (0, 5):
        set_gates(net, "hard", seed=SEED, candidate=candidate)
        keeps = []
        for index, layer in enumerate((conv, linear)):
            u = ops.philox_uniform(layer.gate_channels, seed=SEED, stream=stream_id(Domain.CANDIDATE, candidate, index))
            p = torch.exp(layer.p_logit_per_channel()) / (1 + torch.exp(layer.p_logit_per_channel()))  # alpha/(1+alpha)
            keep = (u + p.detach() < 1.0).float()
            assert torch.equal(layer.gate_mask, keep)
            keeps.append(keep)
        hidden = F.relu(F.conv2d(x * keeps[0].view(1, -1, 1, 1), conv.weight, conv.bias, padding=1, groups=2))
        torch.testing.assert_close(net(x), F.linear(hidden.mean((2, 3)) * keeps[1], linear.weight, linear.bias))
        assert torch.equal(net(x), net(x))  # a candidate is deterministic
    assert (torch.cat(keeps) == 0).any() and (torch.cat(keeps) == 1).any()


# ---- the network KL -------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = GatedConv2d(3, 8, 3, padding=1)
        self.conv2 = GatedConv2d(8, 6, (3, 1), padding=1, groups=2, gate_groups=[2, 2, 4])
        self.depthwise = GatedConv2d(6, 6, 3, groups=6)
        self.head = GatedLinear(6, 5, gate_groups=4)

    def forward(self, x):
        x = F.relu(self.depthwise(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_network_kl_equals_the_closed_formula_with_gradients():
    torch.manual_seed(8)
    model = Net()
    for seed, (_, layer) in enumerate(gated_layers(model)):
        random_log_alpha(layer, low=-10.0, high=10.0, seed=seed)  # some beyond the clip
    set_posterior(model, "gaussian")
    n_train = 777.0
    kl = network_regularizer(model, weight_reg=3.0, n_train=n_train)
    want = 0.0
    for _, layer in gated_layers(model):
        # every weight counts once: W[o, j, k] multiplies input channel group(o) * C_in/G + j
        per_channel = layer.weight.shape[0] // getattr(layer, "groups", 1) * math.prod(layer.weight.shape[2:])
        want = want + per_channel * kl_literal(layer.p_logit_per_channel()).sum() / n_train
    torch.testing.assert_close(kl, want.float() if kl.dtype == torch.float32 else want)
    assert kl > 0
    # no L2 on the weights in this family: weight_reg and drop_reg do not enter
    assert network_regularizer(model, weight_reg=0.0, drop_reg=5.0, n_train=n_train).item() == kl.item()
    assert network_regularizer(model, n_train=n_train).item() == kl.item()  # so weight_reg may be left out
    logits = [layer.p_logit for _, layer in gated_layers(model)]
    got = torch.autograd.grad(kl, logits)
    ref = torch.autograd.grad(want, logits)
    for g, w, layer in zip(got, ref, (m for _, m in gated_layers(model))):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-8)
        assert torch.equal(g == 0, layer.p_logit.detach().abs() > 8)  # clipped entries: no gradient
    assert all(w.grad is None for w in (model.conv1.weight, model.head.weight))


def test_network_regularizer_follows_the_family():
    model = Net()
    concrete = network_regularizer(model, weight_reg=2.0, n_train=100.0)
    set_posterior(model, "gaussian")
    assert network_regularizer(model, weight_reg=2.0, n_train=100.0) != concrete
    set_posterior(model, "concrete")
    assert network_regularizer(model, weight_reg=2.0, n_train=100.0) == concrete
    with pytest.raises(ValueError, match="the concrete family needs weight_reg"):
        network_regularizer(model, n_train=100.0)


# ---- set_posterior --------------------------------------------------------------------------------
def test_set_posterior_validates_and_applies_to_every_layer():
    model = Net()
    assert POSTERIORS == ("concrete", "gaussian")
    assert posterior_of(model) == "concrete"  # the default
    set_posterior(model, "gaussian")
    assert {layer.posterior for _, layer in gated_layers(model)} == {"gaussian"} == {posterior_of(model)}
    assert "posterior=gaussian" in repr(model.conv1)
    for bad in ("bernoulli", "Gaussian", None):
        with pytest.raises(ValueError, match=f"posterior family must be one of concrete, gaussian; got {bad!r}"):
            set_posterior(model, bad)
    with pytest.raises(ValueError, match="no gated layers"):
        set_posterior(nn.Linear(2, 2), "gaussian")
    model.head.posterior = "concrete"
    with pytest.raises(ValueError, match=r"mixes posterior families \['concrete', 'gaussian'\]"):
        network_regularizer(model, weight_reg=1.0, n_train=10.0)


def test_concrete_layers_are_unchanged_by_the_family_machinery():
    """A concrete layer in relaxed mode still gates with Domain.TRAIN streams (and ignores Gaussian noise)."""
    torch.manual_seed(9)
    layer = GatedConv2d(3, 4, 3, padding=1)
    net = nn.Sequential(layer)
    set_gates(net, "relaxed", seed=SEED, step=4)
    assert layer.gate_stream == stream_id(Domain.TRAIN, 4, 0)
    x = torch.randn(2, 3, 5, 5)
    gated = ops.gated_apply(x, layer.p_logit_per_channel(), seed=SEED, stream=stream_id(Domain.TRAIN, 4, 0))
    torch.testing.assert_close(net(x), F.conv2d(gated, layer.weight, layer.bias, padding=1))


def test_the_state_dict_carries_the_posterior_family(tmp_path):
    """p_logit means a drop logit or log alpha: a Gaussian network's state loads as Gaussian (it loaded
    as concrete, and regularised as such), through torch.save too; a state dict saved before the
    family was kept still loads strictly, and the layers keep their own family."""
    gaussian = Net()
    set_posterior(gaussian, "gaussian")
    torch.save(gaussian.state_dict(), tmp_path / "state.pt")
    fresh = Net()
    assert posterior_of(fresh) == "concrete"
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert posterior_of(fresh) == "gaussian"
    assert network_regularizer(fresh, n_train=100.0).item() == network_regularizer(gaussian, n_train=100.0).item()
    older = {key: value for key, value in Net().state_dict().items() if not key.endswith("posterior_index")}
    fresh.load_state_dict(older)  # strict
    assert posterior_of(fresh) == "gaussian"
    with pytest.raises(RuntimeError, match=r"conv1.posterior_index must index a posterior family"):
        fresh.load_state_dict({**older, "conv1.posterior_index": torch.tensor(7)})
