"""The paper's super-networks (pgnas-method.md section 3): sizes, gate placement, forward/backward.

Sizes are checked on the real networks (building them is cheap; only `describe` runs one image
through each). Forward and backward run on reduced-width variants with tiny inputs.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pgnas_fast import supernets
from pgnas_fast.nn import GatedConv2d, GatedLinear, gated_layers, set_gates
from pgnas_fast.supernets.densenet import DenseNetSupernet
from pgnas_fast.supernets.enas import DropPath, EnasSupernet
from pgnas_fast.supernets.info import count_macs, describe, largest_activation_bytes
from pgnas_fast.supernets.resnet import InflatedResNet
from pgnas_fast.supernets.shake_shake import ShakeShakeSupernet, TwoPathShortcut



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these many small ops run many times faster without OpenMP hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# name: (input size, paper params, relative tolerance, our exact params, gated layers, p values, MACs range;
# None where one family member's MACs stand for the family)
# Our counts include the drop logits (p values). SupNet-E: the ENAS code's network (aux head
# included) has 4.39M, 4.6% under the 4.6M the papers quote; EI matches (see enas.py). R-50: the
# literal 4-branch inflation has 28.07M, not the supplement's 44.0M (see resnet.py).
SIZES = {
    "supnet-m": (32, 26.2e6, 0.03, 26_192_978, 56, 56, (3e9, 5e9)),
    "supnet-mi": (32, 72.7e6, 0.03, 72_695_250, 56, 56, None),
    "supnet-e": (32, 4.6e6, 0.05, 4_389_483, 263, 263, (4e8, 9e8)),
    "supnet-ei": (32, 15.3e6, 0.03, 15_371_823, 263, 263, None),
    "supnet-d121": (224, 7.98e6, 0.03, 7_979_494, 119, 638, (2.7e9, 3.0e9)),
    "supnet-r50": (224, 44.0e6, None, 28_072_040, 64, 64, (4.1e9, 5e9)),
}

# reduced-width variants for forward/backward: (name, constructor knobs, input side)
TINY = {
    "supnet-m": (dict(k=1), 16),
    "supnet-mi": (dict(k=1, blocks_per_stage=1), 16),
    "supnet-e": (dict(filters=4, num_layers=3, drop_path_keep_prob=1.0), 32),
    "supnet-ei": (dict(filters=2, num_layers=3, drop_path_keep_prob=1.0, aux_head=False), 16),
    "supnet-d121": (dict(growth=4, block_config=(2, 3, 2, 2), stem_width=8), 64),
    "supnet-r50": (dict(base_width=8, layers=(1, 2, 1, 1)), 64),
}


def test_registry_has_every_paper_supernet():
    assert set(SIZES) <= set(supernets.names())


@pytest.mark.parametrize("name", sorted(SIZES))
def test_full_size_matches_paper(name):
    size, paper, tolerance, exact, n_gated, n_p, macs_range = SIZES[name]
    model = supernets.create(name)
    if macs_range is None:  # the big twin of a family: sizes only, no full-size forward
        layers = [layer for _, layer in gated_layers(model)]
        info = {"params": sum(p.numel() for p in model.parameters()), "gated_layers": len(layers),
                "gate_params": sum(layer.p_logit.numel() for layer in layers)}
    else:
        info = describe(model, size)
        assert macs_range[0] < info["macs"] < macs_range[1]
        assert info["input_size"] == [3, size, size]
    assert info["params"] == exact
    if tolerance is not None:
        assert abs(info["params"] - paper) <= tolerance * paper
    assert info["gated_layers"] == n_gated
    assert info["gate_params"] == n_p


def _outputs(model, x):
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_backward_in_every_gate_mode(name):
    torch.manual_seed(0)
    knobs, side = TINY[name]
    model = supernets.create(name, num_classes=7, **knobs)
    x = torch.randn(2, 3, side, side)
    has_aux = isinstance(model, EnasSupernet) and model.aux is not None

    set_gates(model, "relaxed", seed=0, step=0)  # also names the shake-shake / drop-path streams
    model.train()
    outputs = _outputs(model, x)
    assert [o.shape for o in outputs] == [(2, 7)] * (2 if has_aux else 1)
    sum(F.cross_entropy(o, torch.tensor([1, 2])) for o in outputs).backward()
    for layer_name, layer in gated_layers(model):
        assert layer.p_logit.grad is not None and (layer.p_logit.grad != 0).all(), layer_name

    for mode, kwargs in (("hard", dict(candidate=3)), ("full", {})):
        model.zero_grad(set_to_none=True)
        set_gates(model, mode, seed=0, **kwargs)
        outputs = _outputs(model, x)
        sum(o.square().mean() for o in outputs).backward()
        for layer_name, layer in gated_layers(model):
            assert torch.isfinite(layer.weight.grad).all(), layer_name
            assert layer.p_logit.grad is None or (layer.p_logit.grad == 0).all(), layer_name  # gates constant
        model.eval()
        with torch.no_grad():
            logits = model(x)
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
        model.train()


@pytest.mark.parametrize("name, knobs, message", [
    ("digits-tiny", {"width": 0}, "digits super-network: width must be an int >= 1, got 0"),
    ("digits-tiny", {"in_channels": 0}, "digits super-network: in_channels must be an int >= 1, got 0"),
    ("supnet-m", {"k": 0}, "shake-shake super-network: k must be an int >= 1, got 0"),
    ("supnet-mi", {"blocks_per_stage": 0}, "blocks_per_stage must be an int >= 1, got 0"),
    ("supnet-e", {"filters": 0}, "ENAS super-network: filters must be an int >= 1, got 0"),
    ("supnet-d121", {"block_config": ()}, "block_config must be a non-empty list of ints >= 1, got ()"),
    ("supnet-d121", {"block_config": (6, 0)}, "block_config must be a non-empty list of ints >= 1, got (6, 0)"),
    ("supnet-r50", {"layers": ()}, "ResNet super-network: layers must be a non-empty list of ints >= 1"),
    # a list where an int goes, and the reverse (they failed inside range() or tuple())
    ("supnet-m", {"blocks_per_stage": [1, 1, 1]}, "blocks_per_stage must be an int >= 1, got [1, 1, 1]"),
    ("supnet-r50", {"layers": 3}, "layers must be a non-empty list of ints >= 1, got 3"),
    ("supnet-d121", {"block_config": 6}, "block_config must be a non-empty list of ints >= 1, got 6"),
])
def test_zero_widths_and_depths_are_refused_by_name(name, knobs, message):
    """They built networks without blocks, or failed later in torch with an unrelated message."""
    with pytest.raises(ValueError, match=re.escape(message)):
        supernets.create(name, **knobs)


def test_a_gated_layer_needs_an_input_channel():
    with pytest.raises(ValueError, match="GatedConv2d: a gated layer needs at least one input channel, got 0"):
        GatedConv2d(0, 3, 1)


def test_shake_shake_layout():
    model = ShakeShakeSupernet(k=6)
    shortcuts = [m for m in model.modules() if isinstance(m, TwoPathShortcut)]
    assert [s.stride for s in shortcuts] == [1, 2, 2]  # 16 -> 96 widens, then the two reductions
    assert [stage[0].branches[0][1].out_channels for stage in model.stages] == [96, 192, 384]
    assert all(layer.p_logit.numel() == 1 for _, layer in gated_layers(model))
    assert isinstance(model.stem[0], GatedConv2d) and isinstance(model.classifier, GatedLinear)
    assert len(gated_layers(ShakeShakeSupernet(k=6, gate_stem=False))) == 55


def test_enas_cells_concat_unused_nodes():
    model = EnasSupernet(filters=36)
    assert model.reduction_layers == (5, 11) and len(model.cells) == 17
    widths = [cell.out_channels for cell in model.cells]
    assert widths == [180] * 5 + [288] + [360] * 5 + [576] + [720] * 5  # normal 5F, reduce 4F
    # depthwise convs and pools carry no gate; every pointwise does
    for cell in model.cells:
        for op in cell.ops:
            for m in op.modules():
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    assert not isinstance(m, GatedConv2d)
                elif isinstance(m, nn.Conv2d):
                    assert isinstance(m, GatedConv2d)
    assert not any(isinstance(m, GatedConv2d) for m in model.aux.modules())


def test_enas_aux_head_contract():
    model = EnasSupernet(filters=2, num_layers=3, num_classes=5)
    set_gates(model, "relaxed", seed=1, step=0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, aux_logits = model.train()(x)  # training: (logits, aux_logits)
        assert logits.shape == aux_logits.shape == (1, 5)
        assert model.eval()(x).shape == (1, 5)  # eval: logits only
        model.aux = None  # what aux_head=False builds
        assert model.train()(x).shape == (1, 5)


def test_enas_drop_path_rate_schedule_and_determinism():
    model = EnasSupernet(filters=4, num_layers=3, drop_path_keep_prob=0.6)
    drops = [m for m in model.modules() if isinstance(m, DropPath)]
    deepest = max(m.drop_prob for m in drops)
    assert deepest == pytest.approx(0.4)  # keep 0.6 at the last cell, less dropped earlier
    assert min(m.drop_prob for m in drops) == pytest.approx(0.4 * 1 / 5)
    model.set_drop_path_progress(0.5)
    assert max(m.drop_prob for m in drops) == pytest.approx(0.2)
    model.set_drop_path_progress(1.0)

    x = torch.ones(64, 3, 4, 4)
    path = drops[-1].train()
    set_gates(model, "relaxed", seed=7, step=3)
    a, b = path(x), path(x)
    assert torch.equal(a, b)  # the (seed, step) stream fixes the masks
    kept = a[:, 0, 0, 0]
    assert torch.allclose(kept[kept != 0], torch.tensor(1 / 0.6))  # kept paths rescaled by 1 / keep
    assert 0 < (kept == 0).sum() < 64
    set_gates(model, "relaxed", seed=7, step=4)
    assert not torch.equal(path(x), a)
    assert torch.equal(path.eval()(x), x)


@pytest.mark.parametrize("progress, factor", [(-0.5, 0.0), (-1e-9, 0.0), (0.0, 0.0), (0.25, 0.25), (1.0, 1.0),
                                              (1.0 + 1e-9, 1.0), (1.7, 1.0), (1e6, 1.0)])
def test_enas_drop_path_progress_is_clamped_to_the_unit_interval(progress, factor):
    """set_drop_path_progress takes ENAS's min(1, (step + 1) / total steps) and clamps whatever it is
    given to [0, 1]: below 0 nothing drops (never a negative rate), past 1 the full rate (never more,
    so a kept path is never rescaled by more than 1 / keep)."""
    keep = 0.6
    model = EnasSupernet(filters=2, num_layers=3, drop_path_keep_prob=keep, aux_head=False)
    drops = [m for m in model.modules() if isinstance(m, DropPath)]
    full = [(1.0 - keep) * m.layer_scale for m in drops]
    assert len(set(full)) > 1 and max(full) == pytest.approx(1.0 - keep)  # (deeper cells drop more)
    model.set_drop_path_progress(progress)
    assert [m.drop_prob for m in drops] == [factor * f for f in full]  # (exactly: a product of the same factors)
    assert all(0.0 <= m.drop_prob <= 1.0 - keep for m in drops)
    model.set_drop_path_progress(1.0)  # and back: the clamp kept no state
    assert [m.drop_prob for m in drops] == full

    # in a forward pass: past 1, the deepest path still keeps with probability 0.6, rescaled by 1 / 0.6
    model.set_drop_path_progress(progress)
    path = max(drops, key=lambda m: m.layer_scale).train()
    set_gates(model, "relaxed", seed=3, step=1)
    x = 1.0 + torch.rand(256, 2, 2, 2, generator=torch.Generator().manual_seed(9))
    kept = path(x)[:, 0, 0, 0] / x[:, 0, 0, 0]
    if factor == 0.0:
        assert torch.equal(path(x), x)
    else:
        rate = (1.0 - keep) * factor
        torch.testing.assert_close(kept[kept != 0], torch.full_like(kept[kept != 0], 1.0 / (1.0 - rate)))


def _enas_cell(arc):
    from pgnas_fast.supernets.enas import Cell

    return Cell(arc, 4, 4, 4, reduction=False, reduce_prev=False, layer_scale=0.5,
                gate_kw=dict(gate_groups=None, p_init=0.1, tau=0.2, backend=None), backend=None)


def _chain_arc(n_nodes: int, x_op: int = 0, y_op: int = 4) -> list[int]:
    """Node k reads the newest state it may: k + 1 (the node before it, or cell input 1 for node 0),
    and cell input 0."""
    return [entry for k in range(n_nodes) for entry in (k + 1, x_op, 0, y_op)]


@pytest.mark.parametrize("n_nodes", [1, 2, 5])
def test_enas_arc_inputs_up_to_the_previous_node_are_accepted(n_nodes):
    """The largest input a node may read is the node just before it (node k: index k + 1); such an
    arc builds, concatenates its one unread node and runs."""
    cell = _enas_cell(_chain_arc(n_nodes))
    assert cell.inputs == [i for k in range(n_nodes) for i in (k + 1, 0)]
    assert cell.concat == [n_nodes + 1] and cell.out_channels == 4
    gen = torch.Generator().manual_seed(n_nodes)
    s0, s1 = torch.randn(2, 4, 5, 5, generator=gen), torch.randn(2, 4, 5, 5, generator=gen)
    with torch.no_grad():
        assert cell.eval()(s0, s1).shape == (2, 4, 5, 5)


@pytest.mark.parametrize("node, entry, value", [
    (0, 0, 2), (0, 2, 2),  # node 0 reading itself (x and y)
    (1, 0, 3), (1, 2, 3),  # node 1 reading itself
    (2, 0, 5), (4, 2, 6), (4, 0, 7), (0, 0, 99),  # a later node or past every state
    (0, 0, -1), (4, 2, -1), (2, 0, -3),  # negative indices (Python would read states from the end)
])
def test_enas_arc_inputs_out_of_range_are_refused(node, entry, value):
    arc = _chain_arc(5)
    arc[4 * node + entry] = value
    with pytest.raises(ValueError, match=r"node inputs must index the two cell inputs or earlier nodes"):
        _enas_cell(arc)
    with pytest.raises(ValueError, match=r"node inputs must index"):  # the super-network passes it on
        EnasSupernet(filters=2, num_layers=3, normal_arc=tuple(arc), aux_head=False)


@pytest.mark.parametrize("op", [-1, 5, 17])
def test_enas_arc_unknown_ops_are_refused(op):
    for entry in (1, 3):  # the x op and the y op
        arc = _chain_arc(2)
        arc[4 + entry] = op
        with pytest.raises(ValueError, match=rf"unknown ENAS op {op}; ops are 0..4 = sep3x3, sep5x5, avgpool3x3, "
                                             r"maxpool3x3, identity"):
            _enas_cell(arc)


@pytest.mark.parametrize("length", [3, 5, 6, 19, 21, 22])
def test_enas_arc_of_a_length_no_multiple_of_4_is_refused(length):
    arc = _chain_arc(6)[:length]
    with pytest.raises(ValueError, match=rf"an arc has 4 entries per node, got {length} entries"):
        _enas_cell(arc)


def test_densenet_gate_groups_follow_the_concatenation():
    model = DenseNetSupernet()
    first_block = model.features[0]
    assert first_block.layers[0].conv1.gate_group_sizes == [64]
    assert first_block.layers[2].conv1.gate_group_sizes == [64, 32, 32]
    assert first_block.layers[0].conv2.gate_group_sizes == [128]
    transition = model.features[1][2]
    assert transition.gate_group_sizes == [64] + [32] * 6 and transition.out_channels == 128
    assert type(model.classifier) is nn.Linear


def test_inflated_resnet_branches():
    model = InflatedResNet()
    branches = model.stages[1][0].conv2.branches
    assert [(b.kernel_size, b.dilation, b.stride, b.out_channels) for b in branches] == [
        ((1, 1), (1, 1), (2, 2), 32), ((3, 3), (1, 1), (2, 2), 32),
        ((3, 3), (2, 2), (2, 2), 32), ((5, 5), (2, 2), (2, 2), 32)]
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and not isinstance(m, GatedConv2d)
                   for m in model.modules())


def test_inflated_resnet_zero_init_residual_is_opt_in():
    """supernet_args {"zero_init_residual": true}: every bottleneck starts as its shortcut (its last
    BatchNorm's scale 0), as torchvision's option; off by default, as the paper says nothing of it."""
    from pgnas_fast.supernets.resnet import Bottleneck

    for zero in (False, True):
        torch.manual_seed(0)
        model = InflatedResNet(num_classes=5, base_width=8, layers=(1, 2, 1, 1), zero_init_residual=zero)
        scales = [m.bn3.weight for m in model.modules() if isinstance(m, Bottleneck)]
        assert len(scales) == 5 and all(bool((s == 0).all()) == zero for s in scales)


def test_largest_activation_bytes_by_hand():
    model = nn.Sequential(GatedConv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), GatedLinear(8 * 4 * 4, 5))
    assert largest_activation_bytes(model, (3, 8, 8)) == 8 * 4 * 4 * 4  # the conv's [8, 4, 4] float32 output
    assert largest_activation_bytes(model.double(), (3, 8, 8)) == 8 * 4 * 4 * 8
    convs = nn.Sequential(GatedConv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert largest_activation_bytes(convs, (3, 16, 16)) == 8 * 8 * 8 * 4  # the [8, 8, 8] output, not [2, 8, 8]
    assert model.training  # (one eval-mode pass; the mode given back)
    set_gates(model.float(), "hard", masks={"0": torch.ones(2, 3), "3": torch.ones(2, 128)})  # 2 candidates' masks
    assert largest_activation_bytes(model, (3, 8, 8)) == 8 * 4 * 4 * 4  # measured with full gates
    assert model[0].gate_mode == "hard" and model[0].gate_mask.shape == (2, 3)  # and given back


def test_count_macs_of_grouped_and_depthwise_convs_counts_each_group_s_inputs():
    """(SupNet-E's separable convs: counting every input channel would over-count them C times)"""
    assert count_macs(nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 8, 8)) == 64 * 4 * 9
    assert count_macs(nn.Conv2d(6, 4, 1, groups=2), (6, 5, 5)) == 25 * 4 * 3


def test_the_two_path_shortcut_s_second_path_reads_the_pixels_the_first_skips():
    """Gastaldi's shift: path 2 at output (i, j) reads input pixel (s i + 1, s j + 1)."""
    shortcut = TwoPathShortcut(1, 2, 2, {})
    with torch.no_grad():
        shortcut.path1.weight.fill_(1.0)
        shortcut.path2.weight.fill_(2.0)
    shortcut.eval()  # (BatchNorm at its initial statistics: the identity, up to eps)
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    out = shortcut(x) * (1 + 1e-5) ** 0.5
    torch.testing.assert_close(out[0, 0], x[0, 0, ::2, ::2])
    torch.testing.assert_close(out[0, 1], 2 * torch.tensor([[6.0, 8.0], [14.0, 16.0]]))  # x[1::2, 1::2]


def test_blocks_of_widths_they_cannot_split_are_refused():
    from pgnas_fast.supernets.resnet import InflatedConv

    with pytest.raises(ValueError, match="two-path shortcut needs an even output width, got 7"):
        TwoPathShortcut(4, 7, 2, {})
    with pytest.raises(ValueError, match="inflated conv needs an output width divisible by 4, got 6"):
        InflatedConv(6, 6, 1, {})


def test_drop_path_in_training_needs_its_random_stream():
    drop = DropPath(0.5).train()
    drop.drop_prob = 0.3  # (what EnasSupernet sets from the training's progress)
    with pytest.raises(RuntimeError, match=r"DropPath in training mode needs set_gates\(model, 'relaxed'"):
        drop(torch.randn(2, 3, 4, 4))
    x = torch.randn(2, 3, 4, 4)
    assert drop.eval()(x) is x and "layer_scale=0.500, drop_prob=0.300" in repr(drop)


@pytest.mark.parametrize("input_size", [(3, 8, 8, 8), (8,)])
def test_a_size_of_neither_two_nor_three_numbers_is_refused(input_size):
    message = f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        describe(supernets.create("digits-tiny"), input_size)


def test_unbuildable_settings_are_refused_when_the_network_is_built():
    with pytest.raises(ValueError, match=r"drop_path_keep_prob must be in \(0, 1\], got 0.0"):
        EnasSupernet(filters=4, num_layers=3, drop_path_keep_prob=0.0)
    from pgnas_fast.supernets.digits import DigitsSupernet

    with pytest.raises(ValueError, match=r"branches must be a non-empty list"):
        DigitsSupernet(branches=())


def test_count_macs_by_hand_and_describe_restores_gates():
    model = nn.Sequential(GatedConv2d(3, 8, 3, padding=1, stride=2), nn.Flatten(), GatedLinear(8 * 4 * 4, 5))
    assert count_macs(model, (8, 8)) == 8 * 4 * 4 * 3 * 9 + 128 * 5
    set_gates(model, "hard", masks={"0": torch.zeros(3), "2": torch.ones(128)})
    model.train()
    info = describe(model, 8)
    assert info == {"params": sum(p.numel() for p in model.parameters()), "gated_layers": 2, "gate_params": 2,
                    "macs": 8 * 4 * 4 * 3 * 9 + 128 * 5, "input_size": [3, 8, 8]}
    assert model[0].gate_mode == "hard" and model.training
    assert torch.equal(model[0].gate_mask, torch.zeros(3))
