"""What a run directory holds (`pgnas-fast info RUN_DIR`), from its JSON files alone (no checkpoint
is loaded: the paper presets' are hundreds of MB): the search's config and progress, its chosen
candidate, and every `rank`, `study`, `train` and `correlate` result in it; and over several runs
(seeds) of one protocol, the mean and spread of their chosen candidates (`across_runs`)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .. import configs
from .io import SEARCH_RANKINGS, RunError, complete_lines, export_file_in, read_json_object


def _ranking(folder: Path) -> dict:
    summary = read_json_object(folder / "summary.json")
    if summary is not None and isinstance(summary.get("best"), dict):
        return {"tag": folder.name.removeprefix("rank-"), "state": "finished", "best": summary["best"],
                **{key: summary.get(key) for key in ("candidates", "ranked_candidates", "strategy", "evaluator",
                                                     "bn_recalibrate", "checkpoint", "checkpoint_epoch",
                                                     "max_params", "max_macs", "pareto")}}
    settings = read_json_object(folder / "settings.json")
    logged = sum(complete_lines(log) for log in folder.glob("progress-rank*.jsonl"))
    return {"tag": folder.name.removeprefix("rank-"), "state": "started, not finished",
            "settings": settings, "evaluations_logged": logged}


def _study(folder: Path) -> dict:
    study = read_json_object(folder / "study.json")
    if study is None:
        return {"tag": folder.name.removeprefix("study-"), "state": "started, not finished"}
    return {"tag": folder.name.removeprefix("study-"), "state": "finished",
            **{key: study.get(key) for key in ("candidates", "checkpoint", "checkpoint_epoch")},
            "guided_mean": study.get("guided", {}).get("mean"), "random_mean": study.get("random", {}).get("mean")}


def _training(folder: Path) -> dict:
    export = read_json_object(folder / "export.json")
    if export is None:
        return {"tag": folder.name.removeprefix("train-"), "state": "started, not finished",
                "settings": read_json_object(folder / "settings.json"),
                "epochs_trained": complete_lines(folder / "train_log.jsonl")}
    return {"tag": folder.name.removeprefix("train-"), "state": "finished",
            **{key: export.get(key) for key in ("candidate", "init", "epochs", "checkpoint", "checkpoint_epoch",
                                                "heldout_accuracy", "test_accuracy", "inherited_heldout_accuracy",
                                                "inherited_test_accuracy")}}


def _correlation(folder: Path) -> dict:
    result = read_json_object(folder / "correlation.json")
    if result is None:
        trained = sum((c / "export.json").is_file() for c in folder.glob("c*") if c.is_dir())
        return {"tag": folder.name.removeprefix("correlate-"), "state": "started, not finished",
                "candidates_trained": trained}
    return {"tag": folder.name.removeprefix("correlate-"), "state": "finished",
            "candidates": len(result.get("candidates") or []),
            "pick": result.get("pick", "spread"),  # (correlations from before the choice spread them)
            **{key: result.get(key) for key in ("kendall_tau", "spearman_rho", "training")}}


def _changes(config: dict) -> dict | None:
    """The config's keys that differ from its preset's (for its posterior family), or None when the
    config does not resolve (another version's)."""
    try:
        preset = config["preset"]
        resolved = configs.resolve(preset, {k: v for k, v in config.items() if k != "preset"})
        base = configs.resolve(preset, {"posterior": resolved["posterior"]})
        # keys derived from the epochs (the Gaussian family's KL warm-up) follow them: not changes of their own
        derived = configs.resolve(preset, {"posterior": resolved["posterior"], "epochs": resolved["epochs"]})
    except (KeyError, TypeError, configs.ConfigError):
        return None
    return {key: value for key, value in resolved.items()
            if key != "posterior" and value != (base if key == "epochs" else derived).get(key)}


def run_info(run_dir: str | Path) -> dict:
    """{run_dir, preset, seed, posterior, config, changes (from the preset), epochs, epochs_trained,
    finished, num_classes (the data's, once finished; None before, and in runs older than the key), chosen,
    rankings, studies, trainings, correlations} of a run directory; RunError if it holds no run (no readable
    config.json)."""
    run_dir = Path(run_dir)
    if name := export_file_in(run_dir):
        raise RunError(f"{str(run_dir)!r} is an export directory ({name}: pgnas-fast export or train wrote it), not "
                       "a run: `pgnas-fast evaluate` scores its network")
    run_config = read_json_object(run_dir / "config.json")
    if run_config is None or not isinstance(run_config.get("config"), dict):
        raise RunError(f"{str(run_dir)!r} is not a run directory: no readable config.json (pgnas-fast search "
                       "writes it)")
    config = run_config["config"]
    summary = read_json_object(run_dir / "summary.json")
    arch = read_json_object(run_dir / "architecture.json")
    chosen = None
    if summary is not None and arch is not None:
        chosen = {"candidate": arch.get("candidate"), "candidates": summary.get("candidates"),
                  "drawn_candidates": summary.get("drawn_candidates"), "heldout_accuracy": arch.get("score"),
                  "test_accuracy": arch.get("test_accuracy"), "kept_fraction": arch.get("kept_fraction"),
                  "params": arch.get("params"), "macs": arch.get("macs")}
    own = set(SEARCH_RANKINGS.values())  # the search's progress logs, not `rank` results
    return {
        "run_dir": str(run_dir), "preset": config.get("preset"), "seed": run_config.get("seed"),
        "posterior": config.get("posterior", "concrete"), "config": config, "changes": _changes(config),
        "epochs": config.get("epochs"), "epochs_trained": complete_lines(run_dir / "train_log.jsonl"),
        "finished": summary is not None, "chosen": chosen,
        "num_classes": summary.get("num_classes") if summary is not None else None,
        "rankings": [_ranking(folder) for folder in sorted(run_dir.glob("rank-*"))
                     if folder.is_dir() and folder.name not in own],
        "studies": [_study(folder) for folder in sorted(run_dir.glob("study-*")) if folder.is_dir()],
        "trainings": [_training(folder) for folder in sorted(run_dir.glob("train-*")) if folder.is_dir()],
        "correlations": [_correlation(folder) for folder in sorted(run_dir.glob("correlate-*")) if folder.is_dir()],
    }


# what across_runs averages: the chosen candidate's accuracies and sizes
AVERAGED = ("heldout_accuracy", "test_accuracy", "params", "macs")


def across_runs(runs: list[dict]) -> list[dict]:
    """Per protocol (preset, posterior and the config's changes from the preset: runs that differ only in
    their seed), in the order the protocols first appear: {preset, posterior, changes, runs (finished),
    seeds (theirs), unfinished (their seeds), and for each of AVERAGED over the finished runs {mean, std
    (sample; 0 for one run), min, max}, or None without one}."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        changes = run["changes"] if run["changes"] is not None else {"config": run["config"]}
        groups.setdefault((run["preset"], run["posterior"], json.dumps(changes, sort_keys=True)), []).append(run)
    rows = []
    for (preset, posterior, changes), group in groups.items():
        members = [r for r in group if r["chosen"] is not None]
        row = {"preset": preset, "posterior": posterior, "changes": json.loads(changes), "runs": len(members),
               "seeds": [r["seed"] for r in members], "unfinished": [r["seed"] for r in group if r["chosen"] is None]}
        for key in AVERAGED:
            values = [r["chosen"][key] for r in members if r["chosen"].get(key) is not None]
            row[key] = None if not values else {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}
        rows.append(row)
    return rows


__all__ = ["across_runs", "run_info"]
