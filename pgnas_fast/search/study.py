"""`pgnas-fast study RUN_DIR`: the paper's sampling studies on a finished search, as markdown + PNG.

- Guided vs random sampling at the same expected drop rate (paper Table 3): K candidates from the
  learned p against K with every gate at the mean p, all scored on the whole held-out set.
- Best candidate vs number of candidates (paper Table 6): the best held-out accuracy among the
  first n guided candidates, and that candidate's test accuracy, for growing n.
- Racing vs exhaustive agreement: the rank of racing's winner among the exhaustive scores (ties
  share a rank; the issue's check is top 3), the images each strategy read, and Kendall's tau
  against the exhaustive scores of every candidate's first-round score (what the first cut orders)
  and of the final racing scores of the candidates that survived the first round.
"""
from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy

from ..interrupts import interrupts_deferred
from ..nn import candidate_masks, set_gates
from ..ops.streams import Domain
from .io import RunError, write_json, writer_lock
from .parallel import SINGLE_PROCESS
from .rank import (CandidateScorer, accuracy, best_candidate, counted, cut_note, first_round_cut, rank,
                   round_ends, uniform_drop_logits)
from .report import percent
from .run import load_run


def none_if_nan(value: float) -> float | None:
    """A correlation as the JSON files keep it: None where it is undefined (NaN)."""
    return None if math.isnan(value) else value


def kendall_tau(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's tau-b of two paired score lists (pairs tied in both left out, as in tau-b); NaN where
    undefined (fewer than two items, or either list entirely tied). Pairs compared a block of rows at a
    time: 10,000 candidates are 5e7 pairs."""
    x, y = numpy.asarray(xs, dtype=numpy.float64), numpy.asarray(ys, dtype=numpy.float64)
    # tau-b = (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y)
    signed = untied_x = untied_y = 0
    for lo in range(0, len(x), 512):
        rows = numpy.arange(lo, min(lo + 512, len(x)))[:, None]
        later = numpy.arange(lo, len(x))[None, :] > rows  # each pair once
        sx = numpy.sign(x[rows] - x[None, lo:])[later]
        sy = numpy.sign(y[rows] - y[None, lo:])[later]
        signed += int((sx * sy).sum())
        untied_x += int(numpy.count_nonzero(sx))
        untied_y += int(numpy.count_nonzero(sy))
    denominator = math.sqrt(untied_x * untied_y)
    return signed / denominator if denominator else float("nan")


def score_rank(rows: list[dict], candidate: int) -> int:
    """1 + the number of candidates scoring strictly higher: tied candidates share a rank."""
    score = next(r["score"] for r in rows if r["id"] == candidate)
    return 1 + sum(r["score"] > score for r in rows)


def _counts_up_to(count: int) -> list[int]:
    steps, n = [], 1
    while n < count:
        steps += [m * n for m in (1, 2, 5) if m * n < count]
        n *= 10
    return steps + [count]


def _plots(out: Path, guided: list[dict], random: list[dict], curve: list[dict], racing: list[dict],
           exhaustive: dict[int, float]) -> list[str]:
    with interrupts_deferred():  # (matplotlib's first import)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i / 50 for i in range(51)]
    ax.hist([100 * r["score"] for r in guided], bins=[100 * b for b in bins], alpha=0.7, label="guided (learned p)")
    if random:
        ax.hist([100 * r["score"] for r in random], bins=[100 * b for b in bins], alpha=0.7,
                label="random (mean p everywhere)")
    ax.set_xlabel("held-out accuracy (%)")
    ax.set_ylabel("candidates")
    ax.set_title("Guided vs random sampling (this run; cf. paper Table 3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "guided_vs_random.png", dpi=120)
    files.append("guided_vs_random.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([c["candidates"] for c in curve], [100 * c["best_heldout"] for c in curve], marker="o",
            label="best held-out")
    ax.plot([c["candidates"] for c in curve], [100 * c["its_test"] for c in curve], marker="s", label="its test")
    ax.set_xscale("log")
    ax.set_xlabel("candidates sampled")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Best candidate vs number of candidates\n(this run; cf. paper Table 6)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "best_vs_candidates.png", dpi=120)
    files.append("best_vs_candidates.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    seen = sorted({r["images"] for r in racing})
    for images in seen:
        group = collections.Counter((100 * exhaustive[r["id"]], 100 * r["score"])
                                    for r in racing if r["images"] == images)
        # scores are coarse: candidates on one point are one marker, sized by their count
        ax.scatter([x for x, _ in group], [y for _, y in group], s=[8 * n for n in group.values()], alpha=0.6,
                   label=f"scored on {images} images")
    lows, highs = ax.get_xlim(), ax.get_ylim()
    span = (min(lows[0], highs[0]), max(lows[1], highs[1]))
    ax.plot(span, span, color="grey", linewidth=0.8, label="racing = exhaustive")
    winner = best_candidate(racing)
    ax.scatter([100 * exhaustive[winner["id"]]], [100 * winner["score"]], marker="*", s=120, color="black",
               label=f"racing's winner ({winner['id']})")
    ax.set_xlabel("exhaustive held-out accuracy (%)")
    ax.set_ylabel("racing score (%)")
    ax.set_title("Racing vs exhaustive (marker area: candidates)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "racing_vs_exhaustive.png", dpi=120)
    files.append("racing_vs_exhaustive.png")
    plt.close(fig)
    return files


def run_study(run_dir: str | Path, *, candidates: int = 1000, tag: str = "default", overwrite: bool = False,
              checkpoint: str = "last", device: str = "cpu", data_dir=None, progress: bool = True) -> dict:
    """The studies of a run into study-TAG/, with the weights of `checkpoint` (run.CHECKPOINTS); a tag
    that holds one is replaced only with `overwrite` (on the paper presets a study ranks thousands of
    candidates, hours of work)."""
    run_dir = Path(run_dir)
    out = run_dir / f"study-{tag}"
    if (out / "study.json").exists() and not overwrite:
        raise RunError(f"{str(out)!r} holds a study: --overwrite replaces it, or study under another --tag")
    loaded = load_run(run_dir, device=device, data_dir=data_dir, checkpoint=checkpoint)
    # held while it writes: a fresh search into the run, which removes study-*/, and a second study under
    # the tag are refused meanwhile
    with writer_lock(run_dir, out.name, SINGLE_PROCESS):
        return _study(run_dir, loaded, out, candidates=candidates, progress=progress)


def _study(run_dir: Path, loaded, out: Path, *, candidates: int, progress: bool) -> dict:
    config, seed, model, feed = loaded.config, loaded.seed, loaded.model, loaded.feed
    out.mkdir(exist_ok=True)
    heldout = feed.split("heldout")

    def scorer(**kwargs):
        return CandidateScorer(model, *heldout, seed=seed, batch_size=feed.eval_batch_size,
                               rows_per_pass=config["rank_rows"], prepare=feed.prepare_eval, **kwargs)

    guided = rank(scorer(), range(candidates), progress=progress, desc="guided candidates")
    random = rank(scorer(domain=Domain.RANDOM_CANDIDATE, p_logits=uniform_drop_logits(model)), range(candidates),
                  progress=progress, desc="random candidates")
    racing = rank(scorer(), range(candidates), strategy="racing", eta=config["racing_eta"],
                  first_share=config["racing_first_share"], progress=progress, desc="racing")

    curve = []
    for n in _counts_up_to(candidates):
        best = best_candidate(guided[:n])
        set_gates(model, "hard", masks=candidate_masks(model, seed, best["id"]))
        curve.append({"candidates": n, "best_id": best["id"], "best_heldout": best["score"],
                      "its_test": accuracy(model, feed.eval_batches("test"))})
    set_gates(model, "full")

    exhaustive = {r["id"]: r["score"] for r in guided}
    winner = best_candidate(racing)
    first_round = round_ends("racing", len(heldout[1]), config["racing_eta"], config["racing_first_share"])[0]
    survivors = [r for r in racing if r["images"] > first_round]
    result = {
        "run_dir": str(run_dir), "preset": config["preset"], "posterior": config["posterior"], "seed": seed,
        "candidates": candidates, "checkpoint": loaded.checkpoint,
        "checkpoint_epoch": loaded.epoch,  # (a run may be studied while it trains)
        "epochs": config["epochs"], "data": feed.sizes(),
        "guided": {"mean": statistics.fmean(r["score"] for r in guided),
                   "std": statistics.pstdev(r["score"] for r in guided),
                   "best": max(r["score"] for r in guided),
                   "kept_fraction": statistics.fmean(r["kept_fraction"] for r in guided)},
        "random": {"mean": statistics.fmean(r["score"] for r in random),
                   "std": statistics.pstdev(r["score"] for r in random),
                   "best": max(r["score"] for r in random),
                   "kept_fraction": statistics.fmean(r["kept_fraction"] for r in random)},
        "best_vs_candidates": curve,
        "racing": {"winner": winner["id"], "exhaustive_winner": best_candidate(guided)["id"],
                   "winner_exhaustive_rank": score_rank(guided, winner["id"]),
                   "images": sum(r["images"] for r in racing), "exhaustive_images": sum(r["images"] for r in guided),
                   "first_round_images": first_round, "survivors": len(survivors),
                   "first_round_cut": first_round_cut(racing),
                   # None (JSON null) where tau is undefined: fewer than two candidates, or a list all tied.
                   # The first round's scores of every candidate against their exhaustive ones: the order
                   # racing's first cut acts on
                   "kendall_tau_first_round": none_if_nan(kendall_tau([r["first_round_score"] for r in racing],
                                                                       [exhaustive[r["id"]] for r in racing])),
                   # the survivors' final racing scores (a finalist's is its exhaustive score: those pairs agree
                   # by construction)
                   "kendall_tau_survivors": none_if_nan(kendall_tau([r["score"] for r in survivors],
                                                                     [exhaustive[r["id"]] for r in survivors]))},
    }
    result["plots"] = _plots(out, guided, random, curve, racing, exhaustive)
    write_json(out / "study.json", result)
    (out / "study.md").write_text(report_markdown(result))
    return result


def correlation_text(value: float | None) -> str:
    """A correlation (none_if_nan's) as the reports and the command line show it."""
    return "undefined (fewer than two candidates, or every score tied)" if value is None else f"{value:.3f}"


def report_markdown(s: dict) -> str:
    g, r, race = s["guided"], s["random"], s["racing"]
    lines = [
        f"# Sampling studies: {s['preset']} ({s['posterior']} posterior), seed {s['seed']}, "
        f"{s['candidates']} candidates",
        "",
        f"The weights of epoch {s['checkpoint_epoch']} (of {s['epochs']}"
        + ("; checkpoint-best.pt, the lowest training objective" if s.get("checkpoint") == "best" else "")
        + "); every candidate scored on the "
        f"{s['data']['heldout']} held-out images (racing: its share), test accuracies on the {s['data']['test']} test "
        "images; std over the candidates (population).",
        "",
        "## Guided vs random sampling (paper Table 3)",
        "",
        "| sampling | mean held-out | std | best | kept channels |",
        "|---|---|---|---|---|",
        f"| guided (learned p) | {percent(g['mean'])} | {percent(g['std'])} | {percent(g['best'])} | "
        f"{percent(g['kept_fraction'])} |",
        f"| random (mean p everywhere) | {percent(r['mean'])} | {percent(r['std'])} | {percent(r['best'])} | "
        f"{percent(r['kept_fraction'])} |",
        "",
        "For comparison only (another dataset and metric: CIFAR-10 test **error** of the chosen candidate, not "
        "this run's held-out accuracy), the paper's guided vs random sampling without fine-tuning: EI 2.56 vs "
        "13.45%, E 2.73 vs 15.87%, MI 2.06 vs 9.75%, M 2.20 vs 2.63%.",
        "",
        "![guided vs random](guided_vs_random.png)",
        "",
        "## Best candidate vs number of candidates (paper Table 6)",
        "",
        "| candidates | best id | best held-out | its test |",
        "|---|---|---|---|",
        *[f"| {c['candidates']} | {c['best_id']} | {percent(c['best_heldout'])} | {percent(c['its_test'])} |"
          for c in s["best_vs_candidates"]],
        "",
        "For comparison only (CIFAR-10 test **error**, not this run's accuracy), the paper's candidates -> error: "
        "50 -> 2.17%, 500 -> 2.06%, 1.5k -> 2.06%, 5k -> 2.04%, 10k -> 1.98%.",
        "",
        "![best vs candidates](best_vs_candidates.png)",
        "",
        "## Racing vs exhaustive",
        "",
        f"Racing's winner is candidate {race['winner']} (exhaustive winner {race['exhaustive_winner']}); its "
        f"exhaustive score ranks {race['winner_exhaustive_rank']} (ties share a rank). Racing read "
        f"{race['images']} candidate-images, exhaustive {race['exhaustive_images']} "
        f"({race['exhaustive_images'] / race['images']:.1f}x more).",
        "",
        f"Kendall's tau against the exhaustive scores: of every candidate's score on the first round's "
        f"{race['first_round_images']} images (the order racing's first cut acts on), "
        f"{correlation_text(race['kendall_tau_first_round'])}; of the final racing scores of the "
        f"{counted(race['survivors'], 'first-round survivor')}, {correlation_text(race['kendall_tau_survivors'])} (a "
        "finalist's racing score is its exhaustive score, so pairs of finalists agree by construction)."
        + (f" Note: {note}." if (note := cut_note(race.get("first_round_cut"))) else ""),
        "",
        "![racing vs exhaustive](racing_vs_exhaustive.png)",
        "",
    ]
    return "\n".join(lines)


__all__ = ["correlation_text", "kendall_tau", "none_if_nan", "report_markdown", "run_study", "score_rank"]
