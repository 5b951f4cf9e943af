"""A whole PGNAS search: posterior training, candidate sampling and ranking, the best candidate's
held-out and test accuracy, and a run directory:

    config.json             the resolved config (preset + overrides) and seed
    checkpoint.pt           super-network and optimizer after the last finished epoch (resumable)
    train_log.jsonl         one row per epoch: loss, train accuracy, mean p
    candidates.jsonl        one row per guided candidate: id, score (held-out accuracy), kept_fraction
    random_candidates.jsonl the random-gate baseline at the same expected drop rate (if enabled)
    architecture.json       the chosen candidate (design.md "Export"); identical for identical seeds
    summary.json            the printed summary, with timings
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as datasets
from .. import supernets
from ..nn import candidate_masks, set_gates
from ..ops.streams import Domain
from .export import architecture_record
from .feed import TensorFeed
from .io import load_checkpoint, read_jsonl, save_checkpoint, write_json, write_jsonl
from .rank import accuracy, best_candidate, rank_candidates, uniform_drop_logits
from .train import make_optimizer, train_posterior

RUN_FILES = ("config.json", "checkpoint.pt", "train_log.jsonl", "candidates.jsonl", "random_candidates.jsonl",
             "architecture.json", "summary.json")


# --smoke: the whole pipeline on a handful of batches, to check data and config before a long run
SMOKE_STEPS = 2
SMOKE_EVAL_BATCHES = 2
SMOKE_CANDIDATES = 2


class RunError(ValueError):
    """A run directory that cannot be used as asked (e.g. resuming with another config)."""


@dataclass
class SearchResult:
    out_dir: Path
    summary: dict
    architecture: dict


def load_data(config: dict, data_dir: str | Path | None = None) -> datasets.Splits:
    if config["dataset"] == "digits":
        return datasets.load_digits(test=config["data_args"].get("test_size", 360),
                                    heldout=config["heldout_size"], split_seed=config["split_seed"])
    raise ValueError(f"config key 'dataset': unknown dataset {config['dataset']!r}")


def build_feed(config: dict, splits: datasets.Splits, device: torch.device, smoke: bool = False) -> TensorFeed:
    smoke_limits = {"max_steps": SMOKE_STEPS, "max_eval_batches": SMOKE_EVAL_BATCHES} if smoke else {}
    return TensorFeed(splits, batch_size=config["batch_size"], eval_batch_size=config["eval_batch_size"],
                      device=device, **smoke_limits)


def build_supernet(config: dict, num_classes: int) -> torch.nn.Module:
    return supernets.create(config["supernet"], num_classes=num_classes, p_init=config["p_init"],
                            tau=config["tau"], **config["supernet_args"])


def run_search(config: dict, *, seed: int, out_dir: str | Path, device: str = "cpu", resume: bool = False,
               progress: bool = True, data_dir: str | Path | None = None, smoke: bool = False) -> SearchResult:
    out_dir = Path(out_dir)
    device = torch.device(device)
    if config["threads"]:
        torch.set_num_threads(config["threads"])  # process-wide: a run owns its process
    if smoke:
        config = {**config, "epochs": 1, "candidates": min(config["candidates"], SMOKE_CANDIDATES),
                  "random_baseline": min(config["random_baseline"], SMOKE_CANDIDATES)}
    splits = load_data(config, data_dir)
    feed = build_feed(config, splits, device, smoke)
    torch.manual_seed(seed)  # the super-network's initial weights
    model = build_supernet(config, splits.num_classes).to(device)
    optimizer = make_optimizer(model, config)
    n_train = config["n_train"] or feed.n_train
    run_config = {"config": config, "seed": seed}

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch, train_log = 0, []
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        if state["run_config"] != run_config:
            raise RunError(f"{checkpoint_path} was written by another config or seed; resume needs the same ones")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        train_log = read_jsonl(out_dir / "train_log.jsonl")[:start_epoch]
    else:
        for name in RUN_FILES:  # a fresh run replaces an old one whole
            (out_dir / name).unlink(missing_ok=True)
    write_json(out_dir / "config.json", run_config)

    def checkpoint(epoch: int, stats: dict) -> None:
        train_log.append(stats)
        write_jsonl(out_dir / "train_log.jsonl", train_log)
        save_checkpoint(checkpoint_path, {"run_config": run_config, "epoch": epoch, "model": model.state_dict(),
                                          "optimizer": optimizer.state_dict()})

    started = time.perf_counter()
    train_posterior(model, optimizer, feed, config, seed=seed, start_epoch=start_epoch, n_train=n_train,
                    on_epoch_end=checkpoint, progress=progress)
    trained = time.perf_counter()

    def heldout():
        return feed.eval_batches("heldout")

    def test():
        return feed.eval_batches("test")

    rows = rank_candidates(model, heldout, seed=seed, count=config["candidates"], progress=progress)
    write_jsonl(out_dir / "candidates.jsonl", rows)
    random_rows = []
    if config["random_baseline"]:
        random_rows = rank_candidates(model, heldout, seed=seed, count=config["random_baseline"],
                                      domain=Domain.RANDOM_CANDIDATE, p_logits=uniform_drop_logits(model),
                                      progress=progress, desc="random baseline")
        write_jsonl(out_dir / "random_candidates.jsonl", random_rows)
    ranked = time.perf_counter()

    best = best_candidate(rows)
    masks = candidate_masks(model, seed, best["id"])
    set_gates(model, "hard", masks=masks)
    test_accuracy = accuracy(model, test())
    set_gates(model, "full")
    architecture = architecture_record(model, masks, config=config, seed=seed, candidate=best,
                                       test_accuracy=test_accuracy)
    write_json(out_dir / "architecture.json", architecture)

    scores = [r["score"] for r in rows]
    summary = {
        "preset": config["preset"],
        "seed": seed,
        "run_dir": str(out_dir),
        "best_candidate": best["id"],
        "heldout_accuracy": best["score"],
        "test_accuracy": test_accuracy,
        "kept_fraction": best["kept_fraction"],
        "supernet_heldout_accuracy": accuracy(model, heldout()),
        "supernet_test_accuracy": accuracy(model, test()),
        "guided_mean_heldout_accuracy": statistics.fmean(scores),
        "guided_mean_kept_fraction": statistics.fmean(r["kept_fraction"] for r in rows),
        "random_mean_heldout_accuracy": statistics.fmean(r["score"] for r in random_rows) if random_rows else None,
        "random_kept_fraction": statistics.fmean(r["kept_fraction"] for r in random_rows) if random_rows else None,
        "candidates": len(rows),
        "data": feed.sizes(),
        "train_seconds": trained - started,
        "rank_seconds": ranked - trained,
        "candidates_per_second": (len(rows) + len(random_rows)) / max(ranked - trained, 1e-9),
    }
    write_json(out_dir / "summary.json", summary)
    return SearchResult(out_dir=out_dir, summary=summary, architecture=architecture)
