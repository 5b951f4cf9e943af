"""The product's path end to end on a GPU (`-m gpu`, run by benchmarks/gpu_suite.sh): a digits search
on CUDA and what its run directory feeds (rank, export, train, evaluate), a CIFAR smoke search through the
batched GPU pipeline (with the AutoAugment policy), and that pipeline's batches equal to the CPU
DataLoader's.

Each check is a function of the device and runs on the CPU as well, so that a change to the commands
it calls fails here, not first in a GPU session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_fixtures import write_cifar10

from pgnas_fast.cli import main


def search_digits(out: Path, device: str) -> dict:
    """A small digits search on `device`, then rank, export, train and evaluate of its run directory there."""
    assert main(["search", "--epochs", "8", "--candidates", "8", "--random-baseline", "4", "--device", device,
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["supernet_test_accuracy"] > 0.5  # 8 epochs learn the digits (99% after 30)
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    # rank's table of the same checkpoint on the same device: the search's own scores
    assert main(["rank", str(out), "--candidates", "8", "--strategy", "exhaustive", "--tag", "again",
                 "--device", device, "--quiet"]) == 0
    again = [json.loads(line) for line in (out / "rank-again" / "candidates.jsonl").read_text().splitlines()]
    assert [(r["id"], r["score"]) for r in again] == [(r["id"], r["score"]) for r in rows]
    assert main(["export", str(out), "--out", str(out.parent / "export"), "--device", device]) == 0
    assert main(["evaluate", str(out.parent / "export"), "--device", device]) == 0
    # the best candidate trained alone (hard gates in training: the kernels' hard backward), starting
    # from the search's own numbers
    assert main(["train", str(out), "--epochs", "2", "--device", device, "--quiet"]) == 0
    trained = json.loads((out / "train-inherited" / "export.json").read_text())
    assert trained["inherited_test_accuracy"] == summary["test_accuracy"]
    assert main(["evaluate", str(out / "train-inherited"), "--device", device]) == 0
    return summary


def cifar_batches_agree(root: Path, device: str, autoaugment: bool) -> None:
    """The batched pipeline on `device` gives the CPU DataLoader's batches bit for bit (order and every
    image's augmentation from the RNG contract), with and without the AutoAugment policy."""
    from pgnas_fast import configs
    from pgnas_fast.search.run import build_feed, load_data

    config = configs.resolve("cifar10-supnet-m", {"heldout_size": 50, "batch_size": 64, "workers": 0,
                                                  "autoaugment": autoaugment})
    data = load_data(config, root)
    tensors = build_feed({**config, "cifar_pipeline": "tensors"}, data, torch.device(device), seed=3)
    loader = build_feed({**config, "cifar_pipeline": "loader"}, data, torch.device("cpu"), seed=3)
    for epoch in (0, 5):
        pairs = list(zip(tensors.train_batches(epoch, 3), loader.train_batches(epoch, 3), strict=True))
        assert pairs and all(torch.equal(x.cpu(), x_l) and torch.equal(y.cpu(), y_l) for (x, y), (x_l, y_l) in pairs)


def smoke_cifar(root: Path, out: Path, device: str) -> None:
    """The CIFAR pipeline of a paper preset end to end on `device` (a smoke check: 2 steps, 2 candidates),
    with the AutoAugment policy."""
    assert main(["search", "--preset", "cifar10-supnet-m", "--data-dir", str(root), "--smoke",
                 "--set", "batch_size=16", "--set", "heldout_size=50", "--set", "autoaugment=true",
                 "--set", 'supernet_args={"k": 1, "blocks_per_stage": 1}', "--device", device,
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "architecture.json").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["supernet_args"] == {"k": 1, "blocks_per_stage": 1}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root)
    return root


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_digits_search_and_its_readers_run_on_the_device(tmp_path, device):
    search_digits(tmp_path / "run", device)


@pytest.mark.parametrize("autoaugment", [False, True], ids=["paper", "autoaugment"])
@pytest.mark.parametrize("device", DEVICES)
def test_cifar_batches_on_the_device_equal_the_cpu_loader_s(cifar_root, device, autoaugment):
    cifar_batches_agree(cifar_root, device, autoaugment)


@pytest.mark.parametrize("device", DEVICES)
def test_a_cifar_smoke_search_runs_on_the_device(cifar_root, tmp_path, device):
    smoke_cifar(cifar_root, tmp_path / "run", device)
