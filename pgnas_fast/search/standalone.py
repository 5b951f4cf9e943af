"""`pgnas-fast train RUN_DIR`: train one candidate of a search alone, fine-tuned from the weights it
inherits or from scratch, and export the result.

PGNAS ranks and reports its candidates without fine-tuning (the paper's claim); the usual NAS
protocol trains the found architecture alone. This command measures both on the same candidate: the
inherited weights' accuracy (the search's number) and the accuracy after training.

The candidate and the weights it starts from are chosen as `export` chooses them (--candidate, --rank
TAG, else the search's best; --checkpoint). It trains in the super-network with its hard gates fixed
(a dropped channel's weights get no gradient, so this is the physically smaller network's training,
with the super-network's stochastic modules: shake-shake's per-example weights, drop-path), with the
run's data, augmentation, batch size, schedule, momentum and gradient clipping, over `epochs` (the
run's by default; a cosine schedule stretches to them), from `lr` (the run's by default). The loss is
the cross-entropy (and an ENAS auxiliary head's, as in the search); the PGNAS regulariser, which
replaced weight decay, is replaced by weight decay in turn (`weight_decay`, default 3e-4: what DARTS and
ENAS train their found CIFAR architectures with). `init`: inherited (the checkpoint's weights and
BatchNorm statistics) or scratch (the search's own initial weights when `seed` is the run's: the
super-network as `search --seed` builds it).

RUN_DIR/train-TAG/ (TAG: the init by default) holds settings.json, train_log.jsonl (one row per
epoch), candidate-checkpoint.pt (model and optimizer after the last finished epoch, written atomically:
`--resume` continues exactly), and, once trained, the export directory's files (subnet.pt, model.pt2,
architecture.json, config.json, export.json with the accuracies after training and, whatever the init,
with the inherited weights untrained: the search's numbers), so that `pgnas-fast evaluate
RUN_DIR/train-TAG` scores it. Data parallel under torchrun as the search is.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import configs
from ..nn import candidate_masks, set_gates
from .export import choose_candidate, chosen_id, write_network
from .feed import check_batchnorm_rows, check_shards
from .io import (EXPORT_FILES, changed_settings, complete_lines, data_dir_of, load_checkpoint, lock_is_held,
                 read_json_object, read_jsonl, remove_interrupted_writes, save_checkpoint, write_json, write_jsonl,
                 writer_lock)
from .parallel import Parallel, join, leave
from .rank import accuracy, counted
from .run import RunError, build_feed, build_supernet, evaluation_layout, load_run
from .train import make_optimizer, train_posterior

INITS = ("inherited", "scratch")
DEFAULT_WEIGHT_DECAY = 3e-4
# not checkpoint.pt: the directory is an export directory, which no reader of runs may take for a run
CHECKPOINT = EXPORT_FILES[1]


def train_candidate(run_dir: str | Path, *, candidate: int | None = None, rank_tag: str | None = None,
                    checkpoint: str | None = None, init: str = "inherited", epochs: int | None = None,
                    lr: float | None = None, weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int | None = None,
                    tag: str | None = None, out: str | Path | None = None, resume: bool = False,
                    overwrite: bool = False, device: str = "cpu", data_dir=None, progress: bool = True) -> dict:
    """Train a candidate of a run alone (see the module's docstring) into `out` (by default
    RUN_DIR/train-TAG, TAG by default the init); returns export.json's content (an empty dict on the
    ranks other than 0 of a torchrun). `seed`: the training's data order, augmentation and stochastic
    modules (and scratch's initial weights); the run's by default."""
    check_training_settings(init=init, epochs=epochs, lr=lr, weight_decay=weight_decay)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / f"train-{tag or init}"
    parallel, device = join(device)
    try:
        return _train_candidate(run_dir, candidate=candidate, rank_tag=rank_tag, checkpoint=checkpoint, init=init,
                                epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed, out=out,
                                resume=resume, overwrite=overwrite, device=device, data_dir=data_dir,
                                progress=progress, parallel=parallel)
    finally:
        if parallel.enabled:
            leave()


def start_text(init: str, whose: str = "its") -> str:
    """Where a training started, in words: "its inherited weights" or "scratch"."""
    return f"{whose} inherited weights" if init == "inherited" else "scratch"


def check_training_settings(*, init: str, epochs: int | None, lr: float | None, weight_decay: float) -> None:
    """train_candidate's settings, refused before anything is read or written."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise RunError(f"--weight-decay must be a number >= 0, got {weight_decay}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise RunError(f"--lr must be a number > 0, got {lr}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise RunError(f"--epochs must be an int >= 1, got {epochs!r}")


def held_training(out: Path) -> str | None:
    """What training `out` (a train-TAG directory) holds, in words; None: none."""
    if not any((out / name).exists() for name in ("settings.json", CHECKPOINT)):
        return None
    if (out / "export.json").exists():
        return "finished"
    return f"trained {counted(complete_lines(out / 'train_log.jsonl'), 'epoch')}, not finished"


def finished_training(out: Path, settings: dict) -> dict | None:
    """export.json of the finished training in `out` when it was trained with `settings` (which
    _train_candidate writes into it, the seed as training_seed); None otherwise."""
    summary = read_json_object(out / "export.json")
    if summary is None:
        return None
    recorded = {key: summary.get("training_seed" if key == "seed" else key, None) for key in settings}
    return summary if recorded == settings else None


def _train_candidate(run_dir: Path, *, candidate, rank_tag, checkpoint, init, epochs, lr, weight_decay, seed,
                     out: Path, resume, overwrite, device: torch.device, data_dir, progress, parallel: Parallel
                     ) -> dict:
    main = parallel.is_main
    # (before the run loads: hours of training are not lost to one missed flag; a training being
    # written is refused by its lock, below)
    there = (held_training(out) if main and not resume and not overwrite and not lock_is_held(out.parent, out.name)
             else None)
    if occupied := parallel.all_gather([there] if there else []):
        raise RunError(f"{str(out)!r} holds a training ({occupied[0]}): --resume continues it, --overwrite replaces "
                       "it, or train under another --tag")
    choice = choose_candidate(run_dir, candidate=candidate, rank_tag=rank_tag, checkpoint=checkpoint)
    data_dir = data_dir_of(run_dir, data_dir)
    loaded = load_run(run_dir, device=str(device), data_dir=data_dir, checkpoint=choice.checkpoint)
    candidate = chosen_id(run_dir, choice, loaded)
    masks = candidate_masks(loaded.model, loaded.seed, candidate)
    seed = loaded.seed if seed is None else seed
    config = {**loaded.config, "epochs": epochs or loaded.config["epochs"],
              "lr": loaded.config["lr"] if lr is None else lr}
    settings = {"candidate": candidate, "checkpoint": choice.checkpoint, "checkpoint_epoch": loaded.epoch,
                "init": init, "epochs": config["epochs"], "lr": config["lr"], "weight_decay": weight_decay,
                "seed": seed}
    # a finished training of these settings: nothing to resume (its evaluations and export are not redone);
    # one being written (another process holds its lock) is refused by the lock, below
    finished = (finished_training(out, settings) if resume and main and not lock_is_held(out.parent, out.name)
                else None)
    if parallel.all_gather([True] if finished else []):
        if main:
            print(f"{str(out)!r} holds this training, finished: nothing to resume", file=sys.stderr)
        return finished or {}
    # the candidate's accuracies with the weights it inherits, untrained: the search's numbers (scratch too,
    # for comparison: what the search would report of it); rank 0 reports them
    set_gates(loaded.model, "hard", masks=masks)
    inherited = ({split: accuracy(loaded.model, loaded.feed.eval_batches(split)) for split in ("heldout", "test")}
                 if main else {})
    if init == "inherited":
        model = loaded.model.to(memory_format=torch.contiguous_format)  # (training's layout, as the search's)
    else:
        torch.manual_seed(seed)  # the initial weights of `search --seed SEED`
        model = build_supernet(config, loaded.feed.num_classes).to(device)
    feed = build_feed(config, loaded.data, device, seed=seed, parallel=parallel)
    check_shards(feed.train_batch_sizes(), parallel, train_images=feed.n_train, batch_size=config["batch_size"])
    check_batchnorm_rows(model, configs.input_shape(config), feed.train_batch_sizes(), parallel,
                         sync_bn=config["sync_bn"])
    optimizer = make_optimizer(model, config, weight_decay=weight_decay)

    with writer_lock(out.parent, out.name, parallel):
        state, train_log = _resumed_state(out, settings, parallel.world, config) if resume else (None, [])
        if resume and state is None and main:
            print(f"nothing to resume in {str(out)!r} (no {CHECKPOINT} yet): a new training starts", file=sys.stderr)
        if main and state is None:
            shutil.rmtree(out, ignore_errors=True)
        parallel.barrier()  # (nobody looks into a directory that rank 0 is about to remove)
        if main:
            out.mkdir(exist_ok=True)
            remove_interrupted_writes(out)
            write_json(out / "settings.json", {**settings, "rank_tag": rank_tag})
        start_epoch = 0
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (KeyError, RuntimeError, ValueError, TypeError) as err:
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                raise RunError(f"{str(out / CHECKPOINT)!r} does not fit candidate {candidate}'s training "
                               f"({' '.join(lines[:2])}): train afresh (--overwrite)") from None
            start_epoch = state["epoch"]

        def on_epoch_end(epoch: int, stats: dict) -> None:
            if not main:
                return
            train_log.append(stats)
            write_jsonl(out / "train_log.jsonl", train_log)
            save_checkpoint(out / CHECKPOINT, {"settings": settings, "world_size": parallel.world, "epoch": epoch,
                                               "model": model.state_dict(), "optimizer": optimizer.state_dict()})

        started = time.perf_counter()
        train_posterior(model, optimizer, feed, config, seed=seed, start_epoch=start_epoch, n_train=feed.n_train,
                        on_epoch_end=on_epoch_end, progress=progress, parallel=parallel, masks=masks)
        trained = time.perf_counter() - started
        if not main:  # (rank 0 evaluates and exports)
            parallel.barrier()
            return {}
        evaluation_layout(model, config)
        set_gates(model, "hard", masks=masks)
        heldout, test = (accuracy(model, loaded.feed.eval_batches(split)) for split in ("heldout", "test"))
        if not all(math.isfinite(row["loss"]) for row in train_log):
            first = next(row["epoch"] for row in train_log if not math.isfinite(row["loss"]))
            print(f"note: the training diverged (its loss is {train_log[-1]['loss']} from epoch {first} on): its "
                  "accuracies are of a broken network; train again with a lower --lr", file=sys.stderr)
        summary = write_network(out, model, masks, config=config, seed=loaded.seed, feed=loaded.feed,
                                candidate=candidate, heldout=heldout, test=test, data_dir=data_dir,
                                data_fingerprint=loaded.data_fingerprint,
                                about={"init": init, "rank_tag": rank_tag, "checkpoint": choice.checkpoint,
                                       "checkpoint_epoch": loaded.epoch, "epochs": config["epochs"],
                                       "lr": config["lr"], "weight_decay": weight_decay, "training_seed": seed,
                                       "inherited_heldout_accuracy": inherited["heldout"],
                                       "inherited_test_accuracy": inherited["test"],
                                       "final_train_loss": train_log[-1]["loss"],
                                       "train_seconds": sum(row["seconds"] for row in train_log) or trained,
                                       "resumed_from_epoch": start_epoch, "world_size": parallel.world})
        parallel.barrier()
        return summary


def _resumed_state(out: Path, settings: dict, world: int, config: dict) -> tuple[dict | None, list[dict]]:
    """The checkpoint a --resume continues from and the training log's rows up to its epoch ((None, [])
    when there is none yet), refused when it was trained with other settings, or, with epochs left and no
    sync_bn, by another number of processes (each normalises with its own rows' BatchNorm statistics)."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None, []
    state = load_checkpoint(path)
    try:
        started, trained_by, epoch = state["settings"], state["world_size"], state["epoch"]
    except (KeyError, TypeError):
        started = epoch = None
    if not isinstance(started, dict) or type(epoch) is not int or not 0 <= epoch <= config["epochs"]:
        raise RunError(f"{str(path)!r} is not a candidate training's checkpoint: train afresh (--overwrite)")
    if changed := changed_settings(started, settings):
        raise RunError(f"{str(out)!r} was trained with other settings: {'; '.join(changed)} ('now': this command's). "
                       "Resume with the same ones, train afresh (--overwrite) or under another --tag")
    if trained_by != world and epoch < config["epochs"] and not config["sync_bn"]:
        raise RunError(f"{str(path)!r} was trained by {trained_by} process(es), this resume runs {world}: resume with "
                       "as many, since each process's BatchNorm normalises with its own rows' statistics")
    try:
        logged = read_jsonl(out / "train_log.jsonl")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        logged = []
    if len(logged) < epoch:
        raise RunError(f"{str(out / 'train_log.jsonl')!r} holds {len(logged)} epoch(s), but {CHECKPOINT} is of "
                       f"epoch {epoch}: restore it, or train afresh (--overwrite)")
    return state, logged[:epoch]


__all__ = ["CHECKPOINT", "DEFAULT_WEIGHT_DECAY", "INITS", "check_training_settings", "held_training",
           "start_text", "train_candidate"]
