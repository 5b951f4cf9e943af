"""A whole PGNAS search: posterior training, candidate sampling and ranking, the best candidate's
held-out and test accuracy, and a run directory:

    config.json             the resolved config (preset + overrides) and seed
    checkpoint.pt           super-network and optimizer after the last finished epoch (resumable)
    checkpoint-best.pt      the same at the epoch of the lowest training objective
    tensorboard/            the per-epoch scalars as TensorBoard events (when tensorboard is installed)
    train_log.jsonl         one row per epoch: loss, CE, regulariser (the posterior family's KL term)
                            and its warm-up weight, accuracy, lr, images/s, mean p
    candidates.jsonl        one row per guided candidate: id, score (held-out accuracy), images,
                            first_round_score, kept_fraction (and params, macs under a size budget)
    random_candidates.jsonl the random-gate baseline at the same expected drop rate (if enabled)
    pareto.json             under a size budget: the finalists no other matches or beats in held-out
                            accuracy, parameters and MACs at once
    rank-search/            the ranking's progress log, so that --resume never scores a candidate twice
    rank-search-random/     the same for the random baseline
    data.json               the --data-dir the run read (absolute) and a fingerprint of its data: the default
                            for rank, study and export, and what resume, rank, study, export and evaluate
                            check the data they are given against
    architecture.json       the chosen candidate (design.md "Export"); identical for identical seeds
    summary.json            the printed summary, with timings
    report.md + *.png       the run report and its figures (report.py)

Under torchrun (parallel.py) every rank trains on its rows of each batch and scores its share of
the candidates; rank 0 alone writes the run directory, and the others return without a summary.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import configs, supernets
from .. import data as datasets
from .._version import __version__
from ..data.augment import ORDER_VERSION
from ..nn import candidate_masks, set_gates, set_posterior
from ..ops import dispatch
from ..ops.streams import Domain
from ..supernets.info import count_parameters, describe
from .budget import (SIZES_DIRECTORY, Budget, BudgetError, SizeCache, candidate_size, candidate_sizes,
                     check_reachable, pareto_front, size_cache_key, within_budget)
from .export import architecture_record
from .feed import CifarLoaderFeed, LoaderFeed, TensorFeed, check_batchnorm_rows, check_shards
from .io import (DATA_FILE, SEARCH_RANKINGS, RunError, changed_keys, changed_settings, check_data_record,
                 complete_lines, data_dir_of, export_file_in, load_checkpoint, lock_is_held, other_data_note,
                 read_jsonl, remove_interrupted_writes, save_checkpoint, write_data_record, write_json, write_jsonl,
                 writer_lock)
from .materialize import materialize_all_channels
from .parallel import SINGLE_PROCESS, Parallel, join, leave
from .rank import (ProgressLog, accuracy, best_candidate, counted, first_round_cut, rank_candidates, round_ends,
                   tied_for_best, uniform_drop_logits)
from .report import FIGURES, write_report
from .train import make_optimizer, train_posterior

RUN_FILES = ("config.json", "checkpoint.pt", "checkpoint-best.pt", "train_log.jsonl", "candidates.jsonl",
             "random_candidates.jsonl", "architecture.json", "summary.json", "report.md", *FIGURES)
BUDGET_FILES = ("pareto.json",)  # a run's under a size budget only
SEARCH_ONLY_FILES = ("checkpoint.pt", "train_log.jsonl", "summary.json")  # a run's, never an export's
# the weights that rank, study and export read (--checkpoint): the last finished epoch's (the search
# ranks these, as the authors did) or those of the epoch with the lowest training objective
CHECKPOINTS = {"last": "checkpoint.pt", "best": "checkpoint-best.pt"}
# what the readers of a run write into it (rank-search*/ too), each from the run's weights
DERIVED_RESULTS = ("rank-*", "study-*", "train-*", "correlate-*")


# --smoke: the whole pipeline on a handful of batches, to check data and config before a long run
SMOKE_STEPS = 2
SMOKE_EVAL_BATCHES = 2
SMOKE_CANDIDATES = 2


def smoke_extent(feed: TensorFeed | LoaderFeed) -> dict:
    """The training steps and the held-out and test images a --smoke run scored."""
    sizes = feed.sizes()
    scored = {name: min(sizes[name], feed.max_eval_batches * feed.eval_batch_size) for name in ("heldout", "test")}
    return {"training_steps": feed.steps_per_epoch(), **scored}


class ScalarLog:
    """TensorBoard scalars of every epoch (loss, CE, regulariser, accuracy, lr, images/s, mean p per
    gated layer) when the tensorboard package is installed; otherwise nothing (train_log.jsonl holds
    the same numbers)."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(directory))

    def add(self, epoch: int, stats: dict) -> None:
        if self.writer is None:
            return
        for key, value in stats.items():
            if isinstance(value, dict):
                for name, v in value.items():
                    self.writer.add_scalar(f"{key}/{name}", v, epoch)
            elif key != "epoch":
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class SearchResult:
    out_dir: Path
    summary: dict
    architecture: dict
    is_main: bool = True  # False on the ranks other than 0 of a data-parallel run: they write nothing


def load_data(config: dict, data_dir: str | Path | None = None) -> datasets.Splits | datasets.ImageNetIndex:
    """The preset's data set; raises DataError (a ValueError naming the expected layout) when absent."""
    dataset = config["dataset"]
    if dataset == "digits":
        if data_dir is not None:  # (every command: a directory the run does not read is a mistake, said)
            raise datasets.DataError(f"data_dir {str(data_dir)!r} is given, but the digits data set is embedded in "
                                     "the package and reads no directory: leave --data-dir out")
        return datasets.load_digits(test=config["data_args"].get("test_size", datasets.digits.TEST_SIZE),
                                    heldout=config["heldout_size"], split_seed=config["split_seed"])
    if data_dir is None:
        where = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/",
                 "imagenet": "train/ and val/ class folders"}[dataset]
        raise datasets.DataError(f"dataset {dataset} needs --data-dir: the directory holding {where}")
    if dataset in ("cifar10", "cifar100"):
        return datasets.load_cifar(data_dir, num_classes=int(dataset[5:]), heldout=config["heldout_size"],
                                   split_seed=config["split_seed"])
    return datasets.load_imagenet_index(data_dir, heldout=config["heldout_size"], split_seed=config["split_seed"])


def data_fingerprint(data: datasets.Splits | datasets.ImageNetIndex) -> str:
    """A digest of a data set as a run splits it (every label of every split, and every 97th image, or
    ImageNet file name): what data.json records, so that a resume or a reader given other data is
    refused while a moved copy of the same data is not."""
    digest = hashlib.sha256()
    if isinstance(data, datasets.ImageNetIndex):
        for files, labels in (data.train, data.heldout, data.val):
            digest.update(np.asarray(labels, dtype=np.int64).tobytes())
            digest.update("\n".join(os.path.basename(f) for f in files[::97]).encode())
    else:
        for images, labels in (data.train, data.heldout, data.test):
            digest.update(labels.cpu().to(torch.int64).numpy().tobytes())
            digest.update(images[::97].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_recorded_data(directory: Path, config: dict, data_dir, *, check: bool = True
                       ) -> tuple[datasets.Splits | datasets.ImageNetIndex, str | None]:
    """(data, its fingerprint; None for the embedded digits) from `data_dir`; with `check`, refused when
    `directory`'s data.json (a run's or an export's) records other data."""
    try:
        data = load_data(config, data_dir)
    except datasets.DataError as err:
        if check and (note := other_data_note(directory, data_dir)):
            raise datasets.DataError(f"{err} {note}") from None
        raise
    fingerprint = None if data_dir is None else data_fingerprint(data)
    if check:
        check_data_record(directory, data_dir, fingerprint)
    return data, fingerprint


def build_feed(config: dict, data, device: torch.device, *, seed: int, smoke: bool = False,
               parallel: Parallel = SINGLE_PROCESS):
    limits = {"max_steps": SMOKE_STEPS, "max_eval_batches": SMOKE_EVAL_BATCHES} if smoke else {}
    sizes = {"batch_size": config["batch_size"], "eval_batch_size": config["eval_batch_size"], "device": device}
    if config["dataset"] == "imagenet":
        return LoaderFeed(data, seed=seed, workers=config["workers"], channels_last=config["channels_last"],
                          input_size=config["input_size"], parallel=parallel, **config["data_args"], **sizes,
                          **limits)
    if config["dataset"] in ("cifar10", "cifar100"):
        mean, std = datasets.CIFAR_STATS[data.num_classes]
        autoaugment = config["autoaugment"]
        if config["cifar_pipeline"] == "loader" or (config["cifar_pipeline"] == "auto" and device.type == "cpu"):
            return CifarLoaderFeed(data, seed=seed, mean=mean, std=std, workers=config["workers"], parallel=parallel,
                                   autoaugment=autoaugment, **sizes, **limits)

        def prepare_eval(images):
            return datasets.normalize(images, mean, std)

        def prepare_train(images, draws):  # the authors' order: [policy,] normalise, pad-crop, flip, cutout
            return datasets.training_inputs(images, draws, mean, std, autoaugment=autoaugment)

        return TensorFeed(data, prepare_train=prepare_train, prepare_eval=prepare_eval, autoaugment=autoaugment,
                          **sizes, **limits)
    return TensorFeed(data, **sizes, **limits)


def build_supernet(config: dict, num_classes: int) -> torch.nn.Module:
    """The config's super-network with the config's posterior family (so every reader of a run
    rebuilds the family it was trained with)."""
    try:
        model = supernets.create(config["supernet"], num_classes=num_classes, p_init=config["p_init"],
                                 tau=config["tau"], **config["supernet_args"])
    except (TypeError, ValueError, RuntimeError) as err:  # an unknown name or argument, a bad size
        raise configs.ConfigError(f"supernet {config['supernet']!r} with supernet_args {config['supernet_args']} "
                                  f"cannot be built: {err}") from None
    set_posterior(model, config["posterior"])
    return model


def evaluation_layout(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """`model` (in place) with its conv weights in the memory format that every evaluation of a run
    uses: ranking, accuracies, rescoring. channels_last weights make each convolution run
    channels_last whatever its input (also a 1-channel image, which `.contiguous(memory_format=...)`
    leaves as it is): oneDNN's fast path on the CPU (the digits network's convolutions 1.7x faster on
    the 2-core CPU, its whole ranking pass 0-6%: benchmarks/results/cpu-2core.md) and the layout of
    cuDNN's tensor-core kernels. Training keeps contiguous weights
    (the regulariser reads them as flat segments). One place, so that every reader of a run scores
    with the same arithmetic, bit for bit."""
    return model.to(memory_format=torch.channels_last if config["channels_last"] else torch.contiguous_format)


def rebuild_for_evaluation(config: dict, num_classes: int, weights: dict, device: str | torch.device = "cpu"
                           ) -> torch.nn.Module:
    """The config's super-network with `weights` (a state dict) on `device`, in its evaluation layout:
    what every reader of a run scores. load_state_dict's RuntimeError passes through."""
    model = build_supernet(config, num_classes)
    model.load_state_dict(weights)
    return evaluation_layout(model.to(device), config)


def _check_posterior(path: Path, state: dict, config: dict) -> None:
    """A checkpoint trained with one posterior family never loads as the other (same parameters,
    other meaning: log alpha read as a concrete drop logit). Checkpoints older than the families
    are concrete."""
    try:
        trained = state["run_config"]["config"].get("posterior", "concrete")
    except (KeyError, TypeError, AttributeError):
        return  # not a checkpoint of a run: the run_config comparison reports it
    if trained != config["posterior"]:
        raise RunError(f"{str(path)!r} was trained with the {trained} posterior, but the config asks for "
                       f"{config['posterior']}; the drop logits of one family do not mean the other's")


@dataclass
class LoadedRun:
    config: dict
    seed: int
    model: torch.nn.Module
    feed: TensorFeed
    epoch: int  # the checkpoint's: epochs trained (a run that is still training has fewer than its config's)
    data_fingerprint: str | None  # of the data it was given (data_fingerprint); None: the embedded digits
    checkpoint: str = "last"  # which of CHECKPOINTS
    data: datasets.Splits | datasets.ImageNetIndex | None = None  # what `feed` serves
    data_dir: str | Path | None = None  # where `data` was read (None: the embedded digits)


def load_run(run_dir: str | Path, *, device: str = "cpu", data_dir: str | Path | None = None,
             checkpoint: str = "last") -> LoadedRun:
    """A finished (or checkpointed) run: its config, seed, super-network with the weights of
    `checkpoint` (CHECKPOINTS), and its data. Raises RunError when the directory is not a run or its
    checkpoint does not fit."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    path = run_dir / CHECKPOINTS[checkpoint]
    for name in ("config.json", "checkpoint.pt"):
        if not (run_dir / name).is_file():
            raise RunError(f"{str(run_dir)!r} is not a run directory: {name} is missing (pgnas-fast search writes it)")
    if not path.is_file():  # (every search writes both after its first epoch)
        raise RunError(f"{str(path)!r} is missing: the run has no best checkpoint; --checkpoint last reads "
                       "checkpoint.pt")
    try:
        run_config = json.loads((run_dir / "config.json").read_text())
        seed = run_config["seed"]
        # resolved, so that keys newer than the run take their defaults (a run older than the
        # posterior families is concrete)
        config = configs.resolve(run_config["config"]["preset"],
                                 {k: v for k, v in run_config["config"].items() if k != "preset"})
    except (json.JSONDecodeError, KeyError, TypeError, configs.ConfigError) as err:
        raise RunError(f"{str(run_dir / 'config.json')!r} is malformed or from another version: {err}") from None
    state = load_checkpoint(path)
    _check_posterior(path, state, config)
    trained = state.get("run_config")
    if trained != run_config and (not isinstance(trained, dict) or config_changes(trained, run_config)):
        differ = "" if not isinstance(trained, dict) else "; ".join(config_changes(trained, run_config))
        raise RunError(f"{str(path)!r} does not belong to this run's config.json"
                       + (f": it was trained with {differ} ('now': config.json's)" if differ else ""))
    if config["threads"]:  # the count the search ran with (digits: 1, faster there than 2 on its small passes)
        torch.set_num_threads(config["threads"])
    data_dir = data_dir_of(run_dir, data_dir)
    data, fingerprint = load_recorded_data(run_dir, config, data_dir)
    try:
        model = rebuild_for_evaluation(config, data.num_classes, state["model"], device).eval()
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise RunError(f"{str(path)!r} does not fit the {config['supernet']} super-network "
                       f"for the data's {data.num_classes} classes ({' '.join(lines[:2])}): is --data-dir the "
                       "data set the run searched on?") from None
    feed = build_feed(config, data, torch.device(device), seed=seed)
    if not (run_dir / "summary.json").exists() and os.environ.get("RANK", "0") == "0":  # (torchrun: rank 0 says it)
        trained = complete_lines(run_dir / "train_log.jsonl") >= config["epochs"]
        why = ("its training ended but its ranking did not (stopped, or no drawn candidate fit its budget)" if trained
               else "still training, or stopped")
        print(f"note: the search in {str(run_dir)!r} has not finished ({why}): its {path.name} is of epoch "
              f"{state['epoch']} of {config['epochs']}", file=sys.stderr)
    return LoadedRun(config=config, seed=seed, model=model, feed=feed, epoch=state["epoch"],
                     data_fingerprint=fingerprint, checkpoint=checkpoint, data=data, data_dir=data_dir)


def budgeted_candidates(model: torch.nn.Module, config: dict, *, seed: int, progress: bool,
                        parallel: Parallel = SINGLE_PROCESS, cache: SizeCache | None = None
                        ) -> tuple[Sequence[int], dict[int, dict]]:
    """The search's guided candidates under its size budget (config keys max_params, max_macs): the
    drawn ones that fit, and every drawn one's {params, macs} (kept in `cache`); without a budget all of
    them, unsized. Data parallel: each rank sizes its share and all ranks get every size."""
    drawn = range(config["candidates"])
    if not (budget := Budget.of(config)):
        return drawn, {}
    sizes = candidate_sizes(model, seed, drawn, configs.input_shape(config), progress=progress and parallel.is_main,
                            shard=(parallel.rank, parallel.world),
                            gather=parallel.all_gather if parallel.enabled else None, cache=cache)
    return within_budget(sizes, budget), sizes


def rank_search_candidates(model: torch.nn.Module, feed: TensorFeed | LoaderFeed, config: dict, *, seed: int,
                           progress: bool, random: bool = False, log: ProgressLog | None = None,
                           parallel: Parallel = SINGLE_PROCESS, candidates: Sequence[int] | None = None,
                           sizes: Mapping[int, dict] | None = None) -> list[dict]:
    """The search's ranking: batched, with the preset's strategy, the random-gate baseline too (under
    racing both families' means are over the first round's images, which every candidate of either
    saw: `first_round_score`). `candidates`: the guided ids (budgeted_candidates'; by default all
    drawn), whose rows carry their `sizes`; the random baseline is Table 3's, at the guided candidates'
    expected drop rate, drawn without the budget. Data parallel: each rank scores its share of every
    round and all ranks get every row."""
    sharding = {"shard": (parallel.rank, parallel.world), "gather": parallel.all_gather if parallel.enabled else None}
    masks = {"domain": Domain.RANDOM_CANDIDATE, "p_logits": uniform_drop_logits(model)} if random else {}
    progress = progress and parallel.is_main
    if random or candidates is None:
        candidates = range(config["random_baseline" if random else "candidates"])
    sizes = {} if random or sizes is None else sizes
    extra = {**sharding, **masks, **({"desc": "random baseline"} if random else {})}
    if log is not None:
        log.directory.mkdir(exist_ok=True)
        extra["log"] = log
    rows = rank_candidates(model, feed.split("heldout"), seed=seed, candidates=candidates,
                           batch_size=feed.eval_batch_size, prepare=feed.prepare_eval, progress=progress,
                           rows_per_pass=config["rank_rows"], eta=config["racing_eta"],
                           first_share=config["racing_first_share"], strategy=config["ranking"], **extra)
    return [{**row, **sizes.get(row["id"], {})} for row in rows]


def _derived_results(out_dir: Path) -> list[Path]:
    """The folders of `rank`, `study`, `train` and `correlate` results in a run directory (and the search's
    ranking logs)."""
    return [folder for pattern in DERIVED_RESULTS for folder in out_dir.glob(pattern)]


def _held_run(out_dir: Path) -> str | None:
    """What run `out_dir` holds, in words ('finished', 'trained 12 epochs', ...); None: none."""
    if not any((out_dir / name).exists() for name in (*RUN_FILES, *BUDGET_FILES, DATA_FILE)):
        return None
    if (out_dir / "summary.json").exists():
        return "finished"
    return f"trained {counted(complete_lines(out_dir / 'train_log.jsonl'), 'epoch')}, not finished"


def run_search(config: dict, *, seed: int, out_dir: str | Path, device: str = "cpu", resume: bool = False,
               overwrite: bool = False, progress: bool = True, data_dir: str | Path | None = None,
               smoke: bool = False) -> SearchResult:
    """The whole search; under torchrun (WORLD_SIZE > 1) data parallel, see parallel.py. A directory that
    holds a run is continued (`resume`) or replaced whole (`overwrite`), never either by default."""
    if config["sync_bn"] and torch.device(device).type != "cuda":
        raise RunError("sync_bn needs CUDA (SyncBatchNorm); on the CPU every rank normalises with its own rows' "
                       "statistics: set sync_bn=false")
    parallel, device = join(device)
    try:
        with contextlib.ExitStack() as held:
            return _run_search(config, seed=seed, out_dir=Path(out_dir), device=device, resume=resume,
                               overwrite=overwrite, progress=progress, data_dir=data_dir, smoke=smoke,
                               parallel=parallel, held=held)
    finally:
        if parallel.enabled:
            leave()


# the config keys only the ranking reads, as `pgnas-fast rank` takes them (a search's resume refuses changes)
RANK_OPTIONS = {"candidates": "--candidates", "ranking": "--strategy", "racing_eta": "--eta",
                "racing_first_share": "--first-share", "max_params": "--max-params", "max_macs": "--max-macs"}


def _resolved_run_config(run_config: dict) -> dict:
    """A run's {config, seed} as one dict, the config resolved, so that a key it lacks (written by a
    version older than the key) counts at its default, the value that version ran with."""
    config = run_config.get("config") if isinstance(run_config.get("config"), dict) else {}
    try:
        config = configs.resolve(config["preset"], {k: v for k, v in config.items() if k != "preset"})
    except (KeyError, TypeError, configs.ConfigError):
        pass  # (compared as written)
    return {**config, "seed": run_config.get("seed")}


def config_changes(trained: dict, now: dict) -> list[str]:
    """changed_settings between two runs' {config, seed}, each resolved first (_resolved_run_config): a
    run of an older version resumes, and is read, under a newer one."""
    return changed_settings(_resolved_run_config(trained), _resolved_run_config(now))


def _check_resumable(checkpoint_path: Path, state: dict, run_config: dict, world: int) -> None:
    """A search resumes only as the run it started as: same config and seed, and, while epochs are
    left to train without sync_bn, as many processes (each normalises with its own rows' BatchNorm
    statistics, so the steps would differ; ranking gives the same table at any count)."""
    started = state["run_config"]
    if started != run_config and (changed := config_changes(started, run_config)):
        message = (f"{checkpoint_path} was written by another config or seed: {'; '.join(changed)}. Resume with the "
                   "same ones")
        keys = set(changed_keys(_resolved_run_config(started), _resolved_run_config(run_config)))
        unused_racing = {"racing_eta", "racing_first_share"} & keys and run_config["config"]["ranking"] != "racing"
        if keys <= RANK_OPTIONS.keys() and not unused_racing:  # (rank refuses racing's settings for exhaustive)
            options = " ".join(f"{RANK_OPTIONS[key]} {run_config['config'][key]}" for key in sorted(keys))
            message += (f"; these are ranking settings: once the search has finished, `pgnas-fast rank "
                        f"{checkpoint_path.parent} {options}` ranks its posterior with them, without training again")
        raise RunError(message)
    trained_by = state.get("world_size", world)  # (checkpoints older than this check hold none)
    config = run_config["config"]
    if trained_by != world and state["epoch"] < config["epochs"] and not config["sync_bn"]:
        raise RunError(f"{checkpoint_path} was trained by {trained_by} process(es), this resume runs {world}: "
                       f"resume with as many (WORLD_SIZE {trained_by}), since each process's BatchNorm normalises "
                       "with its own rows' statistics")


def _trained_epochs(path: Path, epochs: int) -> list[dict]:
    """The first `epochs` rows of a resumed run's training log (written before each checkpoint, so a
    run that a kill cut holds them all)."""
    try:
        rows = read_jsonl(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{str(path)!r} is missing or damaged ({err}); it holds the epochs' statistics that "
                       "the resumed run's log and report go on from: restore it, or start the run afresh") from None
    if len(rows) < epochs:
        raise RunError(f"{str(path)!r} holds {len(rows)} epoch(s), but the checkpoint is of epoch {epochs}: "
                       "restore it, or start the run afresh")
    return rows[:epochs]


def _run_search(config: dict, *, seed: int, out_dir: Path, device: torch.device, resume: bool, overwrite: bool,
                progress: bool, data_dir: str | Path | None, smoke: bool, parallel: Parallel,
                held: contextlib.ExitStack) -> SearchResult:
    main = parallel.is_main
    if name := export_file_in(out_dir):  # (its config.json, architecture.json and train_log.jsonl look like a run's)
        raise RunError(f"{str(out_dir)!r} is an export directory ({name}: pgnas-fast export or train wrote it), not a "
                       "run: search into another --out")
    # (one forgotten --resume must not cost a run of days; said before the data loads)
    there = _held_run(out_dir) if main and not resume and not overwrite else None
    occupied = parallel.all_gather([there] if there else [])
    if occupied:
        raise RunError(f"{str(out_dir)!r} holds a run ({occupied[0]}): --resume continues it, --overwrite replaces "
                       "it whole (its rank-*/, study-*/, train-*/ and correlate-*/ results too), or search into "
                       "another --out")
    if config["threads"]:
        torch.set_num_threads(config["threads"])  # process-wide: a run owns its process
    # torch's CPU BatchNorm and convolution weight gradients split their sums by thread, so on the CPU a
    # run's numbers depend on the thread count as on the backend (both kept in the checkpoint)
    threads = torch.get_num_threads()
    if smoke:
        config = {**config, "epochs": 1, "candidates": min(config["candidates"], SMOKE_CANDIDATES),
                  "random_baseline": min(config["random_baseline"], SMOKE_CANDIDATES)}
    if resume:  # the run's own data directory (data.json), unless given again; kept for the readers of the run
        data_dir = data_dir_of(out_dir, data_dir)
    data, fingerprint = load_recorded_data(out_dir, config, data_dir, check=resume)
    feed = build_feed(config, data, device, seed=seed, smoke=smoke, parallel=parallel)
    check_shards(feed.train_batch_sizes(), parallel, train_images=feed.n_train, batch_size=config["batch_size"])
    torch.manual_seed(seed)  # the super-network's initial weights (the same on every rank)
    model = build_supernet(config, feed.num_classes).to(device)
    if config["aux_weight"] > 0 and getattr(model, "aux", None) is None and main:
        print(f"note: aux_weight {config['aux_weight']:g} set, but the {config['supernet']} super-network has no "
              "auxiliary head (the ENAS cells' supernet_args aux_head): the loss has no auxiliary term",
              file=sys.stderr)
    check_batchnorm_rows(model, configs.input_shape(config), feed.train_batch_sizes(), parallel,
                         sync_bn=config["sync_bn"])
    if budget := Budget.of(config):  # (a budget no candidate can meet is refused before days of training)
        note = check_reachable(model, budget, configs.input_shape(config))
        if note and main:
            print(f"note: {note}", file=sys.stderr)
    optimizer = make_optimizer(model, config)
    n_train = config["n_train"] or feed.n_train
    run_config = {"config": config, "seed": seed}
    backend = dispatch.resolve(None, device)  # kept in the checkpoint: another one rounds sums differently

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    parallel.barrier()  # the directory exists before any rank looks into it
    held.enter_context(writer_lock(out_dir, "search", parallel))
    if main:
        remove_interrupted_writes(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch, train_log = 0, []
    # what trained the checkpoint's weights (a resume's: read below)
    trained_on, trained_threads, trained_by = backend, threads, parallel.world
    if resume and not checkpoint_path.exists() and main:
        print(f"nothing to resume in {str(out_dir)!r} (no checkpoint.pt yet): a new run starts", file=sys.stderr)
    fresh = not (resume and checkpoint_path.exists())
    # a fresh run removes the old run's rank-*/, study-*/, train-*/ and correlate-*/ results (below): not
    # while a command writes one (it would fail on its vanished files, or leave old weights' scores in the
    # new run)
    busy = parallel.all_gather([folder.name for folder in _derived_results(out_dir)
                                if main and fresh and lock_is_held(out_dir, folder.name)])
    if busy:
        raise RunError(f"a pgnas-fast rank, study, train or correlate is writing {', '.join(busy)} in "
                       f"{str(out_dir)!r}, which a new search there would remove: wait for it to end or stop it (or "
                       "search into another --out)")
    if not fresh:
        state = load_checkpoint(checkpoint_path)
        _check_posterior(checkpoint_path, state, config)
        _check_resumable(checkpoint_path, state, run_config, parallel.world)
        # (checkpoints older than these notes hold neither)
        trained_on, trained_threads = state.get("backend", backend), state.get("threads", threads)
        trained_by = state.get("world_size", parallel.world)
        changed = ([f"on the {trained_on} backend, this resume trains on {backend}"] if trained_on != backend else [])
        if trained_threads != threads and device.type == "cpu":
            changed.append(f"with {trained_threads} CPU thread(s), this resume with {threads} (--set threads=N pins "
                           "the count)")
        if changed and state["epoch"] < config["epochs"] and main:
            print(f"note: {checkpoint_path} was trained {'; and '.join(changed)}: its sums round in another "
                  "order, so the rest of the run differs in the last digits from an uninterrupted one",
                  file=sys.stderr)
        if state.get("order_version") != ORDER_VERSION and state["epoch"] < config["epochs"] and main:
            print(f"note: {checkpoint_path} was trained with an older pgnas_fast's order of the training images "
                  "(before it came from the RNG contract): the rest of the run visits them in this version's "
                  "order, so it differs from an uninterrupted run of either version", file=sys.stderr)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        train_log = _trained_epochs(out_dir / "train_log.jsonl", start_epoch)
    elif main:
        held_a_run = _held_run(out_dir) is not None
        for name in (*RUN_FILES, *BUDGET_FILES, DATA_FILE):  # a fresh run replaces an old one whole
            (out_dir / name).unlink(missing_ok=True)
        # and what was derived from the old checkpoint: the search's ranking, `rank`, `study`, `train` and
        # `correlate` results (a `rank --resume` would otherwise reuse the old weights' scores); in a
        # directory that held no run, folders of those names are the user's and stay
        derived = ((*_derived_results(out_dir), out_dir / "tensorboard", out_dir / SIZES_DIRECTORY)
                   if held_a_run else ())
        for folder in derived:
            shutil.rmtree(folder, ignore_errors=True)
    if main:
        write_json(out_dir / "config.json", run_config)
        if data_dir is not None:
            write_data_record(out_dir, data_dir, fingerprint)
    parallel.barrier()  # nobody writes a ranking log that rank 0 is about to remove

    scalars = ScalarLog(out_dir / "tensorboard") if main else None

    def checkpoint(epoch: int, stats: dict) -> None:
        if not main:
            return
        train_log.append(stats)
        write_jsonl(out_dir / "train_log.jsonl", train_log)
        state = {"run_config": run_config, "world_size": parallel.world, "backend": backend, "threads": threads,
                 "order_version": ORDER_VERSION, "epoch": epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "loss": stats["loss"]}
        # best = lowest training objective (mean CE + R, what the posterior minimises); no held-out
        # data is spent on choosing it, the held-out split stays for ranking. Written first: checkpoint.pt
        # marks the epoch done, so a kill between the two must not leave the best one behind for good
        if all(stats["loss"] <= row["loss"] for row in train_log):
            save_checkpoint(out_dir / "checkpoint-best.pt", state)
        save_checkpoint(checkpoint_path, state)
        scalars.add(epoch, stats)

    started = time.perf_counter()
    try:
        train_posterior(model, optimizer, feed, config, seed=seed, start_epoch=start_epoch, n_train=n_train,
                        on_epoch_end=checkpoint, progress=progress, parallel=parallel)
    finally:
        if scalars is not None:
            scalars.close()
    trained = time.perf_counter()

    parallel.broadcast_buffers(model)  # every rank ranks with the checkpoint's BatchNorm statistics
    evaluation_layout(model, config)
    logs = {family: ProgressLog(out_dir / name, parallel.rank) for family, name in SEARCH_RANKINGS.items()}
    try:
        # (the cache `rank` reads for the same weights: the last checkpoint's, on this device type)
        cache = SizeCache(out_dir / SIZES_DIRECTORY, size_cache_key("last", config["epochs"], device))
        guided, sizes = budgeted_candidates(model, config, seed=seed, progress=progress, parallel=parallel,
                                            cache=cache)
    except BudgetError as err:
        raise BudgetError(f"{err}. The trained super-network is kept: `pgnas-fast rank {out_dir} --max-params N "
                          "--max-macs N` ranks it under another budget (or search afresh with --overwrite)") from None
    sized = time.perf_counter()
    rows = rank_search_candidates(model, feed, config, seed=seed, progress=progress, log=logs["guided"],
                                  parallel=parallel, candidates=guided, sizes=sizes)
    random_rows = []
    if config["random_baseline"]:
        random_rows = rank_search_candidates(model, feed, config, seed=seed, progress=progress, random=True,
                                             log=logs["random"], parallel=parallel)
    ranked = time.perf_counter()
    # evaluations a resumed search found done in its progress logs (not timed by this process)
    resumed = sum(log.restored for log in logs.values())
    if not main:  # every rank holds every row; rank 0 reports them
        parallel.barrier()
        return SearchResult(out_dir=out_dir, summary={}, architecture={}, is_main=False)
    write_jsonl(out_dir / "candidates.jsonl", rows)
    front = pareto_front(rows) if sizes else []
    if sizes:
        write_json(out_dir / "pareto.json", front)
    if random_rows:
        write_jsonl(out_dir / "random_candidates.jsonl", random_rows)

    best = best_candidate(rows)
    masks = candidate_masks(model, seed, best["id"])
    set_gates(model, "hard", masks=masks)
    test_accuracy = accuracy(model, feed.eval_batches("test"))
    set_gates(model, "full")
    input_size = configs.input_shape(config)
    size = sizes.get(best["id"]) or candidate_size(model, masks, input_size)  # (sized already under a budget)
    all_channels = describe(materialize_all_channels(model), input_size)
    architecture = architecture_record(model, masks, config=config, seed=seed, candidate=best,
                                       test_accuracy=test_accuracy, size=size)
    write_json(out_dir / "architecture.json", architecture)

    summary = {
        "preset": config["preset"],
        "seed": seed,
        "posterior": config["posterior"],
        # what trained the last epochs (a resume of a finished run trains none: the checkpoint's)
        "backend": trained_on if start_epoch == config["epochs"] else backend,
        "run_dir": str(out_dir),
        "best_candidate": best["id"],
        "heldout_accuracy": best["score"],
        "test_accuracy": test_accuracy,
        "kept_fraction": best["kept_fraction"],
        "supernet_heldout_accuracy": accuracy(model, feed.eval_batches("heldout")),
        "supernet_test_accuracy": accuracy(model, feed.eval_batches("test")),
        # Table 3's means: every candidate on the same images (racing: its first share), both families
        "guided_mean_heldout_accuracy": statistics.fmean(r["first_round_score"] for r in rows),
        "guided_mean_kept_fraction": statistics.fmean(r["kept_fraction"] for r in rows),
        "random_mean_heldout_accuracy": (statistics.fmean(r["first_round_score"] for r in random_rows)
                                         if random_rows else None),
        "mean_heldout_images": round_ends(config["ranking"], len(feed.split("heldout")[1]), config["racing_eta"],
                                          config["racing_first_share"])[0],  # the first round's
        "finalist_heldout_images": max(r["images"] for r in rows),
        "tied_for_best": tied_for_best(rows),
        "first_round_cut": first_round_cut(rows),
        "versions": {"pgnas_fast": __version__, "torch": torch.__version__},
        # the instruction set torch's and oneDNN's CPU kernels were chosen for (AVX2, AVX512): another
        # rounds the convolutions' sums in another order, and the accuracies move in their last digits
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "random_kept_fraction": statistics.fmean(r["kept_fraction"] for r in random_rows) if random_rows else None,
        "candidates": len(rows),  # ranked: under a size budget, those of the drawn that fit
        "random_candidates": len(random_rows),
        "drawn_candidates": config["candidates"],
        "budget": budget.settings() if budget else None,
        # under a budget, where every drawn candidate was sized: the finalists no other matches or beats in
        # held-out accuracy, parameters and MACs at once (pareto.json)
        "pareto": [r["id"] for r in front] if sizes else None,
        "data": feed.sizes(),
        "num_classes": feed.num_classes,  # the data's (an ImageFolder tree of your own: its class folders)
        "classes": feed.classes,  # output i's name (an ImageFolder tree's: its folders, sorted); None: unnamed
        # --smoke: what the numbers above come from (they check data and config; they are not a search)
        "smoke": smoke_extent(feed) if smoke else None,
        # every epoch's, those before a --resume included (this process alone trained since `started`)
        "train_seconds": sum(row.get("seconds", 0.0) for row in train_log) or trained - started,
        # this process's (a resumed search's ranking did part of the work before)
        "rank_seconds": ranked - sized,
        "sizing_seconds": sized - trained,  # the drawn candidates', for the budget (0 without one)
        # the checkpoint's epoch this process started from (0: a fresh run), of how many
        "resumed_from_epoch": start_epoch, "epochs": config["epochs"],
        "resumed_evaluations": resumed,
        # both kinds; a rate only when this process ranked them all
        "candidates_per_second": None if resumed else (len(rows) + len(random_rows)) / max(ranked - sized, 1e-9),
        "params_supernet": count_parameters(model),
        "params_all_channels": all_channels["params"],
        "params_subnet": size["params"],
        "macs_all_channels": all_channels["macs"],  # per image, of the convolutions and linear layers
        "macs_subnet": size["macs"],
        "world_size": trained_by if start_epoch == config["epochs"] else parallel.world,
        "threads": trained_threads if start_epoch == config["epochs"] else threads,
    }
    write_json(out_dir / "summary.json", summary)
    write_report(out_dir)
    parallel.barrier()  # the other ranks leave once the run directory is complete
    return SearchResult(out_dir=out_dir, summary=summary, architecture=architecture)
