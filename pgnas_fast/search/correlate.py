"""`pgnas-fast correlate RUN_DIR`: does the search's ranking predict how its candidates do when
trained alone?

PGNAS ranks candidates by their held-out accuracy with the weights they inherit from the
super-network. This takes N candidates of the search's ranking (candidates.jsonl: the search's choice
first, then the score every candidate has on the same images, `first_round_score`, ties broken as the
search breaks them), spread evenly over it (`pick` "spread": how well the ranking predicts across
it) or its top N ("top": which of the best does best trained alone, and how well the ranking orders
them), trains each alone (standalone.py: from scratch by default) into
RUN_DIR/correlate-TAG/c<ID>/, and writes correlation.json, correlation.md and correlation.png: per
candidate its rank among all ranked (by that score), its held-out accuracy with the inherited weights
on the whole held-out split (`inherited_score`; racing scored most candidates on a share of it), and
its held-out and test accuracy after training; Kendall's tau-b and Spearman's rho between the
inherited scores and the trained held-out accuracies (both on the same images); where the search's
choice lands among the trained ones. `--resume` continues a cut correlation: a finished candidate is
read back, a cut one resumes from its checkpoint. Everything is checked before anything is written.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy

from ..interrupts import interrupts_deferred
from .io import RunError, changed_settings, data_dir_of, read_json_object, read_jsonl, write_json, writer_lock
from .parallel import SINGLE_PROCESS
from .rank import best_first, counted
from .report import percent
from .standalone import DEFAULT_WEIGHT_DECAY, check_training_settings, held_training, start_text, train_candidate
from .run import load_run
from .study import correlation_text, kendall_tau, none_if_nan


PICKS = ("spread", "top")


def pick_from_ranking(rows: list[dict], count: int, first: int, pick: str = "spread") -> list[dict]:
    """`count` of the ranked `rows` in the search's order: candidate `first` (the search's choice), then the
    others by first_round_score (best first; ties to the smaller network, then the lower id, as the search
    breaks them). pick "spread": evenly spaced in that order (the choice, the worst and the ranks
    between); "top": the first `count`."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    ordered = sorted(rows, key=lambda r: (r["id"] != first, *best_first({**r, "score": r["first_round_score"]})))
    if count == 1 or pick == "top":
        return ordered[:count]
    picks = sorted({round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)})
    return [ordered[i] for i in picks]


def spearman_rho(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the two lists' ranks (ties share their mean rank); NaN
    where undefined (fewer than two items, or either list entirely tied)."""
    def ranks(values):
        values = numpy.asarray(values, dtype=numpy.float64)
        order = values.argsort(kind="stable")
        ranked = numpy.empty(len(values))
        ranked[order] = numpy.arange(len(values), dtype=numpy.float64)
        for value in numpy.unique(values):  # ties: their mean rank
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    if len(xs) < 2:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator else float("nan")


def correlate_run(run_dir: str | Path, *, candidates: int = 8, pick: str = "spread", init: str = "scratch",
                  epochs: int | None = None, lr: float | None = None, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                  seed: int | None = None, tag: str = "default", resume: bool = False, overwrite: bool = False,
                  device: str = "cpu", data_dir=None, progress: bool = True) -> dict:
    """Train `candidates` candidates of a run alone and correlate (see the module's docstring); returns
    correlation.json's content. Unset `epochs`, `lr` and `seed` take the run's."""
    run_dir = Path(run_dir)
    out = run_dir / f"correlate-{tag}"
    check_training_settings(init=init, epochs=epochs, lr=lr, weight_decay=weight_decay)
    if pick not in PICKS:
        raise RunError(f"--pick must be one of {', '.join(PICKS)}, got {pick!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise RunError(f"--candidates must be an int >= 2 (a correlation needs two), got {candidates!r}")
    try:
        ranked = read_jsonl(run_dir / "candidates.jsonl")
        chosen_by_search = json.loads((run_dir / "architecture.json").read_text())["candidate"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{str(run_dir)!r} holds no finished search to correlate (candidates.jsonl and "
                       f"architecture.json: {type(err).__name__}: {err})") from None
    if candidates > len(ranked):
        raise RunError(f"--candidates {candidates} is more than the {len(ranked)} the search ranked")
    if _holds_correlation(out) and not (resume or overwrite):
        raise RunError(f"{str(out)!r} holds a correlation: --resume continues it, --overwrite replaces it, or "
                       "correlate under another --tag")
    # the run, its data and the device checked before anything is written or removed (each training
    # loads them again)
    loaded = load_run(run_dir, device=device, data_dir=data_dir_of(run_dir, data_dir))
    picked = pick_from_ranking(ranked, candidates, chosen_by_search, pick)
    settings = {"candidates": [r["id"] for r in picked], "pick": pick, "init": init,
                "epochs": epochs or loaded.config["epochs"], "lr": loaded.config["lr"] if lr is None else lr,
                "weight_decay": weight_decay, "seed": loaded.seed if seed is None else seed}
    del loaded  # (its super-network's memory is the trainings')
    out.mkdir(exist_ok=True)
    with writer_lock(run_dir, out.name, SINGLE_PROCESS):
        if resume and (out / "settings.json").exists():
            started = read_json_object(out / "settings.json")
            if started is None:
                raise RunError(f"{str(out / 'settings.json')!r} is unreadable: the settings of the trainings in "
                               f"{str(out)!r} are unknown; correlate afresh (--overwrite) or under another --tag")
            started.setdefault("pick", "spread")  # (correlations from before the choice spread them)
            if changed := changed_settings(started, settings):
                raise RunError(f"{str(out)!r} was started with other settings: {'; '.join(changed)} ('now': this "
                               "command's). Resume with the same ones, or --overwrite")
        else:
            for stale in out.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif not stale.name.startswith("."):  # (not the candidates' lock files)
                    stale.unlink()
        write_json(out / "settings.json", settings)
        trained = []
        for number, row in enumerate(picked, 1):
            directory = out / f"c{row['id']}"
            if progress:
                print(f"candidate {row['id']} ({number} of {len(picked)}; search score "
                      f"{percent(row['first_round_score'])})", file=sys.stderr)
            # a finished one is read back; a cut one resumes; an unreadable export.json is written again
            summary = read_json_object(directory / "export.json")
            if summary is None or not TRAINED_KEYS <= summary.keys():
                summary = train_candidate(run_dir, candidate=row["id"], init=init, epochs=settings["epochs"],
                                          lr=settings["lr"], weight_decay=weight_decay, seed=settings["seed"],
                                          out=directory, resume=directory.exists(), device=device,
                                          data_dir=data_dir, progress=progress)
            trained.append({"id": row["id"], "ranking_score": row["first_round_score"],
                            "inherited_rank": 1 + sum(r["first_round_score"] > row["first_round_score"]
                                                      for r in ranked),
                            "inherited_score": summary["inherited_heldout_accuracy"],
                            "heldout_accuracy": summary["heldout_accuracy"], "test_accuracy": summary["test_accuracy"],
                            "params": summary["params_subnet"], "macs": summary["macs_subnet"]})
        result = _correlation(trained, ranked=len(ranked), chosen_by_search=chosen_by_search, pick=pick,
                              training={"init": init, "epochs": settings["epochs"], "lr": settings["lr"],
                                        "weight_decay": weight_decay, "training_seed": settings["seed"]})
        result["plot"] = _plot(out, trained, chosen_by_search)
        write_json(out / "correlation.json", result)
        (out / "correlation.md").write_text(report_markdown(result))
        return result


def _holds_correlation(out: Path) -> bool:
    """Whether `out` holds a correlation's work: a training begun, or its result. Settings alone (a
    correlation stopped before its first training, e.g. at a data error) are replaced by a new one."""
    if (out / "correlation.json").exists():
        return True
    return out.is_dir() and any(held_training(entry) is not None for entry in out.iterdir() if entry.is_dir())


# what correlate reads of a candidate's export.json
TRAINED_KEYS = {"inherited_heldout_accuracy", "heldout_accuracy", "test_accuracy", "params_subnet", "macs_subnet"}


def _correlation(trained: list[dict], *, ranked: int, chosen_by_search: int, pick: str, training: dict) -> dict:
    inherited = [t["inherited_score"] for t in trained]
    after = [t["heldout_accuracy"] for t in trained]
    best_after = max(trained, key=lambda t: (t["heldout_accuracy"], -t["id"]))
    search_choice = next((t for t in trained if t["id"] == chosen_by_search), None)
    return {
        "candidates": trained, "ranked": ranked, "pick": pick, "training": training,
        "kendall_tau": none_if_nan(kendall_tau(inherited, after)),
        "spearman_rho": none_if_nan(spearman_rho(inherited, after)),
        # the search's choice (the best ranking score; racing's finalists by their full scores) among the trained
        "search_choice": chosen_by_search,
        "search_choice_trained_rank": (None if search_choice is None else
                                       1 + sum(t["heldout_accuracy"] > search_choice["heldout_accuracy"]
                                               for t in trained)),
        "best_trained": best_after["id"], "best_trained_inherited_rank": best_after["inherited_rank"],
    }


def _plot(out: Path, trained: list[dict], chosen_by_search: int) -> str:
    with interrupts_deferred():  # (matplotlib's first import)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([100 * t["inherited_score"] for t in trained], [100 * t["heldout_accuracy"] for t in trained],
               label="candidates")
    choice = [t for t in trained if t["id"] == chosen_by_search]
    if choice:
        ax.scatter([100 * choice[0]["inherited_score"]], [100 * choice[0]["heldout_accuracy"]], marker="*", s=150,
                   color="black", label=f"the search's choice ({chosen_by_search})")
    ax.set_xlabel("held-out accuracy, inherited weights (%)")
    ax.set_ylabel("held-out accuracy, trained alone (%)")
    ax.set_title("The search's ranking against training alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "correlation.png", dpi=120)
    plt.close(fig)
    return "correlation.png"


def report_markdown(s: dict) -> str:
    t = s["training"]
    picked = picked_text(s)
    lines = [
        "# The search's ranking against training alone", "",
        f"{picked[:1].upper()}{picked[1:]}, each trained alone from "
        f"{start_text(t['init'])} for {counted(t['epochs'], 'epoch')} "
        f"(lr {t['lr']:g}, weight decay {t['weight_decay']:g}, seed {t['training_seed']}).", "",
        "- Kendall's tau-b, inherited score against held-out accuracy after training: "
        f"{correlation_text(s['kendall_tau'])}",
        f"- Spearman's rho: {correlation_text(s['spearman_rho'])}",
        (f"- The search's choice, candidate {s['search_choice']}, is number {s['search_choice_trained_rank']} of "
         f"{len(s['candidates'])} after training" if s["search_choice_trained_rank"] is not None else
         f"- The search's choice, candidate {s['search_choice']}, is not among these"),
        f"- The best after training, candidate {s['best_trained']}, was number "
        f"{s['best_trained_inherited_rank']} of {s['ranked']} in the search", "",
        "| candidate | inherited score (search's rank) | held-out, trained | test, trained | parameters "
        "| MACs per image |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {c['id']} | {percent(c['inherited_score'])} ({c['inherited_rank']}) | "
              f"{percent(c['heldout_accuracy'])} | {percent(c['test_accuracy'])} | {c['params']:,} | {c['macs']:,} |"
              for c in s["candidates"]]
    lines += ["", f"![inherited against trained]({s['plot']})", ""]
    return "\n".join(lines)


def picked_text(s: dict) -> str:
    """Which candidates a correlation (correlation.json's content) trained, in words."""
    n = len(s["candidates"])
    if s.get("pick", "spread") == "top":  # (correlations from before the choice spread them)
        return f"the top {counted(n, 'candidate')} of the search's ranking of {s['ranked']}"
    return f"{counted(n, 'candidate')} spread over the search's ranking of {s['ranked']}"


__all__ = ["PICKS", "correlate_run", "pick_from_ranking", "picked_text", "report_markdown", "spearman_rho"]
