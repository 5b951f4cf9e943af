"""Data-parallel training (pgnas_fast.search.parallel): the step of N ranks under DDP is the step of one
process on the concatenated batch.

The random numbers first: a shard at row offset r draws the gates, shake-shake weights and drop-path
decisions of rows r.. of the whole batch. Then 2 CPU processes under gloo train a BN-free gated net
with the project's training loop and end at the parameters of one process (float tolerance); then
the CLI under torchrun.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from pgnas_fast import configs
from pgnas_fast.data import Splits
from pgnas_fast.nn import GatedConv2d, GatedLinear, ShakeShake, set_gates
from pgnas_fast.search.feed import RowShareSampler, TensorFeed, check_shards
from pgnas_fast.search.parallel import Parallel, join, leave, shard_loss
from pgnas_fast.search.run import RunError, run_search
from pgnas_fast.search.train import make_optimizer, train_posterior
from pgnas_fast.supernets.enas import DropPath

SEED = 1234


class ShardNet(nn.Module):
    """Every per-example random source of the search, no BatchNorm: gates on a conv, two shaken
    gated branches, drop-path, a gated linear head."""

    def __init__(self):
        super().__init__()
        self.stem = GatedConv2d(2, 6, 3, padding=1, gate_groups=2, p_init=0.3)
        self.branches = nn.ModuleList(GatedConv2d(6, 6, 3, padding=1, p_init=0.2) for _ in range(2))
        self.shake = ShakeShake()
        self.drop = DropPath(1.0)
        self.drop.drop_prob = 0.3
        self.head = GatedLinear(6, 3, p_init=0.2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.shake([torch.tanh(b(x)) for b in self.branches], skip=x)
        return self.head(self.drop(x).mean((2, 3)))


def _data(n: int = 21) -> Splits:
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(n, 2, 5, 5, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return Splits(train=(images, labels), heldout=(images[:4], labels[:4]), test=(images[:4], labels[:4]),
                  num_classes=3)


# ---- the random numbers of a shard ---------------------------------------------------------------
def test_shards_draw_the_numbers_of_their_rows_of_the_concatenated_batch():
    torch.manual_seed(0)
    net = ShardNet().train()
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    set_gates(net, "relaxed", seed=SEED, step=3)
    whole = net(x)
    parts = []
    for start, end in ((0, 2), (2, 5), (5, 6)):  # unequal shares too: any first row works
        set_gates(net, "relaxed", seed=SEED, step=3, row_offset=start)
        parts.append(net(x[start:end]))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)
    # not a vacuous check: at row offset 0 the second shard would get other numbers
    set_gates(net, "relaxed", seed=SEED, step=3, row_offset=0)
    assert not torch.allclose(net(x[2:5]), whole[2:5], rtol=1e-3, atol=1e-4)
    assert net.shake.rng_row_offset == 0 and net.drop.rng_row_offset == 0


def test_a_linear_layer_s_shard_of_examples_with_several_rows_each_draws_their_gates():
    """A gated linear layer folds [B, T, F] into B * T gate rows: the row offset of a shard of examples
    counts T rows per example (it counted one, so the shards drew the numbers of other rows)."""
    torch.manual_seed(0)
    layer = GatedLinear(5, 3, p_init=0.3)
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2))
    set_gates(layer, "relaxed", seed=SEED, step=3)
    whole = layer(x)
    for start, end in ((0, 1), (1, 4)):
        set_gates(layer, "relaxed", seed=SEED, step=3, row_offset=start)
        torch.testing.assert_close(layer(x[start:end]), whole[start:end], rtol=1e-6, atol=1e-7)


def test_rows_split_each_batch_into_consecutive_equal_shares():
    assert [Parallel(r, 4).rows(64) for r in range(4)] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert [Parallel(r, 2).rows(49) for r in range(2)] == [(0, 24), (24, 49)]  # a short last batch
    assert Parallel().rows(7) == (0, 7)
    assert shard_loss(torch.tensor(2.0), 24, 49, 2).item() == pytest.approx(2.0 * 48 / 49)
    assert shard_loss(torch.tensor(2.0), 7, 7, 1).item() == 2.0


def test_check_shards_names_the_batch_and_the_world_size():
    check_shards([64, 64, 49], Parallel(0, 2), train_images=177, batch_size=64)
    check_shards([63, 1], Parallel(), train_images=64, batch_size=63)  # a single process takes any batch
    check_shards([4, 2], Parallel(0, 2), train_images=6, batch_size=4)  # a last batch of one row a rank
    with pytest.raises(configs.ConfigError, match=r"batch_size 63 must be divisible by the world size 2"):
        check_shards([63, 63], Parallel(1, 2), train_images=126, batch_size=63)
    with pytest.raises(configs.ConfigError, match=r"last training batch of an epoch has 3 rows, fewer than the 4 ranks"):
        check_shards([64, 3], Parallel(0, 4), train_images=67, batch_size=64)


def test_a_batch_too_small_for_batchnorm_is_named_before_training():
    """R-50 at 32x32 ends on 1x1 maps: a batch of 1 image would stop training inside BatchNorm."""
    from pgnas_fast import supernets
    from pgnas_fast.search.feed import check_batchnorm_rows

    model = supernets.create("supnet-r50", num_classes=5, base_width=8, layers=(1, 1, 1, 1))
    check_batchnorm_rows(model, (3, 32, 32), [4, 2], Parallel())
    check_batchnorm_rows(model, (3, 64, 64), [4, 1], Parallel())  # 2x2 maps: 4 values of one image
    with pytest.raises(configs.ConfigError, match=r"a training batch gives the network 1 image\(s\), and BatchNorm "
                                                  r"'stages.3.0.bn2' reads a 1-value map per channel at input_size 32: "
                                                  r".*the epoch's last batch \(of 1\) is larger"):
        check_batchnorm_rows(model, (3, 32, 32), [4, 1], Parallel())
    with pytest.raises(configs.ConfigError, match=r"gives the network 1 image.*; raise batch_size or input_size"):
        check_batchnorm_rows(model, (3, 32, 32), [1, 1], Parallel())
    with pytest.raises(configs.ConfigError, match=r"gives a process 1 image"):
        check_batchnorm_rows(model, (3, 32, 32), [4, 3], Parallel(0, 2))
    check_batchnorm_rows(model, (3, 32, 32), [4, 3], Parallel(0, 2), sync_bn=True)  # statistics over all 3 rows
    model.stem[1].eval()  # a frozen BatchNorm in a training model
    check_batchnorm_rows(model, (3, 32, 32), [4, 2], Parallel())
    assert model.training and not model.stem[1].training  # every module's mode as it was


def test_rank_under_torchrun_keeps_the_device_it_is_given(monkeypatch, tmp_path):
    """An explicit --device cpu on a GPU machine stays the CPU (rank_run once put every rank on cuda)."""
    import importlib

    rank_run_module = importlib.import_module("pgnas_fast.search.rank_run")
    joined = []

    def join_and_stop(device):
        joined.append(str(device))
        raise KeyboardInterrupt

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rank_run_module, "join", join_and_stop)
    with pytest.raises(KeyboardInterrupt):
        rank_run_module.rank_run(tmp_path, candidates=2, device="cpu")
    assert joined == ["cpu"]


def test_row_share_sampler_covers_the_single_process_batches():
    """ImageNet's loader: ranks read their rows of the same shuffled full batches as one process."""
    from pgnas_fast.data.imagenet import SeededSampler

    single = SeededSampler(50, shuffle=True, seed=SEED)
    single.set_epoch(3)
    order = [index for index, _ in single][:48]  # full batches of 16: the last 2 are dropped
    shares = []
    for r in range(2):
        sampler = RowShareSampler(50, seed=SEED, batch=16, parallel=Parallel(r, 2))
        sampler.set_epoch(3)
        shares.append(list(sampler))
        assert len(sampler) == 24
    for b in range(3):
        assert shares[0][8 * b:8 * b + 8] + shares[1][8 * b:8 * b + 8] == order[16 * b:16 * b + 16]


def test_sync_bn_on_the_cpu_is_a_clear_error(tmp_path):
    config = configs.resolve("digits-tiny", {"sync_bn": True})
    with pytest.raises(RunError, match="sync_bn needs CUDA"):
        run_search(config, seed=0, out_dir=tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


# ---- 2 processes under gloo = 1 process on the concatenated batch -----------------------------------
TRAIN_OVERRIDES = {"epochs": 2, "batch_size": 8, "lr": 0.1, "p_lr_scale": 30.0, "grad_clip": 1.0,
                   "weight_reg": 10.0, "threads": 1}


def _train(parallel: Parallel) -> dict[str, torch.Tensor]:
    """The project's training loop on ShardNet: 2 epochs of 3 steps (8, 8 and 5 rows: shares of 2 and 3)."""
    config = configs.resolve("digits-tiny", TRAIN_OVERRIDES)
    torch.manual_seed(SEED)
    model = ShardNet()
    feed = TensorFeed(_data(), batch_size=config["batch_size"], eval_batch_size=8, device=torch.device("cpu"))
    optimizer = make_optimizer(model, config)
    train_posterior(model, optimizer, feed, config, seed=SEED, n_train=feed.n_train, progress=False,
                    parallel=parallel)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel, device = join("cpu")
    assert parallel == Parallel(rank, world) and device == torch.device("cpu")
    try:
        torch.save(_train(parallel), f"{out}.rank{rank}")
    finally:
        leave()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_reach_the_parameters_of_one_process(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    torch.set_num_threads(1)
    single = _train(Parallel())
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    torch.manual_seed(SEED)
    initial = ShardNet().state_dict()
    for name, value in single.items():
        # every parameter moved (the posterior_index entries name the family: the same)
        assert name.endswith("posterior_index") or not torch.allclose(value, initial[name]), name
        for r in range(2):
            torch.testing.assert_close(ranks[r][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {name}")


def _enas_rank_main(rank: int, world: int, port: int, out: str) -> None:
    """A tiny SupNet-E (BatchNorm, drop-path, aux head) for one step with aux_weight 0, one with 0.4."""
    from pgnas_fast.supernets.enas import EnasSupernet

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel, _ = join("cpu")
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    feed = TensorFeed(Splits((images, labels), (images, labels), (images, labels), 10), batch_size=4,
                      eval_batch_size=4, device=torch.device("cpu"))
    try:
        states = []
        for aux_weight in (0.0, 0.4):
            config = configs.resolve("cifar10-supnet-e", {"epochs": 1, "batch_size": 4, "aux_weight": aux_weight})
            torch.manual_seed(0)
            model = EnasSupernet(filters=4, num_layers=3)
            train_posterior(model, make_optimizer(model, config), feed, config, seed=0, n_train=4, progress=False,
                            parallel=parallel)
            states.append({name: p.detach().clone() for name, p in model.named_parameters()})
        torch.save(states, f"{out}.rank{rank}")
    finally:
        leave()


@pytest.mark.slow
def test_supnet_e_trains_data_parallel_with_and_without_its_aux_loss(tmp_path):
    """aux_weight 0 leaves the aux head without gradients, which DDP must be told about; the ranks'
    parameters stay identical (DDP keeps them in step; BatchNorm running statistics are each rank's)
    and the aux head moves only when its loss counts."""
    out = str(tmp_path / "enas")
    mp.spawn(_enas_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    for k in range(2):
        for name, value in ranks[0][k].items():
            torch.testing.assert_close(ranks[1][k][name], value, rtol=1e-6, atol=1e-7, msg=name)
    aux = "aux.fc.weight"
    assert not torch.equal(ranks[0][0][aux], ranks[0][1][aux])
    from pgnas_fast.supernets.enas import EnasSupernet

    torch.manual_seed(0)
    assert torch.equal(ranks[0][0][aux], EnasSupernet(filters=4, num_layers=3).state_dict()[aux])


# ---- the CLI under torchrun ------------------------------------------------------------------------
def torchrun_search(out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pgnas_fast.cli", "search", "--preset", "digits-tiny", "--epochs", "1",
                           "--candidates", "6", "--random-baseline", "0", "--out", str(out), "--quiet", *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, torchrun_search(out)


def test_torchrun_search_writes_the_run_directory_once(torchrun_run):
    out, done = torchrun_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best candidate:") == 1 and done.stdout.count("pgnas-fast search:") == 1
    for name in ("config.json", "checkpoint.pt", "checkpoint-best.pt", "train_log.jsonl", "candidates.jsonl",
                 "architecture.json", "summary.json", "report.md"):
        assert (out / name).is_file(), name
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1  # one epoch, one row
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6))  # gathered from both ranks, written once
    assert sorted(p.name for p in (out / "rank-search").glob("progress-rank*.jsonl")) == [
        "progress-rank0.jsonl", "progress-rank1.jsonl"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["data"]["train"] == 1137
    assert "Warning" not in done.stderr, done.stderr[-3000:]  # (DDP's stride warning on the stem's 1 input channel)
    # said where a reader looks: its training differs from one process's (BatchNorm per process's rows)
    assert done.stdout.splitlines()[0].endswith(", data parallel over 2 processes")
    assert "data parallel over 2 processes (torchrun)" in (out / "report.md").read_text()


def test_torchrun_search_ranks_with_the_checkpoint_s_batchnorm_statistics(torchrun_run, capsys):
    """After the last training step each rank's BatchNorm running statistics are its own rows'; every
    rank ranks with rank 0's, the checkpoint's, so one process re-ranking the checkpoint gets the same table."""
    from pgnas_fast.cli import main

    out, done = torchrun_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["rank", str(out), "--candidates", "6", "--strategy", "exhaustive", "--tag", "again", "--quiet"]) == 0
    assert (out / "rank-again" / "candidates.jsonl").read_text() == (out / "candidates.jsonl").read_text()


def test_torchrun_resume_of_a_finished_run_redoes_nothing(torchrun_run):
    """Every rank loads the checkpoint and reads the ranking logs: no epoch trained, no candidate
    scored again, the same results."""
    out, done = torchrun_run
    assert done.returncode == 0, done.stderr[-3000:]
    names = ("train_log.jsonl", "candidates.jsonl", "architecture.json", "rank-search/progress-rank0.jsonl",
             "rank-search/progress-rank1.jsonl")
    before = {name: (out / name).read_bytes() for name in names}
    again = torchrun_search(out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in names} == before
    # one process resuming the finished run trains nothing: the summary still names the 2 that trained it
    from pgnas_fast.cli import main

    assert main(["search", "--preset", "digits-tiny", "--epochs", "1", "--candidates", "6", "--random-baseline", "0",
                 "--out", str(out), "--quiet", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_torchrun_train_trains_a_candidate_data_parallel_and_writes_it_once(torchrun_run):
    out, done = torchrun_run
    assert done.returncode == 0, done.stderr[-3000:]
    trained = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "pgnas_fast.cli", "train", str(out), "--epochs", "2", "--quiet"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.count("trained alone from its inherited weights for 2 epochs") == 1
    summary = json.loads((out / "train-inherited" / "export.json").read_text())
    assert summary["world_size"] == 2
    assert summary["inherited_test_accuracy"] == json.loads((out / "architecture.json").read_text())["test_accuracy"]
    assert len((out / "train-inherited" / "train_log.jsonl").read_text().splitlines()) == 2
    # every rank's BatchNorm statistics are rank 0's before the export: the exported network scores as reported
    from pgnas_fast.search.export import evaluate_export

    assert evaluate_export(out / "train-inherited") == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_torchrun_search_under_a_size_budget_ranks_what_one_process_ranks(tmp_path):
    """Each rank sizes its share of the drawn candidates and all ranks rank those that fit: the table,
    sizes and Pareto front of one process's `rank` under the same budget."""
    from pgnas_fast.cli import main
    from pgnas_fast.search.materialize import materialize_all_channels
    from pgnas_fast.search.run import build_supernet
    from pgnas_fast.supernets.info import describe

    config = configs.resolve("digits-tiny")
    every_channel = describe(materialize_all_channels(build_supernet(config, 10)), configs.input_shape(config))
    out = tmp_path / "run"
    # a budget just under the network with every channel kept: only a candidate that keeps all is left out
    done = torchrun_search(out, "--max-params", str(every_channel["params"] - 1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["rank", str(out), "--strategy", "exhaustive", "--candidates", "6", "--tag", "again", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "rank-again" / "candidates.jsonl").read_text().splitlines()]
    assert rows and all(r["params"] < every_channel["params"] for r in rows)
    assert [(r["id"], r["score"], r["params"], r["macs"]) for r in rows] == [
        (r["id"], r["score"], r["params"], r["macs"]) for r in again]
    assert (out / "pareto.json").read_text() == (out / "rank-again" / "pareto.json").read_text()


def test_torchrun_refuses_a_batch_the_ranks_cannot_share(tmp_path):
    """Refused before anything is written."""
    bad = torchrun_search(tmp_path / "bad", "--set", "batch_size=63")
    # (torchrun exits 1 when a rank fails; the ranks exit 2 with the one-line error)
    assert bad.returncode != 0 and "pgnas-fast: error: batch_size 63 must be divisible by the world size 2" in bad.stderr
    assert not (tmp_path / "bad").exists()
