"""`pgnas-fast rank RUN_DIR`: rank candidates of a finished search again, at scale.

Writes RUN_DIR/rank-TAG/ with candidates.jsonl ({id, score, images, first_round_score, kept_fraction}
per candidate; params and macs too under a size budget or with `size_all`), top.json (the best
candidates with their architectures and sizes), pareto.json (when sized: the finalists no other beats
in accuracy, parameters and MACs at once) and the progress logs that `--resume` continues from. Under
torchrun every rank evaluates a share of each round's candidates (and sizes a share of them) and the
ranks exchange their rows (all-gather), so the table equals a single process's; rank 0 writes it.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from ..configs import input_shape
from ..nn import candidate_masks
from .budget import (SIZES_DIRECTORY, Budget, SizeCache, candidate_size, candidate_sizes, check_reachable,
                     pareto_front, size_cache_key, within_budget)
from .export import architecture_record
from .feed import checked_recalibration_images
from .io import changed_settings, lock_is_held, remove_interrupted_writes, write_json, write_jsonl, writer_lock
from .parallel import join, leave
from .rank import CandidateScorer, ProgressLog, best_candidate, best_first, first_round_cut, rank, tied_for_best
from .run import CHECKPOINTS, RunError, build_feed, load_data, load_run, rebuild_for_evaluation


def rank_run(run_dir: str | Path, *, candidates: int | None = None, strategy: str | None = None,
             evaluator: str = "batched", tag: str = "default", resume: bool = False, overwrite: bool = False,
             top: int = 10, eta: int | None = None, first_share: float | None = None, bn_recalibrate: int = 0,
             max_params: int | None = None, max_macs: int | None = None, size_all: bool = False,
             checkpoint: str = "last", device: str = "cpu", data_dir=None, progress: bool = True) -> dict:
    """Rank candidates 0 .. `candidates` - 1 of a run (see the module's docstring) with the weights of
    `checkpoint` (run.CHECKPOINTS: last or best). Unset (None) settings take the run's config: its
    candidates, strategy, racing's eta and first share, its size budget (max_params, max_macs; 0 lifts a
    limit). `size_all`: size every candidate without a budget too (rows' params and macs, pareto.json)."""
    run_dir = Path(run_dir)
    parallel, device = join(device)  # (torchrun with a cuda device: cuda:LOCAL_RANK for each rank)
    try:
        with contextlib.ExitStack() as held:
            rank_id, world = parallel.rank, parallel.world
            out = run_dir / f"rank-{tag}"
            # (before the run loads: hours of ranking are not lost to one missed flag, nor minutes to loading;
            # a ranking being written is refused by its lock, below, with what it is)
            there = (_held_ranking(out) if rank_id == 0 and not resume and not overwrite
                     and not lock_is_held(run_dir, out.name) else None)
            held_ranking = parallel.all_gather([there] if there else [])
            if held_ranking:
                raise RunError(f"{str(out)!r} holds a ranking ({held_ranking[0]}): --resume continues it, --overwrite "
                               "replaces it, or rank under another --tag")
            loaded = load_run(run_dir, device=device, data_dir=data_dir, checkpoint=checkpoint)
            config, seed, model, feed = loaded.config, loaded.seed, loaded.model, loaded.feed
            recalibration = checked_recalibration_images(feed, bn_recalibrate) if bn_recalibrate else None
            asked, strategy = strategy, strategy or config["ranking"]  # (the run's own: its search ranked so)
            candidates = candidates or config["candidates"]
            if strategy == "exhaustive" and (eta is not None or first_share is not None):
                given = [flag for flag, value in (("--eta", eta), ("--first-share", first_share)) if value is not None]
                raise RunError(f"{' and '.join(given)} {'set' if len(given) > 1 else 'sets'} racing's rounds: "
                               f"{'they take' if len(given) > 1 else 'it takes'} --strategy racing, not exhaustive"
                               + ("" if asked else " (the run's config key ranking, taken without --strategy)"))
            eta, first_share = eta or config["racing_eta"], first_share or config["racing_first_share"]
            budget = Budget(config["max_params"] if max_params is None else max_params,
                            config["max_macs"] if max_macs is None else max_macs)
            # what a candidate's rounds and scores depend on (the evaluators all give the same scores); the
            # checkpoint's epoch, since `search --resume` may train a checkpointed run on after a ranking; the
            # device type, whose arithmetic may differ in the last bits (and flip a prediction)
            settings = {"strategy": strategy, "candidates": candidates, "bn_recalibrate": bn_recalibrate,
                        "checkpoint": checkpoint, "checkpoint_epoch": loaded.epoch,
                        "device": torch.device(device).type, **budget.settings(),
                        **({"eta": eta, "first_share": first_share} if strategy == "racing" else {})}
            started = time.perf_counter()
            sharding = {"shard": (rank_id, world), "gather": parallel.all_gather if world > 1 else None}
            if resume:  # (a resume with other settings is refused before any sizing; checked again under the lock)
                _check_resumable(out, settings)
            drawn, sizes = range(candidates), {}
            if budget and (note := check_reachable(model, budget, input_shape(config))) and rank_id == 0:
                print(f"note: {note}", file=sys.stderr)
            if budget or size_all:  # (before anything is written: a budget that nothing fits leaves no ranking
                # behind; a resume sizes again, a fraction of the ranking's time)
                cache = SizeCache(run_dir / SIZES_DIRECTORY, size_cache_key(checkpoint, loaded.epoch, device))
                sizes = candidate_sizes(model, seed, drawn, input_shape(config), progress=progress and rank_id == 0,
                                        cache=cache, **sharding)
                drawn = within_budget(sizes, budget) if budget else drawn
            sized = time.perf_counter()
            held.enter_context(writer_lock(run_dir, out.name, parallel))  # (before its rows are read or removed)
            if rank_id == 0 and out.is_dir():
                remove_interrupted_writes(out)
            if resume:
                _check_resumable(out, settings)
                if rank_id == 0 and not (out / "settings.json").is_file():
                    print(f"nothing to resume in {str(out)!r} (no ranking under --tag {tag} yet): a new ranking "
                          "starts", file=sys.stderr)
            if rank_id == 0 and not resume:
                shutil.rmtree(out, ignore_errors=True)
            parallel.barrier()  # nobody appends to a log that rank 0 is about to remove
            out.mkdir(exist_ok=True)
            if rank_id == 0:
                write_json(out / "settings.json", settings)

            def load_model():  # the authors' procedure: a fresh model and checkpoint for every candidate
                path = run_dir / CHECKPOINTS[checkpoint]
                state = torch.load(path, map_location=device, weights_only=False)
                if state["epoch"] != loaded.epoch:  # `search --resume` trains on: the ranking's rows would mix epochs
                    raise RunError(f"{str(path)!r} changed during the ranking (epoch "
                                   f"{loaded.epoch}, now {state['epoch']}): the run is training; rank it again when it "
                                   "ends, or now with the batched or sequential evaluator, which read the checkpoint "
                                   "once")
                return rebuild_for_evaluation(config, feed.num_classes, state["model"], device)

            def load_heldout():  # and the data set read again (the authors' loops did, CandidateScorer says)
                return build_feed(config, load_data(config, loaded.data_dir), torch.device(device),
                                  seed=seed).split("heldout")

            images, labels = feed.split("heldout")
            scorer = CandidateScorer(model, images, labels, seed=seed, evaluator=evaluator,
                                     batch_size=feed.eval_batch_size, rows_per_pass=config["rank_rows"],
                                     prepare=feed.prepare_eval, load_model=load_model,
                                     load_heldout=load_heldout if evaluator == "reload" else None,
                                     recalibration_images=recalibration)
            log = ProgressLog(out, rank_id)
            rows = rank(scorer, drawn, strategy=strategy, eta=eta, first_share=first_share, log=log,
                        progress=progress and rank_id == 0, **sharding)
            rows = [{**row, **sizes.get(row["id"], {})} for row in rows]

            finalist_sizes = dict(sizes)

            def size_of(candidate: int) -> dict:  # its exported network's {params, macs}, materialized once
                if candidate not in finalist_sizes:
                    finalist_sizes[candidate] = candidate_size(model, candidate_masks(model, seed, candidate),
                                                               input_shape(config))
                return finalist_sizes[candidate]

            best = best_candidate(rows)
            best = {**best, **size_of(best["id"])}
            front = pareto_front(rows) if sizes else []
            finalists = sorted((r for r in rows if r["images"] == best["images"]), key=best_first)[:top]
            summary = {"run_dir": str(run_dir), "tag": tag, "posterior": config["posterior"], **settings,
                       "checkpoint": checkpoint,
                       "ranked_candidates": len(rows),  # under a budget, those of the drawn that fit
                       "evaluator": evaluator, "best": best, "tied_for_best": tied_for_best(rows),
                       "pareto": [r["id"] for r in front] if sizes else None,
                       "first_round_cut": first_round_cut(rows),
                       "images_evaluated": sum(r["images"] for r in rows),
                       "resumed_evaluations": log.restored,  # done before this resume
                       # this process's ranking (a resume's: what was left), loading the run and sizing the
                       # candidates not included
                       "seconds": time.perf_counter() - sized, "sizing_seconds": sized - started,
                       "world_size": world}
            if rank_id == 0:
                write_jsonl(out / "candidates.jsonl", rows)
                write_json(out / "top.json", [
                    architecture_record(model, candidate_masks(model, seed, r["id"]), config=config, seed=seed,
                                        candidate=r, test_accuracy=None, size=size_of(r["id"])) for r in finalists])
                if sizes:
                    write_json(out / "pareto.json", front)
                else:  # (one of an earlier, sized run of the ranking, which this resume did not size)
                    (out / "pareto.json").unlink(missing_ok=True)
                write_json(out / "summary.json", summary)
            parallel.barrier()
            return summary
    finally:
        if parallel.enabled:
            leave()  # (run_search does the same)


def _held_ranking(out: Path) -> str | None:
    """What ranking `out` holds, in words; None: none."""
    if (out / "summary.json").is_file():
        return "finished"
    started = (out / "settings.json").is_file() or any(out.glob("progress-rank*.jsonl"))
    return "started, not finished" if started else None


def _check_resumable(out: Path, settings: dict) -> None:
    """A ranking resumes only with the settings it was started with: its progress rows hold scores of
    rounds that other settings cut differently (mixed, they can count more correct than seen)."""
    try:
        started = json.loads((out / "settings.json").read_text())
    except (OSError, json.JSONDecodeError):
        if any(out.glob("progress-rank*.jsonl")):  # (settings.json is written before any row)
            raise RunError(f"{str(out)!r} holds progress rows but no readable settings.json: the settings its "
                           "rows were scored with are unknown; rank afresh (--overwrite) or under another "
                           "--tag") from None
        return  # not started yet: nothing to compare
    # (settings files older than these keys: the values they ran with)
    started = {"checkpoint": "last", "max_params": 0, "max_macs": 0, **started}
    ranked, now = started["checkpoint"], settings["checkpoint"]
    if ranked != now:
        raise RunError(f"{str(out)!r} ranks the {ranked} checkpoint ({CHECKPOINTS[ranked]}), this resume asks for the "
                       f"{now}: resume it with --checkpoint {ranked}, or rank under another --tag")
    if started.get("checkpoint_epoch", settings["checkpoint_epoch"]) != settings["checkpoint_epoch"]:
        raise RunError(f"{str(out)!r} ranked the {CHECKPOINTS[now]} of epoch {started['checkpoint_epoch']}, but the "
                       f"run has trained on since (now epoch {settings['checkpoint_epoch']}): its scores are of other "
                       "weights; rank afresh (--overwrite) or under another --tag")
    # (settings.json files older than the device entry hold none: not compared; racing's eta and first
    # share follow from the strategy: named only where both rankings race)
    ignore = ("checkpoint_epoch", *(() if "device" in started else ("device",)),
              *(() if started.get("strategy") == settings["strategy"] else ("eta", "first_share")))
    changed = changed_settings(started, settings, ignore=ignore)
    if changed:
        raise RunError(f"{str(out)!r} was started with {', '.join(changed)}; resume it with the settings it was "
                       f"started with, or rank under another --tag")


__all__ = ["RunError", "rank_run"]
