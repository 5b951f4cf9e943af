"""The found architecture as a network: materialized subnets equal the masked super-network in eval
mode for every family, export writes a torch.export artefact that plain torch loads, and evaluate
reproduces the reported test accuracy."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast import configs, supernets
from pgnas_fast.cli import main
from pgnas_fast.nn import GatedConv2d, GatedLinear, candidate_masks, gated_layers, set_gates
from pgnas_fast.search import run_search
from pgnas_fast.search.materialize import (MaskedConv2d, SlicedConv2d, SlicedLinear, ZeroInput, materialize,
                                          materialize_all_channels)
from pgnas_fast.supernets.info import count_parameters

TINY = {  # family: (constructor knobs, input side, input channels)
    "digits-tiny": (dict(), 8, 1),
    "supnet-m": (dict(k=1), 16, 3),
    "supnet-mi": (dict(k=1, blocks_per_stage=1), 16, 3),
    "supnet-e": (dict(filters=4, num_layers=3, drop_path_keep_prob=0.6), 32, 3),
    "supnet-d121": (dict(growth=4, block_config=(2, 3, 2, 2), stem_width=8), 64, 3),
    "supnet-r50": (dict(base_width=8, layers=(1, 2, 1, 1)), 64, 3),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(name):
    knobs, side, channels = TINY[name]
    torch.manual_seed(0)
    model = supernets.create(name, num_classes=7, p_init=0.4, **knobs).eval()
    for module in model.modules():  # running statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(3, channels, side, side)


@pytest.mark.parametrize("name", sorted(TINY))
def test_materialized_subnet_equals_the_masked_supernet(name):
    model, x = _tiny(name)
    masks = candidate_masks(model, 5, 3)
    assert 0 < sum(m.sum() for m in masks.values()) < sum(m.numel() for m in masks.values())
    set_gates(model, "hard", masks=masks)
    with torch.no_grad():
        expected = model(x)
    subnet = materialize(model, masks)
    assert not any(isinstance(m, (GatedConv2d, GatedLinear)) for m in subnet.modules())
    assert count_parameters(subnet) < count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), expected, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(subnet, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["digits-tiny", "supnet-e", "supnet-r50"])
def test_a_float64_super_network_materializes_in_float64(name):
    """The sliced and plain layers take the super-network's dtype (and device), not torch's defaults."""
    model, x = _tiny(name)
    model, x = model.double(), x.double()
    masks = candidate_masks(model, 5, 3)
    set_gates(model, "hard", masks=masks)
    with torch.no_grad():
        expected = model(x)
    subnet = materialize(model, masks)
    assert {t.dtype for t in [*subnet.parameters(), *subnet.buffers()] if t.is_floating_point()} == {torch.float64}
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_channel_is_the_full_super_network_without_training_only_parts(name):
    """A candidate's size is compared with this: the super-network's function, without its drop logits
    and training-only heads (ENAS's auxiliary head)."""
    model, x = _tiny(name)
    all_channels = materialize_all_channels(model)
    set_gates(model, "full")
    with torch.no_grad():
        torch.testing.assert_close(all_channels(x), model(x), rtol=1e-5, atol=1e-5)
    dropped = sum(layer.p_logit.numel() for _, layer in gated_layers(model))
    dropped += count_parameters(model.aux) if getattr(model, "aux", None) is not None else 0
    assert count_parameters(all_channels) <= count_parameters(model) - dropped


def test_a_channels_last_super_network_exports_contiguous_weights(tmp_path):
    """A run's evaluation layout (channels_last weights) does not leak into the export as a mix of
    layouts; torch.export.save then has no non-contiguous weight to warn about."""
    import warnings

    model, x = _tiny("supnet-r50")
    model = model.to(memory_format=torch.channels_last)
    masks = candidate_masks(model, 1, 2)
    set_gates(model, "hard", masks=masks)
    with torch.no_grad():
        expected = model(x)
    subnet = materialize(model, masks)
    assert all(p.is_contiguous() for p in subnet.parameters())
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(subnet, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.export.save(program, tmp_path / "model.pt2")


def test_a_run_that_feeds_only_a_deleted_layer_goes_whole():
    """A shake-shake branch whose second conv keeps nothing: its first conv, BN and ReLU feed nobody
    (they stayed, computed and counted); the deleted layer still gives the right output size."""
    model, x = _tiny("supnet-m")
    masks = {name: torch.ones(layer.gate_channels) for name, layer in gated_layers(model)}
    whole = count_parameters(materialize(model, masks))
    masks["stages.1.0.branches.0.4"] = torch.zeros(32)
    set_gates(model, "hard", masks=masks)
    with torch.no_grad():
        expected = model(x)
    subnet = materialize(model, masks)
    branch = subnet.stages[1][0].branches[0]
    assert [type(m).__name__ for m in list(branch)[1:5]] == ["Identity", "Identity", "Identity", "ZeroInput"]
    assert sum(count_parameters(m) for m in list(branch)[:5]) == 0  # the first conv held 4,608 + 32
    assert count_parameters(subnet) < whole - model.stages[1][0].branches[0][1].weight.numel()
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), expected, rtol=1e-5, atol=1e-5)


def test_all_that_feeds_a_deleted_layer_in_its_sequential_goes():
    """ENAS's separable op (ReLU - depthwise - gated pointwise - BN, twice) whose second pointwise keeps
    nothing: the first half went too, not only the run back to the first pointwise (the first half's
    gather, ReLU and depthwise conv computed a map only its size was read from)."""
    model, _ = _tiny("supnet-e")
    sep = next(name for name, m in model.named_modules() if type(m).__name__ == "SepConv")
    masks = candidate_masks(model, 5, 3)
    masks[f"{sep}.6"] = torch.zeros_like(masks[f"{sep}.6"])
    subnet = materialize(model, masks)
    assert [type(m).__name__ for m in subnet.get_submodule(sep)][:7] == ["Identity"] * 6 + ["ZeroInput"]
    set_gates(model, "hard", masks=masks)
    for side in (32, 31):  # (an odd side: the reduction cells' strided sizes must come out the same)
        x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            torch.testing.assert_close(subnet(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_deleted_layer_keeps_the_map_size_of_the_strides_and_pools_it_absorbed():
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        GatedConv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(3, 2, padding=1), torch.nn.AvgPool2d(2), GatedConv2d(8, 5, 3, dilation=2, padding=1)).eval()
    masks = {"0": torch.ones(3), "5": torch.zeros(8)}
    subnet = materialize(net, masks)
    assert [type(m).__name__ for m in subnet] == ["Identity"] * 5 + ["ZeroInput"]
    set_gates(net, "hard", masks=masks)
    for side in (37, 40, 45):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            torch.testing.assert_close(subnet(x), net(x))


def _batchnorm(channels):
    bn = torch.nn.BatchNorm2d(channels)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return bn


class _SharedConv(torch.nn.Module):
    """One conv in two Sequentials, each with its own BatchNorm, feeding a gated conv."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a, self.b = torch.nn.Sequential(conv, _batchnorm(4)), torch.nn.Sequential(conv, _batchnorm(4))
        self.g = GatedConv2d(4, 2, 1)

    def forward(self, x):
        return self.g(self.a(x) + self.b(x))


class _OneLayerTwoNames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p1 = self.p2 = GatedConv2d(4, 4, 1)

    def forward(self, x):
        return self.p1(x) + self.p2(x)


@pytest.mark.parametrize("net, masks, side", [
    (_SharedConv, {"g": [1.0, 0, 1, 0]}, 3),  # (folded twice into one conv, and sliced for one reader)
    (_SharedConv, {"g": [0.0, 0, 0, 0]}, 3),
    (_OneLayerTwoNames, {"p1": [1.0, 0, 0, 1]}, 4),  # (was sliced under its first name only)
])
def test_a_module_held_in_two_places_materializes_for_both(net, masks, side):
    torch.manual_seed(5)
    net, masks = net().eval(), {name: torch.tensor(mask) for name, mask in masks.items()}
    subnet = materialize(net, masks)
    assert not any(isinstance(m, (GatedConv2d, GatedLinear)) for m in subnet.modules())
    set_gates(net, "hard", masks=masks)
    x = torch.randn(2, side, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), net(x))


def test_a_materialized_network_takes_one_unbatched_map_as_its_gated_layers_do():
    torch.manual_seed(6)
    net = torch.nn.Sequential(GatedConv2d(3, 6, 3, padding=1), torch.nn.ReLU(), GatedConv2d(6, 4, 3, padding=1),
                              GatedConv2d(4, 4, 3, groups=2, padding=1), GatedConv2d(4, 5, 3)).eval()
    masks = {"0": torch.tensor([1.0, 0, 1]), "2": torch.tensor([1.0, 1, 0, 1, 0, 1]),
             "3": torch.tensor([1.0, 0, 1, 1]), "4": torch.zeros(4)}  # sliced, grouped (masked) and deleted layers
    subnet = materialize(net, masks)
    set_gates(net, "hard", masks=masks)
    for x in (torch.randn(3, 6, 7), torch.randn(2, 3, 6, 7)):
        with torch.no_grad():
            got, want = subnet(x), net(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_training_only_modules_leave_the_subnet():
    """ENAS's auxiliary head never runs in evaluation: not in the network, its size or its export."""
    model, x = _tiny("supnet-e")
    assert model.aux is not None
    masks = {name: torch.ones(layer.gate_channels) for name, layer in gated_layers(model)}
    subnet = materialize(model, masks)
    assert subnet.aux is None and not any("aux" in key for key in subnet.state_dict())
    set_gates(model, "hard", masks=masks)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.__setitem__("classifier", m["classifier"][None]), r"masks\['classifier'\] must have shape \[32\], "
                                                                    r"got \(1, 32\)"),
    (lambda m: m.__setitem__("classifier", m["classifier"][:-1]), r"must have shape \[32\], got \(31,\)"),
    (lambda m: m.pop("classifier"), r"masks has no entry for gated layers \['classifier'\]"),
    (lambda m: m.__setitem__("classifier", m["classifier"] * 2), r"masks\['classifier'\] must hold only 0"),
])
def test_materialize_checks_the_masks(change, message):
    """A stacked [1, C] mask (what stacked_candidate_masks gives) read its row index as channels."""
    model, _ = _tiny("digits-tiny")
    masks = candidate_masks(model, 5, 3)
    change(masks)
    with pytest.raises(ValueError, match=message):
        materialize(model, masks)


def test_a_layer_that_keeps_nothing_and_a_grouped_conv():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = GatedConv2d(4, 6, 3, padding=1, groups=2)
            self.dropped = GatedConv2d(6, 5, 1)
            self.head = GatedLinear(5, 3)

        def forward(self, x):
            return self.head(self.dropped(torch.relu(self.grouped(x))).mean((2, 3)))

    torch.manual_seed(1)
    net = Net().eval()
    masks = {"grouped": torch.tensor([1.0, 0.0, 1.0, 1.0]), "dropped": torch.zeros(6), "head": torch.ones(5)}
    set_gates(net, "hard", masks=masks)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = net(x)
        subnet = materialize(net, masks)
        torch.testing.assert_close(subnet(x), expected)
    assert isinstance(subnet.grouped, MaskedConv2d) and isinstance(subnet.dropped, ZeroInput)
    # with "dropped" keeping everything the grouped conv's masked output reaches the result
    kept = {**masks, "dropped": torch.ones(6)}
    subnet = _equals_the_hard_masked(net, kept, x)
    assert isinstance(subnet.grouped, MaskedConv2d) and type(subnet.dropped) is pf.nn.Conv2d  # (no gather)
    assert type(subnet.head) is torch.nn.Linear


def _equals_the_hard_masked(net, masks, x):
    """materialize(net, masks), checked to compute what `net` does with those hard masks."""
    net.eval()
    set_gates(net, "hard", masks=masks)
    with torch.no_grad():
        expected = net(x)
        subnet = materialize(net, masks)
        torch.testing.assert_close(subnet(x), expected, rtol=1e-5, atol=1e-5)
    set_gates(net, "full")
    return subnet


def test_a_sliced_linear_reads_the_last_dim_of_any_leading_dims():
    torch.manual_seed(3)
    _equals_the_hard_masked(torch.nn.Sequential(GatedLinear(5, 3)), {"0": torch.tensor([1.0, 0, 1, 1, 0])},
                            torch.randn(2, 4, 5))


def test_densenet_conv1_computes_only_what_conv2_reads():
    torch.manual_seed(0)
    model = supernets.create("supnet-d121", num_classes=7, p_init=0.4, growth=4, block_config=(2, 3, 2, 2),
                             stem_width=8).eval()
    masks = candidate_masks(model, 5, 3)
    subnet = _equals_the_hard_masked(model, masks, torch.randn(2, 3, 32, 32))
    checked = 0
    for name, layer in subnet.named_modules():
        if type(layer).__name__ == "DenseLayer" and masks[f"{name}.conv1"].sum() > 0:
            assert type(layer.conv2) is pf.nn.Conv2d  # the channel gather moved out of conv2 into conv1
            assert layer.conv1.conv.out_channels == layer.conv2.in_channels == int(masks[f"{name}.conv2"].sum())
            checked += 1
    assert checked > 0


def test_a_materialized_network_holds_no_stochastic_module():
    """Drop-path and shake-shake modules become plain ones: the subnet needs no pgnas_fast module."""
    from pgnas_fast.nn import ShakeShake, StochasticModule

    torch.manual_seed(0)
    for model in (supernets.create("supnet-e", num_classes=7, p_init=0.4, filters=4, num_layers=3,
                                   drop_path_keep_prob=0.6),
                  supernets.create("digits-tiny", num_classes=10)):
        subnet = materialize(model.eval(), candidate_masks(model, 5, 3))
        assert not any(isinstance(m, (StochasticModule, ShakeShake)) for m in subnet.modules())


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_search(configs.resolve("digits-tiny", {"epochs": 3, "candidates": 20, "random_baseline": 0}), seed=4,
               out_dir=out, progress=False)
    return out


def test_export_and_evaluate_reproduce_the_reported_test_accuracy(capsys, searched, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(searched), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    arch = json.loads((searched / "architecture.json").read_text())
    exported = json.loads((out / "export.json").read_text())
    assert exported["candidate"] == arch["candidate"] and exported["test_accuracy"] == arch["test_accuracy"]
    assert exported["posterior"] == arch["posterior"] == "concrete"
    assert exported["checkpoint_epoch"] == exported["epochs"] == 3  # the weights' epoch, of how many
    assert exported["params_subnet"] < exported["params_all_channels"] < exported["params_supernet"]
    assert exported["macs_subnet"] < exported["macs_all_channels"]
    assert "every channel kept -> this candidate: parameters" in printed
    assert "exported to" in printed
    assert main(["evaluate", str(out), "--split", "test"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last) == pytest.approx(arch["test_accuracy"], abs=1e-6)
    subnet = pf.load_subnet(out)
    assert count_parameters(subnet) == exported["params_subnet"]
    from pgnas_fast.search.export import evaluate_export

    assert evaluate_export(out, standalone=False) == pytest.approx(arch["test_accuracy"], abs=1e-6)


def test_standalone_artefact_needs_no_pgnas_fast(capsys, searched, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(searched), "--candidate", "7", "--out", str(out)]) == 0
    assert "note: candidate" not in capsys.readouterr().err  # (one the search ranked)
    assert main(["export", str(searched), "--candidate", "99999", "--out", str(tmp_path / "far")]) == 0
    assert ("note: candidate 99999 is past the 20 the search ranked (ids 0 .. 19): a draw of the same posterior "
            "that no ranking has scored") in capsys.readouterr().err
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = (f"import sys, torch; m = torch.export.load({str(out / 'model.pt2')!r}).module(); "
              f"y = m(torch.load({str(tmp_path / 'x.pt')!r})); torch.save(y, {str(tmp_path / 'y.pt')!r}); "
              "assert 'pgnas_fast' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), pf.load_subnet(out)(x))
    assert json.loads((out / "architecture.json").read_text())["candidate"] == 7


def test_export_json_says_how_raw_images_become_the_network_s_input(searched, tmp_path):
    """A user of model.pt2 outside pgnas_fast gets the input transform from export.json: applied to
    scikit-learn's raw digits it gives the run's own network inputs, and the export's test accuracy."""
    from sklearn.datasets import load_digits

    from pgnas_fast.search.run import load_data

    out = tmp_path / "export"
    assert main(["export", str(searched), "--out", str(out)]) == 0
    recipe = json.loads((out / "export.json").read_text())["inputs"]
    assert recipe["pixels"].startswith("scikit-learn's load_digits().images") and recipe["scale"] == 1.0
    assert json.loads((out / "export.json").read_text())["classes"] == [str(digit) for digit in range(10)]
    raw = torch.from_numpy(load_digits().images).float()[:, None]
    mean, std = (torch.tensor(recipe[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    inputs = (raw * recipe["scale"] - mean) / std
    config = json.loads((searched / "config.json").read_text())["config"]
    test_images = load_data(config).test[0]  # the run's inputs: each is one of the transformed images
    distance = torch.cdist(test_images.flatten(1), inputs.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(1).values.max() < 1e-5
    test = distance.argmin(1)  # the test split's images among the raw ones
    labels = torch.from_numpy(load_digits().target)[test]
    network = torch.export.load(out / "model.pt2").module()
    with torch.no_grad():
        accuracy = (network(inputs[test]).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(json.loads((out / "export.json").read_text())["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["export", "/nonexistent/run", "--out", "OUT"], "is not a run directory"),
    (["export", "RUN", "--candidate", str(1 << 40), "--out", "OUT"], "--candidate: must be an integer < 1099511627776"),
    (["export", "RUN", "--candidate", "-1", "--out", "OUT"], "--candidate: must be an integer >= 0"),
    (["evaluate", "/nonexistent/export"], "is not an export directory"),
    (["export", "RUN", "--out", "RUN"], "--out must not be the run directory"),
    (["export", "RUN", "--rank", "search", "--out", "OUT"],
     "rank-search/ holds the search's own ranking log, not a `pgnas-fast rank`; the search's best candidate is the "
     "run's architecture.json, taken without --rank"),
])
def test_export_and_evaluate_bad_input(capsys, searched, tmp_path, argv, message):
    argv = [str(searched) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists(), "nothing is left behind"


def test_export_of_an_unfinished_search_needs_a_candidate_and_load_subnet_an_export(capsys, searched, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(searched, run)
    (run / "architecture.json").unlink()  # (as before the search's ranking finished)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert (f"{str(run)!r} has no architecture.json (the search did not finish): pass --candidate"
            in capsys.readouterr().err)
    assert main(["export", str(run), "--candidate", "3", "--out", str(tmp_path / "out")]) == 0
    assert pf.load_subnet(tmp_path / "out")(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(FileNotFoundError, match=f"{str(run)!r} is not an export directory: subnet.pt is missing"):
        pf.load_subnet(run)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_a_cuda_device_without_one_is_refused(capsys, searched, tmp_path):
    assert main(["export", str(searched), "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert ("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_export_into_another_run_directory_is_refused(capsys, searched, tmp_path):
    other = tmp_path / "other-run"
    shutil.copytree(searched, other)
    before = {name: (other / name).read_bytes() for name in ("config.json", "architecture.json")}
    assert main(["export", str(searched), "--candidate", "7", "--out", str(other)]) == 2
    assert "holds a search run (checkpoint.pt)" in capsys.readouterr().err
    assert {name: (other / name).read_bytes() for name in before} == before
    # an earlier export's directory takes a new export
    assert main(["export", str(searched), "--candidate", "7", "--out", str(tmp_path / "export")]) == 0
    assert main(["export", str(searched), "--candidate", "8", "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "architecture.json").read_text())["candidate"] == 8
    # an empty directory takes one too; hidden files (a desktop's .DS_Store) do not count
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    assert main(["export", str(searched), "--candidate", "7", "--out", str(tmp_path / "empty")]) == 0
    capsys.readouterr()


def test_export_into_a_directory_of_other_files_or_a_training_is_refused(capsys, searched, tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    for name in ("notes.txt", "b.txt", "c.txt", "d.txt", "config.json"):
        (documents / name).write_text(name)
    assert main(["export", str(searched), "--candidate", "7", "--out", str(documents)]) == 2
    assert ("holds other files (b.txt, c.txt, config.json and 2 more): export into a new or empty directory, or "
            "over an earlier export") in capsys.readouterr().err
    assert (documents / "config.json").read_text() == "config.json" and len(list(documents.iterdir())) == 5
    # a candidate's training (pgnas-fast train's directory): its trained network stays
    training = tmp_path / "train-inherited"
    training.mkdir()
    for name in ("settings.json", "train_log.jsonl", "candidate-checkpoint.pt", "export.json"):
        (training / name).write_text("{}")
    assert main(["export", str(searched), "--candidate", "7", "--out", str(training)]) == 2
    assert ("holds a candidate's training (candidate-checkpoint.pt): the export would replace its trained network"
            in capsys.readouterr().err)
    assert sorted(entry.name for entry in training.iterdir()) == sorted(
        ("settings.json", "train_log.jsonl", "candidate-checkpoint.pt", "export.json"))


def test_an_export_directory_taken_again_holds_only_the_new_export_s_files(capsys, searched, tmp_path):
    """A data.json left by an export of a run that read --data-dir would make evaluate read that data."""
    out = tmp_path / "export"
    assert main(["export", str(searched), "--candidate", "7", "--out", str(out)]) == 0
    (out / "data.json").write_text(json.dumps({"data_dir": str(tmp_path / "cifar"), "fingerprint": "0" * 16}))
    assert main(["export", str(searched), "--candidate", "8", "--out", str(out)]) == 0
    assert not (out / "data.json").exists()
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0


def test_evaluate_of_an_export_mixing_two_exports_files_is_a_one_line_error(capsys, searched, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(searched), "--out", str(out)]) == 0
    summary = json.loads((out / "export.json").read_text())
    (out / "export.json").write_text(json.dumps({**summary, "input_size": [3, 32, 32]}))  # another export's
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "takes images of [3, 32, 32] (export.json), its config.json's data set gives [1, 8, 8]" in err
    assert err.count("\n") == 1


def test_export_into_the_run_directory_leaves_the_search_s_architecture(capsys, searched):
    before = (searched / "architecture.json").read_bytes()
    assert main(["export", str(searched), "--candidate", "7", "--out", str(searched / ".")]) == 2
    assert "--out must not be the run directory" in capsys.readouterr().err
    assert (searched / "architecture.json").read_bytes() == before


def test_evaluate_of_a_corrupt_artefact_is_a_one_line_error(capsys, searched, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(searched), "--out", str(out)]) == 0
    (out / "model.pt2").write_bytes((out / "model.pt2").read_bytes()[:500])
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.pt2' is not a readable torch.export program" in err and err.count("\n") == 1


def test_export_refuses_an_incompatible_checkpoint(capsys, searched, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(searched, broken)
    state = torch.load(broken / "checkpoint.pt", weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if "classifier" not in k}
    torch.save(state, broken / "checkpoint.pt")
    assert main(["export", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "does not fit the digits-tiny super-network" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"cand', "architecture.json' is malformed (JSONDecodeError"),
    ('{"score": 0.5}', "architecture.json' is malformed (KeyError"),
    ('{"candidate": "abc"}', "architecture.json' names candidate 'abc', not an id in [0, 2^40): pass --candidate"),
    ('{"candidate": -3}', "architecture.json' names candidate -3, not an id in [0, 2^40): pass --candidate"),
])
def test_export_of_a_corrupt_architecture_is_a_one_line_error(capsys, searched, tmp_path, content, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(searched, broken)
    (broken / "architecture.json").write_text(content)
    assert main(["export", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_gated_layer_names_survive_in_the_architecture(searched):
    arch = json.loads((searched / "architecture.json").read_text())
    model = supernets.create("digits-tiny", num_classes=10)
    assert [layer["name"] for layer in arch["layers"]] == [name for name, _ in gated_layers(model)]


def test_producers_lose_the_channels_nobody_reads_and_batchnorm_folds():
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        GatedConv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        GatedConv2d(8, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3, padding=1, groups=6), GatedConv2d(6, 4, 1)).eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    cases = {
        "middle": {"0": torch.ones(3), "3": torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 1]), "7": torch.tensor([1.0, 0, 1, 0, 1, 1])},
        "first keeps nothing": {"0": torch.zeros(3), "3": torch.tensor([0.0, 1, 1, 0, 0, 0, 0, 1]), "7": torch.ones(6)},
    }
    for case, masks in cases.items():
        set_gates(net, "hard", masks=masks)
        with torch.no_grad():
            expected = net(x)
            subnet = materialize(net, masks)
            torch.testing.assert_close(subnet(x), expected, rtol=1e-5, atol=1e-5, msg=case)
        # BatchNorms that directly follow a conv are folded (after a layer that keeps nothing, one stays)
        batchnorms = [m for m in subnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(batchnorms) == (case != "middle"), case
        if batchnorms:  # the one after the layer that keeps nothing: only the channels "3" keeps
            assert batchnorms[0].num_features == int(masks["3"].sum()), case
        depthwise = [m for m in subnet.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        kept = int(masks["7"].sum())  # only the channels "7" reads
        assert depthwise[0].out_channels == depthwise[0].in_channels == depthwise[0].groups == kept, case
        assert depthwise[0].weight.shape[0] == kept, case
    convs = [m for m in materialize(net, cases["middle"]).modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == 5  # conv "0" computes only what conv "3" keeps
    unfolded = materialize(net, cases["middle"], fold_batchnorm=False)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules()) == 2


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_a_layer_with_string_padding_that_keeps_nothing(padding):
    """nn.Conv2d's padding="same"/"valid": a deleted layer's output size from either (materialize
    refused them, for the candidates that drop every input channel of such a layer only)."""
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              GatedConv2d(4, 5, 3, padding=padding, dilation=2),
                              GatedConv2d(5, 2, 3, padding=padding)).eval()
    x = torch.randn(2, 3, 9, 7)
    for kept in (torch.ones(4), torch.zeros(4)):
        subnet = _equals_the_hard_masked(net, {"3": kept, "4": torch.tensor([1.0, 0, 1, 1, 0])}, x)
    assert isinstance(subnet[3], ZeroInput)


def test_batchnorms_without_statistics_and_of_sync_bn_training_slice_and_fold():
    """A BatchNorm with track_running_stats=False between a producer and its sliced consumer is sliced
    (it crashed on its missing statistics); the SyncBatchNorm that sync_bn training puts in the model
    slices and folds as BatchNorm2d does (summary.json counted its parameters against export's)."""
    torch.manual_seed(5)

    def net(norm):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), norm(6), torch.nn.ReLU(),
                                   GatedConv2d(6, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).eval()

    masks = {"3": torch.tensor([1.0, 0, 1, 1, 0, 1])}
    x = torch.randn(3, 3, 5, 5)
    subnet = _equals_the_hard_masked(net(lambda c: torch.nn.BatchNorm2d(c, track_running_stats=False)), masks, x)
    assert subnet[1].num_features == 4 and subnet[1].weight.shape == (4,)
    plain = net(torch.nn.BatchNorm2d)
    for module in plain.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    folded = _equals_the_hard_masked(synced, masks, x)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert count_parameters(folded) == count_parameters(materialize(plain, masks))


def test_export_of_a_ranking_keeps_its_recalibrated_batchnorm(capsys, searched, tmp_path):
    """`export --rank TAG` takes that ranking's best candidate and the BatchNorm statistics it was
    scored with: the export's held-out accuracy is the ranking's score, in the torch.export artefact
    too; without recalibration the same candidate's network is another."""
    assert main(["rank", str(searched), "--candidates", "20", "--strategy", "exhaustive", "--bn-recalibrate", "64",
                 "--tag", "bn", "--quiet"]) == 0
    ranking = json.loads((searched / "rank-bn" / "summary.json").read_text())
    best = ranking["best"]
    assert ranking["posterior"] == "concrete"
    capsys.readouterr()
    assert main(["export", str(searched), "--rank", "bn", "--out", str(tmp_path / "bn")]) == 0
    assert "BatchNorm statistics recomputed for the candidate from 64 training images" in capsys.readouterr().out
    exported = json.loads((tmp_path / "bn" / "export.json").read_text())
    assert (exported["candidate"], exported["bn_recalibrate"], exported["rank_tag"]) == (best["id"], 64, "bn")
    assert exported["heldout_accuracy"] == pytest.approx(best["score"], abs=1e-9)
    assert main(["evaluate", str(tmp_path / "bn"), "--split", "heldout"]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(best["score"], abs=5e-7)  # (printed with 6 decimals)

    assert main(["export", str(searched), "--candidate", str(best["id"]), "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "export.json").read_text())["bn_recalibrate"] == 0
    from pgnas_fast.nn.batchnorm import recalibrate_batchnorm

    untracked = torch.nn.Sequential(GatedConv2d(1, 3, 3), torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"BatchNorm '1' keeps no running statistics \(track_running_stats=False\)"):
        recalibrate_batchnorm(untracked, torch.randn(4, 1, 8, 8))
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        recalibrated, plain = pf.load_subnet(tmp_path / "bn")(x), pf.load_subnet(tmp_path / "plain")(x)
    assert (recalibrated - plain).abs().max() > 1e-3
    # an explicit --bn-recalibrate wins over the ranking's
    zero = tmp_path / "zero"
    capsys.readouterr()
    assert main(["export", str(searched), "--rank", "bn", "--bn-recalibrate", "0", "--out", str(zero)]) == 0
    assert ("note: --rank bn scored its candidates with --bn-recalibrate 64, this export uses 0: its held-out "
            "accuracy is not the ranking's score") in capsys.readouterr().err  # (said)
    with torch.no_grad():
        torch.testing.assert_close(pf.load_subnet(zero)(x), plain)
    assert main(["export", str(searched), "--rank", "bn", "--bn-recalibrate", "64", "--out", str(zero)]) == 0
    assert "note: --rank" not in capsys.readouterr().err  # (the ranking's own: nothing to say)


@pytest.mark.parametrize("argv, message", [
    (["--rank", "none"], "names no finished ranking of this run"),
    (["--rank", "none", "--candidate", "3"], "argument --candidate: not allowed with argument --rank"),
    (["--bn-recalibrate", "100000"], "--bn-recalibrate 100000 asks for more images than the run's"),
    (["--bn-recalibrate", "-1"], "--bn-recalibrate: must be an integer >= 0"),
])
def test_export_recalibration_bad_input(capsys, searched, tmp_path, argv, message):
    assert main(["export", str(searched), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists(), "nothing is left behind"


def test_a_gated_layer_on_its_own_materializes():
    """The model is itself the gated layer (mask name ''): it becomes the plain layer, not the gated
    one copied in whatever gate mode it was left."""
    torch.manual_seed(4)
    x = torch.randn(2, 4, 5, 5)
    for layer, masks, kind in ((GatedConv2d(4, 3, 3), {"": torch.tensor([1.0, 0, 1, 1])}, SlicedConv2d),
                               (GatedConv2d(4, 4, 3, groups=2), {"": torch.tensor([1.0, 0, 1, 1])}, MaskedConv2d),
                               (GatedConv2d(4, 3, 3), {"": torch.zeros(4)}, ZeroInput)):
        set_gates(layer, "relaxed", seed=1, step=0)  # left relaxed: a copy of it would still draw gates
        subnet = _equals_the_hard_masked(layer, masks, x)
        assert isinstance(subnet, kind)
    lin = GatedLinear(5, 3)
    set_gates(lin, "relaxed", seed=1, step=0)
    assert isinstance(_equals_the_hard_masked(lin, {"": torch.tensor([1.0, 0, 1, 1, 0])}, torch.randn(2, 4, 5)),
                      SlicedLinear)


def test_a_stochastic_module_of_the_user_s_own_is_kept_in_eval_mode():
    """materialize replaces the stochastic modules it knows (shake-shake, drop-path) by their plain
    evaluation forms; another StochasticModule keeps its own eval forward (it was replaced by an
    nn.Identity: a scale dropped silently, a module of two inputs a TypeError at call time)."""
    from pgnas_fast.nn import StochasticModule
    from pgnas_fast.ops import Domain

    class Scale(StochasticModule):
        rng_domain = Domain.DROP_PATH

        def forward(self, x):
            return 0.5 * x

    class Mix(StochasticModule):
        rng_domain = Domain.SHAKE

        def forward(self, a, b):
            return a + b

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.scale, self.mix = GatedConv2d(3, 3, 1), Scale(), Mix()

        def forward(self, x):
            return self.mix(self.scale(self.conv(x)), x)

    torch.manual_seed(5)
    subnet = _equals_the_hard_masked(Net(), {"conv": torch.tensor([1.0, 0, 1])}, torch.randn(2, 3, 4, 4))
    assert isinstance(subnet.scale, Scale) and not subnet.scale.training
    torch.export.export(subnet, (torch.randn(2, 3, 4, 4),))


def test_a_gated_layer_materialize_cannot_slice_is_named():
    from pgnas_fast.nn import GatedInput

    class GatedConv1d(GatedInput, torch.nn.Conv1d):
        def __init__(self):
            torch.nn.Conv1d.__init__(self, 4, 4, 3)
            self._init_gates(4, None, 0.1, 0.2, None)

    with pytest.raises(TypeError, match=r"not the gated layers \['0: GatedConv1d'\]"):
        materialize(torch.nn.Sequential(GatedConv1d()), {"0": torch.ones(4)})


def test_export_of_a_ranking_refuses_weights_trained_on_since(capsys, searched, tmp_path):
    """`rank` takes a run that is still training and `search --resume` keeps its rank-* directories:
    the ranking's best and score are of the old weights (rank --resume refuses the same)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(searched, run)
    assert main(["rank", str(run), "--candidates", "6", "--strategy", "exhaustive", "--tag", "old", "--quiet"]) == 0
    assert main(["rank", str(run), "--candidates", "2", "--strategy", "exhaustive", "--max-params", "1000000000",
                 "--tag", "budgeted", "--quiet"]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["epoch"] += 1  # what a search --resume leaves after training one more epoch
    torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["export", str(run), "--rank", "old", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ranked the checkpoint of epoch 3, but the run has trained on since (epoch 4)" in err
    # the command that ranks the same again, with the ranking's own settings
    assert f"rank again (pgnas-fast rank {run} --tag old --candidates 6 --strategy exhaustive)" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    # a budget other than the run's (it has none) is part of the command
    assert main(["export", str(run), "--rank", "budgeted", "--out", str(tmp_path / "out")]) == 2
    assert (f"rank again (pgnas-fast rank {run} --tag budgeted --candidates 2 --strategy exhaustive --max-params "
            "1000000000)") in capsys.readouterr().err


class _ProducerAlsoReadBare(torch.nn.Module):
    """A stem inside the Sequential that feeds a gated conv, and read bare by forward as well."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Sequential(self.stem, torch.nn.ReLU(), GatedConv2d(8, 4, 3, padding=1))

    def forward(self, x):
        return self.a(x).mean((2, 3)) + self.stem(x).mean((1, 2, 3))[:, None]


def test_a_producer_read_bare_elsewhere_keeps_the_channels_its_gated_reader_drops():
    """The gated conv drops 4 of the stem's 8 channels, but forward reads all 8 of them bare: pruning the
    stem to 4 would change that read (outputs off by 0.07)."""
    torch.manual_seed(0)
    net = _ProducerAlsoReadBare().eval()
    masks = {"a.2": torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0])}
    subnet = materialize(net, masks)
    assert subnet.stem.weight.shape[0] == 8
    set_gates(net, "hard", masks=masks)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), net(x))


def test_a_ceil_mode_pool_before_a_deleted_layer_stays_a_module():
    """A ceil_mode pool's output size is not the floor formula ZeroInput computes (7x7 -> 4x4, not 3x3):
    it is not absorbed into the deleted layer's size steps."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2, ceil_mode=True),
                              GatedConv2d(4, 5, 3, padding=1)).eval()
    masks = {"2": torch.zeros(4)}
    subnet = materialize(net, masks)
    set_gates(net, "hard", masks=masks)
    for side in (7, 8):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            torch.testing.assert_close(subnet(x), net(x))
    assert subnet(torch.randn(2, 3, 7, 7)).shape == (2, 5, 4, 4)


@pytest.mark.parametrize("content, message", [
    ('{"cand', "summary.json' is malformed (JSONDecodeError"),
    ('{}', "summary.json' is malformed (KeyError"),
    ('{"best": 3, "bn_recalibrate": 0}', "summary.json' is malformed (TypeError"),
    ('{"best": {"id": "3"}, "bn_recalibrate": 0}', "summary.json' is malformed: best id '3' and bn_recalibrate 0 must be "
                                                    "ints >= 0"),
    ('{"best": {"id": -1}, "bn_recalibrate": 0}', "malformed: best id -1 and bn_recalibrate 0 must be ints >= 0"),
    ('{"best": {"id": 2}, "bn_recalibrate": true}', "malformed: best id 2 and bn_recalibrate True must be ints >= 0"),
])
def test_export_of_a_ranking_with_a_corrupt_summary_is_a_one_line_error(capsys, searched, tmp_path, content,
                                                                        message):
    run = tmp_path / "run"
    shutil.copytree(searched, run)
    (run / "rank-broken").mkdir()
    (run / "rank-broken" / "summary.json").write_text(content)
    assert main(["export", str(run), "--rank", "broken", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
