"""The run report: `report.md` with four figures, written at the end of every search
(`write_report(run_dir)` writes it again from the run's files).

- p_per_layer.png: the learned drop probability of every gate group, layer by layer;
- kept_per_layer.png: the chosen candidate's kept fraction of input channels per gated layer;
- candidate_scores.png: the held-out accuracy of every ranked candidate, guided and random baseline, on
  the images all of them saw (racing: its first round's);
- training.png: loss, cross-entropy, regulariser, train accuracy and mean p per epoch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy

from .. import configs
from ..data.imagenet import CROP_SCALE
from ..interrupts import interrupts_deferred
from .budget import Budget
from .io import DATA_FILE, read_json_object, read_jsonl
from .rank import counted, cut_note

# Published results of the paper's protocols: test error (%) without fine-tuning (Tables 1-3).
PAPER_ERROR = {
    "cifar10-supnet-m": ("CIFAR-10 test error, PGNAS-M", 2.20),
    "cifar10-supnet-mi": ("CIFAR-10 test error, PGNAS-MI", 2.06),
    "cifar100-supnet-mi": ("CIFAR-100 test error, PGNAS-MI", 14.28),
    "cifar10-supnet-e": ("CIFAR-10 test error, PGNAS-E", 2.73),
    "cifar10-supnet-ei": ("CIFAR-10 test error, PGNAS-EI", 2.56),
    "imagenet-d121": ("ImageNet top-1 error, PGNAS-D-121", 24.8),
    "imagenet-r50": ("ImageNet top-1 error, PGNAS-R-50", 22.73),
}
# the config keys that make a run the paper's protocol for the comparison above
PAPER_PROTOCOL = ("dataset", "supernet", "supernet_args", "posterior", "epochs", "batch_size", "lr")
FIGURES = ("p_per_layer.png", "kept_per_layer.png", "candidate_scores.png", "training.png")
POSTERIOR_NAMES = {"concrete": "concrete dropout", "gaussian": "Gaussian variational dropout, p = alpha / (1 + alpha)"}


LAYER_NAMES_SHOWN = 40  # beyond, the layer axis gives indices


def _figures(run_dir: Path, arch: dict, rows: list[dict], random_rows: list[dict], log: list[dict],
             posterior: str, first_images: int) -> None:
    with interrupts_deferred():  # (matplotlib's first import)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    layers = arch["layers"]

    def layer_axis(ax):  # the layers' names where they fit (architecture.json has them by index)
        if len(layers) <= LAYER_NAMES_SHOWN:
            ax.set_xticks(range(len(layers)), [layer["name"] for layer in layers], rotation=60, ha="right",
                          fontsize=7)
            ax.set_xlabel("gated layer")
        else:
            ax.set_xlabel("gated layer (index in architecture.json)")

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)), 4.5))
    for i, layer in enumerate(layers):
        groups = len(layer["p"])  # a layer's groups spread across its slot, so that none hides another
        ax.scatter([i + 0.6 * (g / max(groups - 1, 1) - 0.5) * (groups > 1) for g in range(groups)], layer["p"],
                   s=10, color="tab:blue", alpha=0.7)
    layer_axis(ax)
    ax.set_ylabel("learned drop probability p")
    ax.set_title(f"p per gate group ({posterior} posterior)")
    fig.tight_layout()
    fig.savefig(run_dir / "p_per_layer.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)), 4.5))
    ax.bar(range(len(layers)), [len(layer["kept_channels"]) / layer["in_channels"] for layer in layers])
    ax.set_ylim(0, 1.05)
    layer_axis(ax)
    ax.set_ylabel("kept fraction of input channels")
    ax.set_title(f"Candidate {arch['candidate']}: kept channels per layer")
    fig.tight_layout()
    fig.savefig(run_dir / "kept_per_layer.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    # every candidate of either family on the same images: the first round's (racing's first share; all of
    # them for exhaustive ranking), not racing's final scores, which cover more images the better they did
    def first_round(r):
        return 100 * r.get("first_round_score", r["score"])  # (rows older than the key: the score, all rounds')

    scored, randoms = [first_round(r) for r in rows], [first_round(r) for r in random_rows]
    bins = numpy.histogram_bin_edges(scored + randoms, bins=30)  # shared: the two families compare bar by bar
    shares = bool(randoms) and len(randoms) != len(scored)  # families of unequal sizes: each as a share of its own

    def weights(values):
        return numpy.full(len(values), 100 / len(values)) if shares else None

    if randoms:
        ax.hist(randoms, bins=bins, weights=weights(randoms), alpha=0.5, color="tab:orange",
                label=f"random gates, same drop rate ({len(randoms)})")
    ax.hist(scored, bins=bins, weights=weights(scored), histtype="step", linewidth=1.5, color="tab:blue",
            label=f"guided ({len(scored)})")
    ax.axvline(first_round(next(r for r in rows if r["id"] == arch["candidate"])), color="black", linestyle="--",
               label="chosen")
    ax.set_xlabel("held-out accuracy (%)" if first_images >= max(r.get("images", 0) for r in rows) else
                  f"accuracy on the first round's {first_images} held-out images (%)")
    ax.set_ylabel("% of the family's candidates" if shares else "candidates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "candidate_scores.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    epochs = [row["epoch"] for row in log]
    labels = {"regularizer": f"regularizer ({posterior} KL)"}
    for key in ("loss", "cross_entropy", "regularizer"):
        if all(key in row for row in log):
            axes[0].plot(epochs, [row[key] for row in log], label=labels.get(key, key))
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, [100 * row["train_accuracy"] for row in log])
    axes[1].set_title("train accuracy (%), sampled gates")
    axes[2].plot(epochs, [row["mean_p"] for row in log])
    axes[2].set_title("mean drop probability p")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(run_dir / "training.png", dpi=120)
    plt.close(fig)


def percent(x: float) -> str:
    """0.98667 -> '98.67%'."""
    return f"{100 * x:.2f}%"


def ranking_rate(summary: dict) -> str:
    """A search's ranking speed, or, after a resume, how much of the ranking the progress logs held."""
    if summary.get("candidates_per_second") is None:
        return f"resumed: {summary['resumed_evaluations']} evaluations from the progress logs"
    return f"{summary['candidates_per_second']:.1f} candidates/s"


def _regulariser(config: dict, summary: dict) -> str:
    """The settings that define the run's regulariser (N: n_train, else the training images)."""
    n = config.get("n_train") or summary["data"]["train"]
    if config.get("posterior", "concrete") == "gaussian":
        return f"KL strength 1/N with N = {n:g}, KL warm-up {config.get('kl_warmup_epochs', 0):g} epochs"
    return (f"l^2 (weight_reg) {config['weight_reg']:g}, drop_reg {config['drop_reg']:g}, N = {n:g}, "
            f"tau {config['tau']:g}")


def _data_source(run_dir: Path, config: dict, summary: dict) -> str:
    """'DATASET (DIRECTORY, N classes): ' for the report's data row (the directory as data.json records it;
    the class count where summary.json has it: runs of an ImageFolder tree of your own differ from ImageNet's)."""
    record = read_json_object(run_dir / DATA_FILE) or {}
    facts = [str(record["data_dir"])] if isinstance(record.get("data_dir"), str) else []
    if summary.get("num_classes") is not None:
        facts.append(f"{summary['num_classes']} class{'' if summary['num_classes'] == 1 else 'es'}")
    if config["dataset"] == "imagenet":  # an ImageFolder tree's training augmentation (data_args)
        low, high = config["data_args"].get("crop_scale", CROP_SCALE)
        facts.append(f"training crops of {low:.0%} to {high:.0%} of the area, "
                     f"{'flipped' if config['data_args'].get('flip', True) else 'not flipped'}")
    return f"{config['dataset']}" + (f" ({', '.join(facts)})" if facts else "") + ": "


def write_report(run_dir: str | Path) -> Path:
    """report.md and its figures for a finished run directory."""
    run_dir = Path(run_dir)
    arch = json.loads((run_dir / "architecture.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["config"]
    rows = read_jsonl(run_dir / "candidates.jsonl")
    random_path = run_dir / "random_candidates.jsonl"
    random_rows = read_jsonl(random_path) if random_path.exists() else []
    log = read_jsonl(run_dir / "train_log.jsonl")
    posterior = config.get("posterior", "concrete")  # runs older than the Gaussian family are concrete
    # (runs older than the key: the fewest images a candidate was scored on, which was the first round's)
    first_images = summary.get("mean_heldout_images", min(r.get("images", 0) for r in rows))
    _figures(run_dir, arch, rows, random_rows, log, posterior, first_images)
    s = summary
    lines = [
        f"# PGNAS search: {arch['preset']}, seed {arch['seed']}",
        "",
        "| | |",
        "|---|---|",
        f"| super-network | {config['supernet']} ({s.get('params_supernet', 0):,} parameters) |",
        f"| posterior | {posterior}: {POSTERIOR_NAMES[posterior]}; {_regulariser(config, s)} |",
        f"| backend | {s.get('backend', 'not recorded')}"
        + (f" ({counted(s['threads'], 'CPU thread')})" if "threads" in s else "") + "".join(
            f", {name} {version}" for name, version in s.get("versions", {}).items())
        + (f", CPU kernels {s['cpu_capability']}" if "cpu_capability" in s else "") + " |",
        f"| data | {_data_source(run_dir, config, s)}{s['data']['train']} training, {s['data']['heldout']} held-out, "
        f"{s['data']['test']} test images"
        + (f"; smoke check: {smoke['training_steps']} training steps, scored on {smoke['heldout']} held-out and "
           f"{smoke['test']} test images" if (smoke := s.get("smoke")) else "") + " |",
        f"| posterior training | {counted(config['epochs'], 'epoch')}, {s['train_seconds']:.1f} s"
        + (f", data parallel over {s['world_size']} processes (torchrun)" if s.get("world_size", 1) > 1 else "")
        + " |",
        f"| ranking | {s['candidates']} guided ({config['ranking']}) + {s['random_candidates']} random candidates, "
        f"{s['rank_seconds']:.1f} s ({ranking_rate(s)}), with the last epoch's weights"
        + (f"; first {s['drawn_candidates']} candidates sized for the budget in {s['sizing_seconds']:.1f} s"
           if s.get("budget") else "") + " |",
        f"| chosen candidate | {arch['candidate']}, keeps {percent(arch['kept_fraction'])} of the gated input channels"
        + (f" ({s['tied_for_best']} finalists tied at its held-out score: the smallest network is chosen, then the "
           "lowest id)" if s.get("tied_for_best", 1) > 1 else "") + " |",
        f"| held-out accuracy | {percent(arch['score'])} |",
        f"| test accuracy | {percent(arch['test_accuracy'])} (no fine-tuning) |",
        f"| super-network, every channel kept | held-out {percent(s['supernet_heldout_accuracy'])}, "
        f"test {percent(s['supernet_test_accuracy'])} |",
    ]
    if s.get("params_subnet"):
        whole = s.get("params_all_channels")
        share = f" ({s['params_subnet'] / whole:.0%} of the {whole:,} with every channel kept)" if whole else ""
        macs = (f", {s['macs_subnet']:,} MACs per image ({s['macs_subnet'] / s['macs_all_channels']:.0%} of "
                f"{s['macs_all_channels']:,})" if "macs_subnet" in s else "")  # (runs older than the key: none)
        lines.append(f"| materialized network | {s['params_subnet']:,} parameters{share}{macs}; the super-network's "
                     f"count adds its drop logits, training-only heads and the BatchNorm that materializing folds "
                     "into convolutions |")
    if budget := s.get("budget"):
        random = ("; the random baseline is drawn without it (Table 3 compares the two samplings at one drop rate)"
                  if s["random_candidates"] else "")
        lines.append(f"| size budget | {Budget(**budget)}: {s['candidates']} of the {s['drawn_candidates']} drawn "
                     f"candidates fit and were ranked{random} |")
    if s.get("random_mean_heldout_accuracy") is not None:
        images = s.get("mean_heldout_images")  # (absent from runs older than the key)
        over = (f", over the first {images} held-out images (racing's first share)"
                if images and images < s["finalist_heldout_images"] else "")
        lines.append(f"| guided vs random sampling (mean held-out) | {percent(s['guided_mean_heldout_accuracy'])} vs "
                     f"{percent(s['random_mean_heldout_accuracy'])} at the same expected drop rate{over} |")
    if note := cut_note(s.get("first_round_cut")):
        lines.append(f"| racing's first cut | {note} |")
    if arch["preset"] in PAPER_ERROR and not smoke:  # (a smoke check's error says nothing)
        what, error = PAPER_ERROR[arch["preset"]]
        preset = configs.resolve(arch["preset"])
        changed = [key for key in PAPER_PROTOCOL if key in config and config[key] != preset[key]]  # (older
        # runs lack newer keys: they ran the preset's value)
        lines.append(f"| paper | {what} {error}%; this run {100 * (1 - arch['test_accuracy']):.2f}%"
                     + (f" (with another {', '.join(changed)} than the preset's)" if changed else "") + " |")
    lines += ["", "## Learned drop probabilities", "", "![p per layer](p_per_layer.png)", "",
              "## The chosen candidate", "", "![kept channels per layer](kept_per_layer.png)", "",
              "## Candidates", "", "![candidate scores](candidate_scores.png)", "",
              "## Posterior training", "",
              "loss = cross-entropy + regulariser"
              + (" + the auxiliary head's weighted cross-entropy (`aux_cross_entropy`)"
                 if log and "aux_cross_entropy" in log[-1] else "") + ", unweighted so that epochs compare"
              + (f" (the steps of the first {config['kl_warmup_epochs']:g} epochs weighted the regulariser by the "
                 "KL warm-up's `regularizer_weight`, in train_log.jsonl)" if config.get("kl_warmup_epochs") else "")
              + "; train accuracy with the relaxed (sampled) gates.", "",
              "![training curves](training.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
