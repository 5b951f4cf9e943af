"""Gated modules (pgnas_fast.nn): gate groups, set_gates modes and their RNG streams, candidate masks,
the network regulariser and shake-shake branch combination.

Oracles recompute gates from the RNG contract (`ops.philox_uniform`) with the formulas of design.md:
relaxed keep = 1 - sigmoid((z + log u - log(1 - u)) / tau) with gate (b, c) at element b * C + c of
stream (TRAIN, step, layer); hard keep = [u + sigmoid(z) < 1] with u from stream (CANDIDATE, id, layer).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from pgnas_fast import ops
from pgnas_fast.nn import (
    GatedConv2d,
    GatedLinear,
    ShakeShake,
    candidate_masks,
    gated_layers,
    network_regularizer,
    set_gates,
    stacked_candidate_masks,
)
from pgnas_fast.ops.streams import Domain, stream_id

SEED = 20240611


# ---- oracles --------------------------------------------------------------------------------------
def per_channel(z: torch.Tensor, sizes) -> torch.Tensor:
    return z.repeat_interleave(torch.tensor(sizes))


def uniforms(rows: int, channels: int, seed: int, stream: int) -> torch.Tensor:
    return ops.philox_uniform(rows * channels, seed=seed, stream=stream).view(rows, channels)


def relaxed_keep(z: torch.Tensor, rows: int, seed: int, stream: int, tau: float = 0.2) -> torch.Tensor:
    u = uniforms(rows, z.shape[0], seed, stream).double()
    return 1.0 - torch.sigmoid((z.double() + torch.log(u) - torch.log1p(-u)) / tau)


def hard_keep(z: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    u = uniforms(1, z.shape[0], seed, stream)[0]
    return (u + torch.sigmoid(z.float()) < 1.0).float()


def neg_entropy(p: torch.Tensor) -> torch.Tensor:
    return p * torch.log(p) + (1.0 - p) * torch.log(1.0 - p)


def layer_reg_literal(weight: torch.Tensor, z: torch.Tensor, groups: int, weight_reg, drop_reg, n_train):
    """weight_reg/N sum_{o,c,k} (1 - p_c) W[o,c,k]^2 + drop_reg/N sum_c H'(p_c), grouped convs included."""
    p = torch.sigmoid(z)
    out_channels, per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // groups
    w_term = 0.0
    for g in range(groups):
        w_g = weight[g * out_per_group:(g + 1) * out_per_group]
        keep_g = 1.0 - p[g * per_group:(g + 1) * per_group]
        w_term = w_term + torch.sum(w_g ** 2 * keep_g.view(1, -1, *([1] * (weight.dim() - 2))))
    return weight_reg / n_train * w_term + drop_reg / n_train * neg_entropy(p).sum()


class Net(nn.Module):
    """Three gated layers (gate-layer indices 0, 1, 2): conv, grouped conv, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = GatedConv2d(3, 8, 3, padding=1)
        self.conv2 = GatedConv2d(8, 6, 3, padding=1, groups=2, gate_groups=[2, 2, 4])
        self.head = nn.Sequential(nn.Flatten(), GatedLinear(6, 5, gate_groups=4))

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(x.mean((2, 3), keepdim=True))


SIZES = {"conv1": [3], "conv2": [2, 2, 4], "head.1": [4, 2]}


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for _, layer in gated_layers(net):
            layer.p_logit.copy_(torch.randn(layer.p_logit.shape) * 0.8)
    return net


def net_oracle(net: Net, x: torch.Tensor, keeps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Net's forward with given keep [B or 1, C] per layer, in plain torch ops."""
    c1, c2, fc = net.conv1, net.conv2, net.head[1]
    k = keeps["conv1"].to(x.dtype)
    h = F.relu(F.conv2d(x * k.view(k.shape[0], -1, 1, 1), c1.weight, c1.bias, padding=1))
    k = keeps["conv2"].to(x.dtype)
    h = F.relu(F.conv2d(h * k.view(k.shape[0], -1, 1, 1), c2.weight, c2.bias, padding=1, groups=2))
    h = h.mean((2, 3))
    return F.linear(h * keeps["head.1"].to(x.dtype), fc.weight, fc.bias)


# ---- gate groups ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gate_groups, sizes",
    [(None, [8]), (3, [3, 3, 2]), (8, [8]), (20, [8]), (1, [1] * 8), ([2, 6], [2, 6]), ((5, 1, 2), [5, 1, 2])],
)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_gate_groups(gate_groups, sizes, kind):
    if kind == "conv":
        layer = GatedConv2d(8, 4, 3, gate_groups=gate_groups, p_init=0.25)
    else:
        layer = GatedLinear(8, 4, gate_groups=gate_groups, p_init=0.25)
    assert layer.p_logit.shape == (len(sizes),) and layer.p_logit.dtype == torch.float32
    assert layer.gate_group_sizes == sizes
    torch.testing.assert_close(layer.p, torch.full((len(sizes),), 0.25))
    with torch.no_grad():
        layer.p_logit.copy_(torch.randn(len(sizes)))
    z = layer.p_logit_per_channel()
    assert z.shape == (8,)
    assert torch.equal(z, per_channel(layer.p_logit.detach(), sizes))
    z.sum().backward()  # the expansion is differentiable: each group gets its channel count
    assert torch.equal(layer.p_logit.grad, torch.tensor(sizes, dtype=torch.float32))
    assert layer.gate_mode == "full"
    assert "gate_groups" in repr(layer)
    # the group index is a non-persistent buffer: the state dict is nn.Conv2d's / nn.Linear's + p_logit and
    # the posterior family
    assert list(layer.state_dict().keys()) == ["weight", "bias", "p_logit", "posterior_index"]


@pytest.mark.parametrize("gate_groups", [0, -2, [2, 5], [], [0, 8], [-1, 9], [4, 4, 1], True, False])
def test_bad_gate_groups(gate_groups):
    with pytest.raises(ValueError, match="gate_groups"):
        GatedConv2d(8, 4, 3, gate_groups=gate_groups)
    with pytest.raises(ValueError, match="gate_groups"):
        GatedLinear(8, 4, gate_groups=gate_groups)


def test_bad_p_init_and_tau():
    for p_init in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="p_init"):
            GatedConv2d(4, 4, 1, p_init=p_init)
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="tau"):
            GatedLinear(4, 4, tau=tau)


def test_gated_layers_order():
    net = Net()
    assert [name for name, _ in gated_layers(net)] == ["conv1", "conv2", "head.1"]


# ---- full ------------------------------------------------------------------------------------------
def test_full_mode_is_plain_layer():
    net = make_net(1)
    x = torch.randn(2, 3, 6, 6)
    conv = net.conv2
    h = torch.randn(2, 8, 5, 5)
    assert torch.equal(conv(h), F.conv2d(h, conv.weight, conv.bias, padding=1, groups=2))
    set_gates(net, "relaxed", seed=SEED, step=3)
    set_gates(net, "full")
    for _, layer in gated_layers(net):
        assert layer.gate_mode == "full" and layer.gate_mask is None
    assert torch.equal(conv(h), F.conv2d(h, conv.weight, conv.bias, padding=1, groups=2))
    ones = {name: torch.ones(1, sum(s)) for name, s in SIZES.items()}
    torch.testing.assert_close(net(x), net_oracle(net, x, ones), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_layers_take_every_argument_of_their_torch_layer(dtype):
    """nn.Conv2d's padding_mode, device and dtype and nn.Linear's device and dtype, positionally as torch
    takes them; the drop logits in the gate math's precision (float64 kept) on the layer's device."""
    torch.manual_seed(7)
    conv = GatedConv2d(4, 3, 3, 1, 1, 1, 1, True, "reflect", "cpu", dtype, gate_groups=2, p_init=0.3)
    linear = GatedLinear(5, 2, True, "cpu", dtype, p_init=0.3)
    for layer in (conv, linear):
        assert layer.weight.dtype == dtype and layer.p_logit.dtype == dtype
        assert layer.p_logit.device == layer.gate_group_index.device == layer.posterior_index.device
    plain = nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect", dtype=dtype)
    plain.load_state_dict({"weight": conv.weight, "bias": conv.bias})
    x = torch.randn(2, 4, 6, 5, dtype=dtype)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=dtype)
    set_gates(conv, "hard", masks={"": mask})
    assert torch.equal(conv(x), plain(x * mask.view(1, -1, 1, 1)))
    assert not torch.equal(conv(x), F.conv2d(x * mask.view(1, -1, 1, 1), conv.weight, conv.bias, padding=1))


# ---- relaxed ---------------------------------------------------------------------------------------
def test_relaxed_layer_equals_gated_apply_then_conv():
    net = make_net(2)
    x = torch.randn(4, 8, 5, 5)
    set_gates(net, "relaxed", seed=SEED, step=7)
    conv = net.conv2  # gate-layer index 1
    stream = stream_id(Domain.TRAIN, 7, 1)
    assert (conv.gate_mode, conv.gate_seed, conv.gate_stream) == ("relaxed", SEED, stream)
    z = conv.p_logit_per_channel().detach()
    gated = ops.gated_apply(x, z, seed=SEED, stream=stream, tau=0.2, mode="relaxed")
    out = conv(x)
    assert torch.equal(out, F.conv2d(gated, conv.weight, conv.bias, padding=1, groups=2))
    keep = relaxed_keep(z, 4, SEED, stream).float()
    torch.testing.assert_close(gated, x * keep.view(4, 8, 1, 1), rtol=1e-6, atol=1e-6)
    # same (seed, step): the same gates; another step or seed: others
    set_gates(net, "relaxed", seed=SEED, step=7)
    assert torch.equal(conv(x), out)
    set_gates(net, "relaxed", seed=SEED, step=8)
    assert not torch.allclose(conv(x), out)
    set_gates(net, "relaxed", seed=SEED + 1, step=7)
    assert not torch.allclose(conv(x), out)


def test_relaxed_network_forward_and_grads_match_oracle():
    net = make_net(3)
    x = torch.randn(3, 3, 6, 6)
    step = 12345
    set_gates(net, "relaxed", seed=SEED, step=step)
    out = net(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()

    zs = {name: layer.p_logit.detach().double().requires_grad_() for name, layer in gated_layers(net)}
    keeps = {
        name: relaxed_keep(per_channel(zs[name], SIZES[name]), 3, SEED, stream_id(Domain.TRAIN, step, index))
        for index, name in enumerate(SIZES)
    }
    dnet = make_net(3).double()
    dnet.load_state_dict(net.state_dict())
    expected = net_oracle(dnet, x.double(), keeps)
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad((expected * g.double()).sum(), list(zs.values()))
    for (name, layer), grad in zip(gated_layers(net), grads):
        assert layer.p_logit.grad.abs().sum() > 0
        torch.testing.assert_close(layer.p_logit.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_relaxed_gates_per_example_shared_over_space():
    conv = GatedConv2d(4, 4, 1, bias=False, gate_groups=1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        conv.p_logit.zero_()
    set_gates(conv, "relaxed", seed=SEED, step=0)  # the model itself is gate layer 0
    keep = conv(torch.ones(6, 4, 3, 3))
    assert torch.equal(keep, keep[:, :, :1, :1].expand_as(keep))
    k = keep[:, :, 0, 0]
    assert len(torch.unique(k)) == 24  # every (example, channel) its own gate
    torch.testing.assert_close(k.double(), relaxed_keep(torch.zeros(4), 6, SEED, stream_id(Domain.TRAIN, 0, 0)),
                               rtol=1e-5, atol=1e-6)


# ---- hard --------------------------------------------------------------------------------------------
def test_candidate_masks_contract():
    net = make_net(4)
    masks = candidate_masks(net, SEED, 17)
    assert list(masks) == ["conv1", "conv2", "head.1"]
    for index, (name, layer) in enumerate(gated_layers(net)):
        z = layer.p_logit_per_channel().detach()
        stream = stream_id(Domain.CANDIDATE, 17, index)
        via_op = ops.gate_keep(z, 1, seed=SEED, stream=stream, mode="hard")[0]
        assert masks[name].dtype == torch.float32 and masks[name].shape == (sum(SIZES[name]),)
        assert torch.equal(masks[name], via_op)
        assert torch.equal(masks[name], hard_keep(z, SEED, stream))
        assert not masks[name].requires_grad
    # reproducible, different across candidate ids, seeds and domains
    again = candidate_masks(net, SEED, 17)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    cat = lambda m: torch.cat(list(m.values()))  # noqa: E731
    assert not torch.equal(cat(masks), cat(candidate_masks(net, SEED, 18)))
    assert not torch.equal(cat(masks), cat(candidate_masks(net, SEED + 1, 17)))
    assert not torch.equal(cat(masks), cat(candidate_masks(net, SEED, 17, domain=Domain.RANDOM_CANDIDATE)))
    # drop probability follows p: p = 0.5 everywhere drops about half of the channels of 300 candidates
    override = {name: torch.zeros(sum(s)) for name, s in SIZES.items()}
    kept = torch.stack([cat(candidate_masks(net, SEED, k, p_logits=override)) for k in range(300)])
    assert kept.mean().item() == pytest.approx(0.5, abs=0.03)


def test_hard_mode_with_candidate():
    net = make_net(5)
    x = torch.randn(4, 3, 6, 6)
    set_gates(net, "hard", seed=SEED, candidate=3)
    masks = candidate_masks(net, SEED, 3)
    for name, layer in gated_layers(net):
        assert layer.gate_mode == "hard"
        assert torch.equal(layer.gate_mask, masks[name])
    out = net(x)
    keeps = {name: m.view(1, -1) for name, m in masks.items()}
    torch.testing.assert_close(out, net_oracle(net, x, keeps), rtol=1e-6, atol=1e-6)
    # the same mask for every example: example b alone gives row b
    torch.testing.assert_close(net(x[2:3]), out[2:3], rtol=1e-5, atol=1e-6)
    # reproducible; a different candidate is a different network
    set_gates(net, "hard", seed=SEED, candidate=3)
    assert torch.equal(net(x), out)
    set_gates(net, "hard", seed=SEED, candidate=4)
    assert not torch.allclose(net(x), out)
    # no gradient to p through a hard mask
    set_gates(net, "hard", seed=SEED, candidate=3)
    net(x).sum().backward()
    for _, layer in gated_layers(net):
        assert layer.p_logit.grad is None or torch.all(layer.p_logit.grad == 0)


def test_hard_mode_explicit_masks():
    net = make_net(6)
    x = torch.randn(2, 3, 5, 5)
    gen = torch.Generator().manual_seed(0)
    masks = {name: (torch.rand(sum(s), generator=gen) < 0.6).float() for name, s in SIZES.items()}
    masks["conv1"] = masks["conv1"].bool()  # any dtype is taken, stored as float32
    set_gates(net, "hard", masks=masks)
    assert net.conv1.gate_mask.dtype == torch.float32
    keeps = {name: m.float().view(1, -1) for name, m in masks.items()}
    torch.testing.assert_close(net(x), net_oracle(net, x, keeps), rtol=1e-6, atol=1e-6)


def test_set_gates_errors():
    net = make_net(7)
    with pytest.raises(ValueError, match="mode"):
        set_gates(net, "soft")
    with pytest.raises(ValueError, match="step"):
        set_gates(net, "relaxed", seed=SEED)
    with pytest.raises(ValueError, match="candidate"):
        set_gates(net, "hard", seed=SEED)
    good = {name: torch.ones(sum(s)) for name, s in SIZES.items()}
    with pytest.raises(ValueError, match="candidate"):
        set_gates(net, "hard", candidate=1, masks=good)
    with pytest.raises(ValueError, match="head.1"):
        set_gates(net, "hard", masks={k: v for k, v in good.items() if k != "head.1"})
    with pytest.raises(ValueError, match="conv2"):
        set_gates(net, "hard", masks={**good, "conv2": torch.ones(7)})
    with pytest.raises(ValueError, match="conv2"):  # [C] or [K, C] only
        set_gates(net, "hard", masks={**good, "conv2": torch.ones(1, 1, 8)})


def test_network_regularizer_matches_literal_formula():
    net = make_net(8)
    weight_reg, drop_reg, n_train = 150.0, 1.0, 5e5
    reg = network_regularizer(net, weight_reg=weight_reg, drop_reg=drop_reg, n_train=n_train)
    assert reg.dim() == 0
    reg.backward()

    groups = {"conv1": 1, "conv2": 2, "head.1": 1}
    leaves, total = [], 0.0
    for name, layer in gated_layers(net):
        w = layer.weight.detach().double().requires_grad_()
        z = layer.p_logit.detach().double().requires_grad_()
        leaves += [w, z]
        total = total + layer_reg_literal(w, per_channel(z, SIZES[name]), groups[name], weight_reg, drop_reg, n_train)
    torch.testing.assert_close(reg.double(), total.detach(), rtol=1e-5, atol=0)
    grads = torch.autograd.grad(total, leaves)
    for k, (_, layer) in enumerate(gated_layers(net)):
        torch.testing.assert_close(layer.weight.grad.double(), grads[2 * k], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(layer.p_logit.grad.double(), grads[2 * k + 1], rtol=1e-4, atol=1e-12)
        assert layer.bias.grad is None
    with pytest.raises(ValueError, match="gated"):
        network_regularizer(nn.Linear(3, 3), weight_reg=1.0, n_train=1.0)


def test_network_regularizer_scales_the_entropy_term_by_drop_reg():
    net = make_net(9)

    def reg(drop_reg):
        return network_regularizer(net, weight_reg=2.0, drop_reg=drop_reg, n_train=100.0).item()

    assert reg(1.0) != pytest.approx(reg(0.0))
    assert reg(0.25) - reg(0.0) == pytest.approx(0.25 * (reg(1.0) - reg(0.0)), rel=1e-5)


# ---- shake-shake -----------------------------------------------------------------------------------
class ShakeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = GatedLinear(4, 4)
        self.shake = ShakeShake()


def manual_shake_weights(module: ShakeShake, batch: int, branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example b: elements 2 S b .. 2 S b + S - 1 forward, the next S backward."""
    u = ops.philox_uniform(2 * batch * branches, seed=module.rng_seed, stream=module.rng_stream)
    e = -torch.log(u).view(batch, 2, branches)
    w = e / e.sum(-1, keepdim=True)
    return w[:, 0], w[:, 1]


def test_shake_shake_eval_is_mean_plus_skip():
    gen = torch.Generator().manual_seed(1)
    shake = ShakeShake().eval()
    ys = [torch.randn(3, 4, 5, 5, generator=gen) for _ in range(3)]
    skip = torch.randn(3, 4, 5, 5, generator=gen)
    torch.testing.assert_close(shake(ys, skip), (ys[0] + ys[1] + ys[2]) / 3 + skip, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(shake(ys[:2]), (ys[0] + ys[1]) / 2, rtol=1e-6, atol=1e-6)


def test_shake_shake_combines_a_skip_of_another_dtype_in_the_branches_dtype():
    """Under autocast a skip may come out float32 beside bfloat16 branches; the op takes one dtype."""
    ys = [torch.randn(4, 3, 2, 2).bfloat16() for _ in range(2)]
    skip = torch.randn(4, 3, 2, 2)
    out = ShakeShake().eval()(ys, skip=skip)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ops.branch_combine(ys, torch.full((2,), 0.5), skip=skip.bfloat16()))


def test_shake_shake_training_needs_set_gates():
    with pytest.raises(RuntimeError, match="set_gates"):
        ShakeShake()([torch.randn(2, 3), torch.randn(2, 3)])


@pytest.mark.parametrize("branches", [2, 3])
def test_shake_shake_forward_weights(branches):
    net = ShakeNet()
    batch = 2000
    set_gates(net, "relaxed", seed=SEED, step=41)
    shake = net.shake
    assert (shake.rng_seed, shake.rng_stream) == (SEED, stream_id(Domain.SHAKE, 41, 0))
    # branch s = basis vector e_s: the output row b is the weight vector of example b
    ys = [F.one_hot(torch.full((batch,), s), branches).float() for s in range(branches)]
    w = shake(ys)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(batch), rtol=0, atol=1e-6)  # convex per example
    forward, backward = manual_shake_weights(shake, batch, branches)
    torch.testing.assert_close(w, forward, rtol=1e-6, atol=1e-7)
    # Dirichlet(1, ..., 1): each marginal is Beta(1, S - 1)
    assert stats.kstest(w[:, 0].numpy(), stats.beta(1, branches - 1).cdf).pvalue > 1e-3
    # reproducible from (seed, step), different at another step or seed
    set_gates(net, "relaxed", seed=SEED, step=41)
    assert torch.equal(shake(ys), w)
    set_gates(net, "relaxed", seed=SEED, step=42)
    assert not torch.allclose(shake(ys), w)
    set_gates(net, "relaxed", seed=SEED + 1, step=41)
    assert not torch.allclose(shake(ys), w)


def test_shake_shake_backward_uses_independent_weights():
    net = ShakeNet()
    set_gates(net, "relaxed", seed=SEED, step=5)
    gen = torch.Generator().manual_seed(2)
    batch, branches = 6, 3
    ys = [torch.randn(batch, 4, 3, 3, generator=gen).requires_grad_() for _ in range(branches)]
    skip = torch.randn(batch, 4, 3, 3, generator=gen).requires_grad_()
    out = net.shake(ys, skip)
    forward, backward = manual_shake_weights(net.shake, batch, branches)
    assert not torch.allclose(forward, backward)
    expected = skip + sum(forward[:, s].view(-1, 1, 1, 1) * ys[s] for s in range(branches))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    for s in range(branches):
        torch.testing.assert_close(ys[s].grad, g * backward[:, s].view(-1, 1, 1, 1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(skip.grad, g, rtol=0, atol=0)


def test_shake_shake_streams_per_module_index():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = ShakeShake(), ShakeShake()

    two = Two()
    set_gates(two, "relaxed", seed=3, step=9)  # no gated layers needed
    assert two.a.rng_stream == stream_id(Domain.SHAKE, 9, 0)
    assert two.b.rng_stream == stream_id(Domain.SHAKE, 9, 1)
    ys = [torch.randn(4, 2) for _ in range(2)]
    assert not torch.allclose(two.a(ys), two.b(ys))


# ---- layouts and shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
def test_channels_last_conv(mode):
    torch.manual_seed(9)
    conv = GatedConv2d(6, 5, 3, padding=1, gate_groups=2)
    with torch.no_grad():
        conv.p_logit.copy_(torch.randn(3))
    kwargs = {"relaxed": dict(step=2), "hard": dict(candidate=1), "full": {}}[mode]
    set_gates(conv, mode, seed=SEED, **kwargs)
    x = torch.randn(3, 6, 7, 7)
    x_cl = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    out, out_cl = conv(x), conv(x_cl)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    gz = torch.autograd.grad((out * g).sum(), (x, conv.p_logit), allow_unused=True)
    gz_cl = torch.autograd.grad((out_cl * g).sum(), (x_cl, conv.p_logit), allow_unused=True)
    torch.testing.assert_close(gz_cl[0], gz[0], rtol=1e-5, atol=1e-5)
    if mode == "relaxed":
        torch.testing.assert_close(gz_cl[1], gz[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["relaxed", "hard"])
def test_gated_linear_leading_dims(mode):
    """[B, T, in]: features (the last dim) are gated, one gate per row like nn.Linear's batching."""
    torch.manual_seed(10)
    lin = GatedLinear(4, 3)
    with torch.no_grad():
        lin.p_logit.fill_(0.0)
    kwargs = {"relaxed": dict(step=1), "hard": dict(candidate=2)}[mode]
    set_gates(lin, mode, seed=SEED, **kwargs)
    x = torch.randn(2, 4, 4)  # T == in_features: a wrong gated dim would go unnoticed by shape
    out = lin(x)
    assert out.shape == (2, 4, 3)
    z = torch.zeros(4)
    if mode == "relaxed":
        keep = relaxed_keep(z, 8, SEED, stream_id(Domain.TRAIN, 1, 0)).float()
    else:
        keep = hard_keep(z, SEED, stream_id(Domain.CANDIDATE, 2, 0)).expand(8, 4)
    expected = F.linear(x.reshape(8, 4) * keep, lin.weight, lin.bias).view(2, 4, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert lin(x[0, 0]).shape == (3,)  # 1-D input, as nn.Linear


@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("posterior", ["concrete", "gaussian"])
def test_an_unbatched_conv_input_is_one_example(mode, posterior):
    """[C, H, W], as nn.Conv2d takes it: the gates act on C (with C == H a gated H would go unnoticed
    by shape) and the result is the batched one's first row."""
    from pgnas_fast.nn import set_posterior

    torch.manual_seed(11)
    conv = GatedConv2d(5, 4, 3, padding=1, gate_groups=2)
    with torch.no_grad():
        conv.p_logit.copy_(torch.randn(3))
    set_posterior(conv, posterior)
    kwargs = {"relaxed": dict(step=2), "hard": dict(masks={"": torch.tensor([1.0, 0, 1, 1, 0])}), "full": {}}[mode]
    set_gates(conv, mode, seed=SEED, **kwargs)
    x = torch.randn(5, 5, 5)
    torch.testing.assert_close(conv(x), conv(x.unsqueeze(0))[0])


def test_gated_layers_name_an_input_of_the_wrong_size():
    """As nn.Conv2d and nn.Linear do: the input's size and in_channels / in_features, in every gate mode
    (GatedLinear reshaped [4, 12] into [8, 6] rows and returned [4, 6])."""
    conv, lin = GatedConv2d(3, 4, 3), GatedLinear(6, 3)
    for mode, kwargs in (("relaxed", dict(step=0)), ("hard", dict(candidate=0)), ("full", {})):
        set_gates(conv, mode, seed=SEED, **kwargs)
        set_gates(lin, mode, seed=SEED, **kwargs)
        with pytest.raises(ValueError, match=r"expected input\[2, 6, 6, 6\] to have 3 channels \(in_channels\)"):
            conv(torch.randn(2, 6, 6, 6))
        with pytest.raises(ValueError, match=r"4-D \[N, C, H, W\] \(or unbatched 3-D \[C, H, W\]\)"):
            conv(torch.randn(2, 1, 3, 6, 6))
        with pytest.raises(ValueError, match=r"expected input\[4, 12\] to have 6 features \(in_features\)"):
            lin(torch.randn(4, 12))


def test_stacked_masks_need_a_batch_of_k_equal_row_groups():
    """K candidates' masks on a batch that is not K row groups: named, not unflatten's error, and not
    [B, T, in] rows regrouped across examples (B = 2 examples, K = 3, B * T = 12 rows)."""
    conv, lin = GatedConv2d(4, 4, 1).eval(), GatedLinear(4, 2).eval()
    for layer in (conv, lin):
        set_gates(layer, "hard", masks=stacked_candidate_masks(layer, SEED, [0, 1, 2]))
    with pytest.raises(ValueError, match="3 equal row groups .* got 4 examples"):
        conv(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="3 equal row groups .* got 2 examples"):
        lin(torch.randn(2, 6, 4))
    assert lin(torch.randn(6, 5, 4)).shape == (6, 5, 2)


def test_stacked_masks_of_different_k_in_two_layers_are_refused():
    """Layers would split one batch into row groups of different sizes: candidate k's rows would meet
    another candidate's masks in the second layer."""
    net = torch.nn.Sequential(GatedConv2d(3, 4, 1), GatedConv2d(4, 2, 1)).eval()
    with pytest.raises(ValueError, match=r"same number of candidates K in every layer, got 2 in '0', 3 in '1'"):
        set_gates(net, "hard", masks={"0": torch.ones(2, 3), "1": torch.ones(3, 4)})
    set_gates(net, "hard", masks={"0": torch.ones(3), "1": torch.ones(3, 4)})  # a [C_in] mask is every row's


@pytest.mark.parametrize("posterior", ["concrete", "gaussian"])
@pytest.mark.parametrize("make, shape", [(lambda: GatedConv2d(6, 5, 3, padding=1, gate_groups=2), (3, 6, 5, 7)),
                                         (lambda: GatedLinear(6, 5, gate_groups=3), (4, 6))])
def test_a_model_cast_to_bfloat16_keeps_its_gate_math_in_float32(posterior, make, shape):
    """model.to(torch.bfloat16) casts the drop logits too: the gates and the regulariser take them in
    float32 (they refused bfloat16 logits), and the result is the float32 layer's on the same values."""
    from pgnas_fast.nn import set_posterior

    torch.manual_seed(3)
    wide = make()
    with torch.no_grad():
        wide.p_logit.copy_(torch.randn_like(wide.p_logit))
    narrow = copy.deepcopy(wide).to(torch.bfloat16)
    with torch.no_grad():  # the float32 layer on bfloat16's values
        for a, b in zip(wide.parameters(), narrow.parameters()):
            a.copy_(b.float())
    x = torch.randn(shape).bfloat16()
    for layer in (wide, narrow):
        set_posterior(layer, posterior)
        set_gates(layer, "relaxed", seed=SEED, step=1)
    out = narrow(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), wide(x.float()), rtol=0.05, atol=0.05)
    regs = [network_regularizer(layer, weight_reg=2.0, n_train=50.0) for layer in (wide, narrow)]
    torch.testing.assert_close(regs[1].float(), regs[0], rtol=0.02, atol=1e-4)
    regs[1].backward()
    assert narrow.p_logit.grad.dtype == torch.bfloat16 and narrow.p_logit.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["relaxed", "hard", "stacked", "full"])
def test_gated_linear_takes_empty_batches_as_nn_linear(mode):
    """[0, F] and [B, 0, F] give [0, O] and [B, 0, O], as nn.Linear (and compat's Linear_with_CD) do."""
    lin = GatedLinear(4, 3)
    kwargs = {"relaxed": dict(step=1), "hard": dict(candidate=0),
              "stacked": dict(masks=stacked_candidate_masks(lin, SEED, [0, 1, 2])), "full": {}}[mode]
    set_gates(lin, "hard" if mode == "stacked" else mode, seed=SEED, **kwargs)
    for shape in ((0, 4), (3, 0, 4)):
        assert lin(torch.randn(shape)).shape == (*shape[:-1], 3)
