"""The `pgnas-fast` command (design.md layer 1).

    pgnas-fast search [--preset NAME] [--seed S] [--epochs E] [--candidates K] [--out DIR] ...
    pgnas-fast info | rank RUN_DIR | study RUN_DIR | export RUN_DIR --out DIR | train RUN_DIR
    pgnas-fast correlate RUN_DIR | evaluate DIR | doctor

(the README lists every option).

Every argument is checked before anything is created or written; bad input prints one line
`pgnas-fast: error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command its pipe stopped
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a negative number in exponent form (--weight-decay -1e-4) is a value, not an option; argparse
        # before Python 3.13 took it for an unknown option ("expected one argument")
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message):  # argparse's own errors: one line, status 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def _count(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        if high is not None and value >= high:
            raise argparse.ArgumentTypeError(f"must be an integer < {high}, got {value}")
        return value

    return parse


def _preset_defaults(configs, key: str) -> str:
    """A key's value per preset, for help texts: '200 on digits-tiny, 0 on the others'."""
    by_value: dict = {}
    for name in configs.names():
        by_value.setdefault(configs.resolve(name)[key], []).append(name)
    common = max(by_value, key=lambda value: len(by_value[value]))
    rest = [f"{value} on {', '.join(names)}" for value, names in by_value.items() if value != common]
    return ", ".join(rest + [f"{common} on the {'others' if rest else 'presets'}"])


def _build_parser() -> argparse.ArgumentParser:
    from . import configs
    from ._version import __version__
    from .nn import POSTERIORS
    from .ops.dispatch import SELECTABLE
    from .ops.streams import MAJOR_LIMIT, SEED_LIMIT
    from .search.correlate import PICKS
    from .search.rank import EVALUATORS

    parser = _Parser(prog="pgnas-fast", description="Posterior-Guided Neural Architecture Search, fast.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    search = commands.add_parser(
        "search",
        help="train the super-network's posterior, sample and rank candidates, record the best (architecture.json)",
        description="Run a whole PGNAS search: posterior training, candidate sampling from the learned drop "
                    "probabilities, ranking on held-out data with the inherited weights, and the best "
                    "candidate's held-out and test accuracy. Writes a run directory.")
    search.add_argument("--preset", default="digits-tiny",
                        help=f"named protocol (default digits-tiny); one of: {', '.join(configs.names())}")
    search.add_argument("--seed", type=_count(0, SEED_LIMIT), default=0,
                        help="search seed: the same seed reproduces the run exactly (default 0)")
    search.add_argument("--epochs", type=_count(1), help="posterior-training epochs (preset's)")
    search.add_argument("--candidates", type=_count(1, MAJOR_LIMIT + 1), help="candidates to rank (preset's)")
    search.add_argument("--random-baseline", type=_count(0, MAJOR_LIMIT + 1), metavar="K",
                        help="also rank K random-gate candidates at the same expected drop rate (0: off; "
                             f"default the preset's: {_preset_defaults(configs, 'random_baseline')})")
    _budget_arguments(search, "rank only the drawn candidates whose exported network has at most N {} (0: no "
                              "limit; config key {}, default 0)")
    search.add_argument("--posterior", choices=POSTERIORS,
                        help="posterior family of the gates: concrete (concrete dropout, default) or gaussian "
                             "(Gaussian variational dropout); sampling, ranking and export are the same")
    search.add_argument("--config", metavar="FILE.json",
                        help="JSON object of preset keys to override, or a run's config.json (its config whole)")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="override one preset key (VALUE as JSON, else a string); repeatable, wins over --config")
    search.add_argument("--data-dir", metavar="DIR",
                        help="where the data set lives (CIFAR: cifar-10-batches-py/ or cifar-100-python/; "
                             "ImageNet: train/ and val/ class folders); not needed for digits")
    search.add_argument("--smoke", action="store_true",
                        help="check data and config: 2 training steps, 2 candidates on 2 held-out batches")
    search.add_argument("--out", metavar="DIR",
                        help="run directory (default runs/PRESET-seedSEED; runs/PRESET-gaussian-seedSEED with "
                             "--posterior gaussian; -smoke added with --smoke)")
    search.add_argument("--backend", default=None, choices=SELECTABLE,
                        help="op backend (default: PGNAS_FAST_BACKEND or auto)")
    search.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
    existing = search.add_mutually_exclusive_group()  # what to do with a run the directory holds
    existing.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the run the directory holds (its rank-*/, study-*/, train-*/ and "
                               "correlate-*/ results too); without it or --resume a directory that holds a run is "
                               "refused")
    search.add_argument("--quiet", action="store_true", help="no progress bars")

    info = commands.add_parser("info", help="a preset's super-network (parameters, gated layers, p values, MACs), "
                                            "or what a run directory holds",
                               description="Describe a preset's super-network without data: parameters, gated "
                                           "layers, drop-probability (p) values, multiply-accumulates per image. "
                                           "Given a run directory: its search (epochs trained, the chosen "
                                           "candidate), its rankings and studies, and its super-network.")
    info.add_argument("run_dirs", metavar="RUN_DIR", nargs="*",
                      help="a directory written by pgnas-fast search (read from its JSON files alone); several (seeds "
                           "of a protocol, say): one line each, and each protocol's mean and spread")
    info.add_argument("--preset", help=f"one of: {', '.join(configs.names())} (default digits-tiny; a run's own "
                                       "with RUN_DIR)")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    rank = commands.add_parser(
        "rank", help="rank candidates of a finished search again (batched, racing, resumable, torchrun-sharded)",
        description="Score candidates of a run directory on its held-out split with the inherited weights. "
                    "Writes RUN_DIR/rank-TAG/: candidates.jsonl (id, score, images, first_round_score, "
                    "kept_fraction; params and macs under a size budget), top.json (the best finalists with "
                    "their architectures and sizes), summary.json, "
                    "settings.json and the progress-rank*.jsonl logs that --resume continues from. "
                    "Under torchrun the candidates are sharded across ranks.")
    rank.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by pgnas-fast search")
    rank.add_argument("--candidates", type=_count(1, MAJOR_LIMIT + 1),
                      help="candidates 0 .. K-1 (default: the run's config key candidates, as many as its search "
                           "ranked)")
    rank.add_argument("--strategy", choices=configs.RANKING_STRATEGIES,
                      help="racing: paired successive halving; exhaustive: every candidate on every image "
                           "(default: the run's config key `ranking`, as its search ranked)")
    rank.add_argument("--evaluator", choices=EVALUATORS, default="batched",
                      help="batched: K candidates per pass (default); sequential: one at a time; "
                           "reload: the authors' procedure, data read, model rebuilt and checkpoint loaded per "
                           "candidate")
    rank.add_argument("--eta", type=_count(2), help="racing: keep the best 1/eta per round (preset's)")
    rank.add_argument("--first-share", type=float, help="racing: share of held-out images in round 0 (preset's)")
    rank.add_argument("--bn-recalibrate", type=_count(0), default=0, metavar="N",
                      help="recompute every BatchNorm's statistics per candidate from N training images "
                           "(default 0: the super-network's running statistics, as the authors)")
    _budget_arguments(rank, "rank only the candidates whose exported network has at most N {} (0: no limit; default "
                            "the run's config key {})")
    rank.add_argument("--sizes", action="store_true",
                      help="size every candidate without a budget too: params and macs in candidates.jsonl, and "
                           "pareto.json (the finalists no other beats in held-out accuracy, parameters and MACs)")
    _checkpoint_argument(rank)
    rank.add_argument("--top", type=_count(1), default=10, help="candidates written to top.json (default 10)")
    rank.add_argument("--tag", default="default", help="names the output folder rank-TAG (default 'default')")
    _tagged_output_arguments(rank, "ranking")

    study = commands.add_parser(
        "study", help="the paper's sampling studies on a finished search (markdown + PNG)",
        description="Guided vs random sampling at the same expected drop rate (paper Table 3), best accuracy vs "
                    "number of candidates (Table 6), racing vs exhaustive agreement. Writes RUN_DIR/study-TAG/: "
                    "study.md, study.json and the figures.")
    study.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by pgnas-fast search")
    study.add_argument("--candidates", type=_count(1, MAJOR_LIMIT + 1), default=1000,
                       help="candidates per study (default 1000)")
    _checkpoint_argument(study)
    study.add_argument("--tag", default="default", help="names the output folder study-TAG (default 'default')")
    study.add_argument("--overwrite", action="store_true", help="replace the study of the same tag (else refused)")
    study.add_argument("--data-dir", metavar="DIR", help="the data set's directory (as for search)")
    study.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    study.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser(
        "export", help="the found architecture as a smaller plain-torch network (+ torch.export artefact)",
        description="Materialize a candidate of a run (default: the best) into a physically smaller network: "
                    "subnet.pt (pgnas_fast.load_subnet), model.pt2 (torch.export, loads with plain torch), "
                    "architecture.json, export.json (sizes, accuracy, where it came from), config.json and, for "
                    "runs that read a --data-dir, data.json.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by pgnas-fast search")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--candidate", type=_count(0, MAJOR_LIMIT), help="candidate id (default: the run's best)")
    which.add_argument("--rank", metavar="TAG", help="the best candidate of `pgnas-fast rank --tag TAG`, with the "
                                                      "BatchNorm statistics that ranking scored it with")
    export.add_argument("--bn-recalibrate", type=_count(0), metavar="N",
                        help="keep BatchNorm statistics recomputed for the candidate from N training images "
                             "(default: the --rank ranking's setting, else 0: the super-network's)")
    _checkpoint_argument(export, default=None, default_text="the --rank ranking's, else last")
    export.add_argument("--out", metavar="DIR", required=True, help="export directory")
    export.add_argument("--data-dir", metavar="DIR", help="the data set's directory (as for search)")
    export.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")

    train = commands.add_parser(
        "train", help="train one candidate alone (fine-tuned from its inherited weights, or from scratch) and "
                      "export it",
        description="Train a candidate of a run (default: the best) alone, its gates fixed: from the weights it "
                    "inherits (--init inherited) or from the search's initial weights (--init scratch), with the "
                    "run's data, augmentation and schedule over --epochs, cross-entropy plus weight decay instead of "
                    "the PGNAS regulariser. Writes RUN_DIR/train-TAG/: settings.json, train_log.jsonl, "
                    "candidate-checkpoint.pt (every epoch, for --resume) and the export directory's files "
                    "(subnet.pt, model.pt2, architecture.json, config.json, export.json with the accuracies before "
                    "and after): `pgnas-fast evaluate RUN_DIR/train-TAG` scores it. Shards under torchrun.")
    train.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by pgnas-fast search")
    which = train.add_mutually_exclusive_group()
    which.add_argument("--candidate", type=_count(0, MAJOR_LIMIT), help="candidate id (default: the run's best)")
    which.add_argument("--rank", metavar="TAG", help="the best candidate of `pgnas-fast rank --tag TAG`")
    _checkpoint_argument(train, default=None, default_text="the --rank ranking's, else last")
    _training_arguments(train, default_init="inherited")
    train.add_argument("--tag", help="names the output folder train-TAG (default: the --init)")
    _tagged_output_arguments(train, "training")

    correlate = commands.add_parser(
        "correlate", help="does the search's ranking predict the candidates' accuracy trained alone?",
        description="Train N candidates of the search's ranking (spread over it, or its top N; the search's "
                    "choice among them) alone, as `train` does, and correlate their inherited held-out scores with "
                    "their held-out accuracy after training (Kendall's tau-b, Spearman's rho, where the search's "
                    "choice lands). Writes "
                    "RUN_DIR/correlate-TAG/: correlation.json, correlation.md, correlation.png and each candidate's "
                    "training (c<ID>/, a `train` directory).")
    correlate.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by pgnas-fast search")
    correlate.add_argument("--candidates", type=_count(2), default=8, help="candidates to train (default 8)")
    correlate.add_argument("--pick", choices=PICKS, default="spread",
                           help="spread: evenly over the ranking, from the search's choice to the last (does the "
                                "ranking predict training alone?); top: the ranking's first N (which of the best "
                                "does best trained alone?); default spread")
    _training_arguments(correlate, default_init="scratch")
    correlate.add_argument("--tag", default="default", help="names the output folder correlate-TAG (default 'default')")
    _tagged_output_arguments(correlate, "correlation", kept=" (finished trainings are kept)")

    evaluate = commands.add_parser("evaluate", help="accuracy of an exported network on a split",
                                   description="Accuracy of an export directory's model.pt2 network; the "
                                               "last line is the accuracy.")
    evaluate.add_argument("export_dir", metavar="DIR", help="a directory written by pgnas-fast export")
    evaluate.add_argument("--split", choices=("test", "heldout"), default="test", help="default test")
    evaluate.add_argument("--data-dir", metavar="DIR", help="the data set's directory (as for search)")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")

    commands.add_parser("doctor", help="versions, backends (and why one is off), threads",
                        description="Print versions, which backends are live and why not, and threads.")
    return parser


def _tagged_output_arguments(parser: argparse.ArgumentParser, what: str, kept: str = "") -> None:
    """--resume | --overwrite of a command that writes its `what` under a --tag, and --data-dir, --device
    and --quiet."""
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help=f"continue an interrupted {what} of the same tag{kept}")
    existing.add_argument("--overwrite", action="store_true",
                          help=f"replace the {what} of the same tag; without it or --resume one is refused")
    parser.add_argument("--data-dir", metavar="DIR", help="the data set's directory (as for search)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _training_arguments(parser: argparse.ArgumentParser, default_init: str) -> None:
    """How `train` and `correlate` train a candidate alone (search/standalone.py)."""
    from .ops.streams import SEED_LIMIT
    from .search.standalone import DEFAULT_WEIGHT_DECAY, INITS

    parser.add_argument("--init", choices=INITS, default=default_init,
                        help="inherited: the checkpoint's weights (fine-tuning); scratch: the initial weights of "
                             f"`search --seed` for the training's seed (default {default_init})")
    parser.add_argument("--epochs", type=_count(1), help="training epochs (default: the run's)")
    parser.add_argument("--lr", type=float, help="initial learning rate of the run's schedule (default: the run's)")
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                        help=f"weight decay, in place of the PGNAS regulariser (default {DEFAULT_WEIGHT_DECAY:g})")
    parser.add_argument("--seed", type=_count(0, SEED_LIMIT),
                        help="the training's data order, augmentation and noise (and scratch's initial weights); "
                             "default: the run's")


def _budget_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--max-params and --max-macs: a size budget on the candidates (search/budget.py)."""
    for flag, what, key in (("--max-params", "parameters", "max_params"), ("--max-macs", "MACs per image", "max_macs")):
        parser.add_argument(flag, type=_count(0), metavar="N", help=help_text.format(what, key))


def _checkpoint_argument(parser: argparse.ArgumentParser, default: str | None = "last",
                         default_text: str = "last") -> None:
    """--checkpoint last|best: the run's weights that rank, study and export read."""
    parser.add_argument("--checkpoint", choices=("last", "best"), default=default,
                        help="the weights: last (checkpoint.pt, the last finished epoch, which the search ranked) or "
                             f"best (checkpoint-best.pt, the epoch of the lowest training objective); default "
                             f"{default_text}")


def _prepare_out(path: Path) -> list[Path]:
    """Create the run directory and prove it takes files; on failure leave nothing behind. Returns the
    directories it created (deepest first), for `_remove_if_empty`."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {str(path)!r} exists and is not a directory")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        for p in created:  # deepest first
            if p.is_dir():
                p.rmdir()
        raise UsageError(f"--out {str(path)!r} is not writable: {err.strerror or err}") from None
    return created


def _remove_if_empty(created: list[Path]) -> None:
    """Undo `_prepare_out` when the run stopped at bad input before writing anything."""
    for p in created:
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def _resolve_device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def _written_since(path: Path, moment: float) -> bool:
    """`path` exists and was last written at `moment` (time.time()) or later."""
    try:
        return path.stat().st_mtime >= moment
    except OSError:
        return False


def _search(args) -> int:
    from . import configs
    from .data import DataError
    from .ops import BackendUnavailableError, dispatch
    from .search import run_search
    from .search.budget import Budget
    from .search.rank import counted
    from .search.report import percent, ranking_rate

    overrides = configs.load_overrides(args.config, args.preset) if args.config else {}
    replaced = configs.apply_assignments(overrides, args.assignments, args.preset)
    for key, value in (("epochs", args.epochs), ("candidates", args.candidates),
                       ("random_baseline", args.random_baseline), ("posterior", args.posterior),
                       ("max_params", args.max_params), ("max_macs", args.max_macs)):
        if value is not None:
            overrides[key] = value
    config = configs.resolve(args.preset, overrides)
    device = _resolve_device(args.device)
    try:
        backend = dispatch.resolve(args.backend, device)
    except (BackendUnavailableError, ValueError) as err:  # (without --backend: PGNAS_FAST_BACKEND's, named)
        raise UsageError(f"--backend: {err}" if args.backend is not None else str(err)) from None
    # a run of another posterior family than the preset's, or a smoke check, never lands on (and replaces)
    # the preset's own run of that seed
    preset = configs.resolve(args.preset)  # (without the overrides)
    family = "" if config["posterior"] == preset["posterior"] else f"-{config['posterior']}"
    out = Path(args.out) if args.out else Path("runs") / f"{args.preset}{family}-seed{args.seed}{'-smoke' * args.smoke}"
    created = _prepare_out(out)

    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"pgnas-fast search: preset {config['preset']}, posterior {config['posterior']}, seed {args.seed}, "
              f"backend {backend}, device {device}" + (f", data parallel over {world} processes" if world > 1 else ""),
              flush=True)
        if config["kl_warmup_epochs"] > config["epochs"] and not args.smoke:  # e.g. a preset with --epochs cut
            reached = config["epochs"] / config["kl_warmup_epochs"]
            print(f"note: the regulariser's warm-up (kl_warmup_epochs {config['kl_warmup_epochs']:g}) outlasts "
                  f"training ({config['epochs']} epochs): it ends at {reached:.0%} of its full weight "
                  "(--set kl_warmup_epochs=N to change)", flush=True)
        for key, whose, same in (("supernet_args", "the super-network's", "supernet"),
                                 ("data_args", "the data set's", "dataset")):
            # (an object replaces the whole; another data set or super-network takes none of the preset's)
            dropped = ({k: v for k, v in preset[key].items() if k not in config[key]}
                       if config[same] == preset[same] else {})
            if dropped:
                print(f"note: {key} replaces the preset's {preset[key]}: "
                      f"{', '.join(f'{k} (preset: {v!r})' for k, v in dropped.items())} now take"
                      f"{'s' if len(dropped) == 1 else ''} {whose} default", flush=True)
        for note in replaced:
            print(f"note: {note}", flush=True)
        if config["amp"] == "bf16" and device.type != "cuda":  # (the ImageNet presets' default)
            print("note: amp bf16 (autocast) applies on CUDA only: this run trains in float32", flush=True)
        read_by = {"milestones": ("step",), "gamma": ("step",), "sgdr_t0": ("sgdr",), "sgdr_tmul": ("sgdr",),
                   "lr_min": ("cosine", "sgdr")}  # the schedule keys and the schedules that read them
        for key in (key for key in read_by if key in overrides and config["schedule"] not in read_by[key]):
            print(f"note: {key} set, but only the {' and '.join(read_by[key])} schedule"
                  f"{'s read' if len(read_by[key]) > 1 else ' reads'} it; this run's schedule is "
                  f"{config['schedule']} (--set schedule=...)", flush=True)
        unused = [key for key in ("weight_reg", "drop_reg") if key in overrides]
        if config["posterior"] == "gaussian" and unused:
            print(f"note: {' and '.join(unused)} set, but only the concrete family's regulariser reads "
                  f"{'them' if len(unused) > 1 else 'it'}; the gaussian posterior's KL depends on log alpha "
                  "alone (its strength is n_train)", flush=True)
    started, began = time.perf_counter(), time.time()
    try:
        with dispatch.use_backend(backend):
            result = run_search(config, seed=args.seed, out_dir=out, device=str(device), resume=args.resume,
                                overwrite=args.overwrite, progress=not args.quiet, data_dir=args.data_dir,
                                smoke=args.smoke)
    except ValueError as err:  # bad data or run directory (DataError, RunError), mostly before anything is written
        _remove_if_empty(created)
        if isinstance(err, DataError) and _written_since(out / "checkpoint.pt", began):  # a file first read late
            # (the data's fingerprint holds its file names: a removed or added file is other data)
            raise DataError(f"{_error_line(err)}; the run so far is kept: replace the unreadable file with a readable "
                            "one of the same name and run the same command with --resume (with files removed or "
                            "added the data is another: --overwrite starts afresh)") from None
        raise
    if not result.is_main:
        return 0
    s = result.summary
    if s["smoke"]:
        smoke = s["smoke"]
        print(f"smoke check: {smoke['training_steps']} training steps, candidates scored on {smoke['heldout']} "
              f"held-out and {smoke['test']} test images: data and config work, the numbers mean nothing yet")
    budget = s["budget"]
    best_of = _best_of(s["candidates"], s["drawn_candidates"], Budget(**(budget or {})))
    print(f"best candidate: {s['best_candidate']}{best_of} (keeps {percent(s['kept_fraction'])} of the gated input "
          "channels)")
    print(f"  exported network: {s['params_subnet']:,} parameters, {s['macs_subnet']:,} MACs per image "
          f"({s['params_subnet'] / s['params_all_channels']:.0%} and {s['macs_subnet'] / s['macs_all_channels']:.0%} "
          "of the network with every channel kept)")
    print(f"  held-out accuracy {percent(s['heldout_accuracy'])}, test accuracy {percent(s['test_accuracy'])} "
          f"(no fine-tuning)")
    print(f"  super-network, every channel kept: held-out {percent(s['supernet_heldout_accuracy'])}, "
          f"test {percent(s['supernet_test_accuracy'])}")
    line = f"  guided candidates: mean held-out {percent(s['guided_mean_heldout_accuracy'])}"
    if s["random_mean_heldout_accuracy"] is not None:
        line += (f"; random gates at the same drop rate: {percent(s['random_mean_heldout_accuracy'])} "
                 f"(this run; cf. paper Table 3)")
        if budget:  # (the two means are of other populations then)
            line += (f"\n    (guided: the {s['candidates']} that fit the budget; random: {s['random_candidates']} "
                     "drawn without it)")
    if s["mean_heldout_images"] < s["finalist_heldout_images"]:  # racing
        line += f"\n    (means over the first {s['mean_heldout_images']} held-out images, which every candidate saw)"
    print(line)
    # (the command's own time adds loading, accuracies, sizes and the report)
    before = s["resumed_from_epoch"]  # a resumed run's training time counts the epochs before the resume
    if s["pareto"] is not None:
        print(f"  Pareto front (held-out accuracy against parameters and MACs): {_front(s['pareto'])}")
    print(f"  time: training {s['train_seconds']:.1f} s"
          + (f" (of {counted(s['epochs'], 'epoch')}, {before} trained before this --resume)" if before else "")
          + (f", sizing {counted(s['drawn_candidates'], 'candidate')} {s['sizing_seconds']:.1f} s" if budget else "")
          + f", ranking {s['rank_seconds']:.1f} s ({s['candidates']} guided + {s['random_candidates']} random: "
          f"{ranking_rate(s)}); this command {time.perf_counter() - started:.1f} s")
    print(f"run directory: {result.out_dir}")
    return 0


def _rank(args) -> int:
    from .search.budget import Budget
    from .search.io import SEARCH_RANKINGS
    from .search.rank import counted, cut_note
    from .search.rank_run import rank_run
    from .search.report import percent

    if args.first_share is not None and not 0 < args.first_share <= 1:
        raise UsageError(f"--first-share must be in (0, 1], got {args.first_share}")
    _check_tag(args.tag)
    if f"rank-{args.tag}" in SEARCH_RANKINGS.values():
        raise UsageError(f"--tag {args.tag!r} is taken: rank-{args.tag}/ holds the search's own ranking log "
                         "(search --resume reads it); choose another tag")
    device = _resolve_device(args.device)
    summary = rank_run(args.run_dir, candidates=args.candidates, strategy=args.strategy, evaluator=args.evaluator,
                       tag=args.tag, resume=args.resume, overwrite=args.overwrite, top=args.top, eta=args.eta,
                       first_share=args.first_share, bn_recalibrate=args.bn_recalibrate,
                       max_params=args.max_params, max_macs=args.max_macs, size_all=args.sizes,
                       checkpoint=args.checkpoint,
                       device=str(device), data_dir=args.data_dir, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best"]
        budget = Budget(summary["max_params"], summary["max_macs"])
        print(f"best candidate: {best['id']}{_best_of(summary['ranked_candidates'], summary['candidates'], budget)}"
              f", held-out accuracy {percent(best['score'])} on {best['images']:,} images (keeps "
              f"{percent(best['kept_fraction'])} of the gated input channels)")
        print(f"  exported network: {best['params']:,} parameters, {best['macs']:,} MACs per image")
        print(f"  {summary['strategy']} with the {summary['evaluator']} evaluator: "
              f"{summary['images_evaluated']:,} candidate-images evaluated"
              + (f" ({summary['resumed_evaluations']} candidate-rounds restored from before this --resume)"
                 if summary["resumed_evaluations"] else ""))
        rate = (f" ({summary['ranked_candidates'] / summary['seconds']:.1f} candidates/s)"
                if not summary["resumed_evaluations"] and summary["seconds"] > 0 else "")  # (a resume: its part only)
        sizing = (f"sizing {counted(summary['candidates'], 'candidate')} {summary['sizing_seconds']:.1f} s, "
                  if summary["pareto"] is not None else "")
        print(f"  time: {sizing}ranking {summary['seconds']:.1f} s{rate}")
        if summary["pareto"] is not None:
            print(f"  Pareto front (held-out accuracy against parameters and MACs, of the finalists): "
                  f"{_front(summary['pareto'])}")
        if summary["checkpoint"] == "best":
            print(f"  weights: {_best_checkpoint(summary['checkpoint_epoch'])}")
        if note := cut_note(summary["first_round_cut"]):
            print(f"  note: {note}")
        print(f"results: {Path(args.run_dir) / ('rank-' + args.tag)}")
    return 0


def _best_checkpoint(epoch: int) -> str:
    """How rank, study, export and train name the weights of --checkpoint best."""
    return f"checkpoint-best.pt, of epoch {epoch} (the lowest training objective)"


def _best_of(ranked: int, drawn: int, budget) -> str:
    """What follows the best candidate's id: ' of 200', or under a size budget ', the best of the 4 of the
    200 drawn that fit the budget (at most ...)'."""
    if not budget:
        return f" of {ranked}"
    return f", the best of the {ranked} of the {drawn} drawn that fit the budget ({budget})"


def _front(ids: list[int]) -> str:
    """A Pareto front's size and ids (up to 10), and where it is written."""
    from .search.rank import counted

    shown = f" ({', '.join(map(str, ids))})" if len(ids) <= 10 else ""
    return f"{counted(len(ids), 'candidate')}{shown}, pareto.json"


MAX_TAG = 200  # a file name holds 255 bytes: '.rank-TAG.lock' and the temporaries' '.NAME.XXXXXXXX.tmp' fit


def _check_tag(tag: str) -> None:
    if not tag or not set(tag) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"):
        raise UsageError(f"--tag must be letters, digits, '_', '.' or '-', got {tag!r}")
    if len(tag) > MAX_TAG:
        raise UsageError(f"--tag must be at most {MAX_TAG} characters, got {len(tag)}")


def _study(args) -> int:
    from .search.report import percent
    from .search.study import run_study

    _check_tag(args.tag)
    device = _resolve_device(args.device)
    result = run_study(args.run_dir, candidates=args.candidates, tag=args.tag, overwrite=args.overwrite,
                       checkpoint=args.checkpoint, device=str(device), data_dir=args.data_dir, progress=not args.quiet)
    g, r, race = result["guided"], result["random"], result["racing"]
    if result["checkpoint"] == "best":
        print(f"weights: {_best_checkpoint(result['checkpoint_epoch'])}")
    print(f"guided: mean held-out {percent(g['mean'])}, best {percent(g['best'])}; "
          f"random at the same drop rate: mean {percent(r['mean'])}, best {percent(r['best'])}")
    print(f"racing winner's exhaustive rank {race['winner_exhaustive_rank']}, "
          f"{race['exhaustive_images'] / race['images']:.1f}x fewer images")
    print(f"report: {Path(args.run_dir) / ('study-' + args.tag) / 'study.md'}")
    return 0


def _export_target_problem(out: Path) -> str | None:
    """Why export must not write into `out`; None: it may (new, empty, or an earlier export's: replaced)."""
    from .search.io import EXPORT_FILES
    from .search.run import SEARCH_ONLY_FILES

    if not out.is_dir():
        return None
    if held := [name for name in SEARCH_ONLY_FILES if (out / name).exists()]:
        if (out / EXPORT_FILES[1]).exists():  # (its training log is a train_log.jsonl too)
            return (f"holds a candidate's training ({EXPORT_FILES[1]}): the export would replace its trained "
                    "network; export to a directory of its own")
        return (f"holds a search run ({held[0]}): the export's config.json and architecture.json would replace the "
                "run's; export to a directory of its own")
    if (out / EXPORT_FILES[0]).exists():
        return None
    if others := sorted(entry.name for entry in out.iterdir() if not entry.name.startswith(".")):
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return f"holds other files ({listed}): export into a new or empty directory, or over an earlier export"
    return None


def _export(args) -> int:
    from .search.export import export_candidate
    from .search.report import percent

    device = _resolve_device(args.device)
    out = Path(args.out)
    if out.resolve() == Path(args.run_dir).resolve():
        raise UsageError("--out must not be the run directory: the export's architecture.json would replace the "
                         "search's")
    if problem := _export_target_problem(out):
        raise UsageError(f"--out {args.out!r} {problem}")
    created = _prepare_out(Path(args.out))
    try:
        s = export_candidate(args.run_dir, args.out, candidate=args.candidate, rank_tag=args.rank,
                             bn_recalibrate=args.bn_recalibrate, checkpoint=args.checkpoint, device=str(device),
                             data_dir=args.data_dir)
    except ValueError:  # an unusable run directory: nothing was written
        _remove_if_empty(created)
        raise
    print(f"candidate {s['candidate']}: held-out {percent(s['heldout_accuracy'])}, test {percent(s['test_accuracy'])}")
    if s["checkpoint"] == "best":
        print(f"  weights: {_best_checkpoint(s['checkpoint_epoch'])}")
    if s["bn_recalibrate"]:
        print(f"  BatchNorm statistics recomputed for the candidate from {s['bn_recalibrate']} training images")
    print(f"  every channel kept -> this candidate: parameters {s['params_all_channels']:,} -> "
          f"{s['params_subnet']:,}, MACs per image {s['macs_all_channels']:,} -> {s['macs_subnet']:,}")
    print(f"exported to {args.out}")
    return 0


def _train(args) -> int:
    from .search.rank import counted
    from .search.report import percent
    from .search.standalone import start_text, train_candidate

    tag = args.init if args.tag is None else args.tag
    _check_tag(tag)
    device = _resolve_device(args.device)
    s = train_candidate(args.run_dir, candidate=args.candidate, rank_tag=args.rank, checkpoint=args.checkpoint,
                        init=args.init, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                        tag=tag, resume=args.resume, overwrite=args.overwrite, device=str(device),
                        data_dir=args.data_dir, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"candidate {s['candidate']}, trained alone from {start_text(s['init'])} for {counted(s['epochs'], 'epoch')} "
          f"(lr {s['lr']:g}, weight decay {s['weight_decay']:g}, seed {s['training_seed']}): "
          f"held-out {percent(s['heldout_accuracy'])}, test {percent(s['test_accuracy'])}")
    print(f"  with its inherited weights, untrained: held-out "
          f"{percent(s['inherited_heldout_accuracy'])}, test {percent(s['inherited_test_accuracy'])}")
    if s["checkpoint"] == "best":  # (the candidate is a draw from its drop probabilities; inherited: its weights)
        print(f"  checkpoint: {_best_checkpoint(s['checkpoint_epoch'])}")
    print(f"  network: {s['params_subnet']:,} parameters, {s['macs_subnet']:,} MACs per image; training "
          f"{s['train_seconds']:.1f} s")
    print(f"results: {Path(args.run_dir) / ('train-' + tag)} (pgnas-fast evaluate scores it)")
    return 0


def _correlate(args) -> int:
    from .search.correlate import correlate_run, picked_text
    from .search.rank import counted
    from .search.standalone import start_text
    from .search.study import correlation_text

    _check_tag(args.tag)
    device = _resolve_device(args.device)
    s = correlate_run(args.run_dir, candidates=args.candidates, pick=args.pick, init=args.init, epochs=args.epochs,
                      lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, tag=args.tag, resume=args.resume,
                      overwrite=args.overwrite, device=str(device), data_dir=args.data_dir, progress=not args.quiet)
    t = s["training"]
    print(f"{picked_text(s)}, trained alone from "
          f"{start_text(t['init'], 'their')} for {counted(t['epochs'], 'epoch')}: Kendall's tau {correlation_text(s['kendall_tau'])}, "
          f"Spearman's rho {correlation_text(s['spearman_rho'])} (inherited score against held-out accuracy after "
          "training)")
    if s["search_choice_trained_rank"] is not None:
        print(f"  the search's choice, candidate {s['search_choice']}, is number {s['search_choice_trained_rank']} "
              f"of {len(s['candidates'])} after training")
    print(f"  the best after training, candidate {s['best_trained']}, was number {s['best_trained_inherited_rank']} of "
          f"{s['ranked']} in the search")
    print(f"report: {Path(args.run_dir) / ('correlate-' + args.tag) / 'correlation.md'}")
    return 0


def _evaluate(args) -> int:
    from .search.export import evaluate_export

    device = _resolve_device(args.device)
    value = evaluate_export(args.export_dir, split=args.split, device=str(device), data_dir=args.data_dir)
    print(f"{args.split} accuracy")
    print(f"{value:.6f}")
    return 0


def _info(args) -> int:
    import json

    from . import configs
    from .search.run import build_supernet
    from .supernets.info import describe

    if args.run_dirs and args.preset is not None:
        raise UsageError("pass RUN_DIR or --preset, not both (a run's super-network is its own config's)")
    if len(args.run_dirs) > 1:
        return _info_of_runs(args.run_dirs, as_json=args.json)
    run = None
    if args.run_dirs:
        from .search.run_info import run_info

        run = run_info(args.run_dirs[0])
        try:
            config = configs.resolve(run["preset"], {k: v for k, v in run["config"].items() if k != "preset"})
        except (configs.ConfigError, TypeError) as err:
            raise UsageError(f"{str(Path(args.run_dirs[0]) / 'config.json')!r} is malformed or from another "
                             f"version: {err}") from None
    else:
        config = configs.resolve(args.preset or "digits-tiny")
    # a run's own class count (an ImageFolder tree of other classes than ImageNet's); the data set's full
    # count for a preset, or a run not finished yet
    classes = (run or {}).get("num_classes") or configs.NUM_CLASSES[config["dataset"]]
    facts = {"preset": config["preset"], "supernet": config["supernet"], "num_classes": classes,
             **describe(build_supernet(config, classes), configs.input_shape(config))}
    if args.json:
        print(json.dumps({**facts, "run": run} if run else facts, sort_keys=True))
        return 0
    if run:
        _print_run(run)
    print(f"{config['preset']}: super-network {facts['supernet']}, {classes} classes, input {facts['input_size']}")
    print(f"  parameters      {facts['params']:,}")
    print(f"  gated layers    {facts['gated_layers']}")
    print(f"  p values        {facts['gate_params']}")
    print(f"  MACs per image  {facts['macs']:,}")
    return 0


def _info_of_runs(run_dirs: list[str], *, as_json: bool) -> int:
    """One line per run and, per protocol, the mean and spread of the chosen candidates over its finished runs."""
    import json

    from .search.rank import counted
    from .search.report import percent
    from .search.run_info import across_runs, run_info

    seen: dict[Path, str] = {}
    for d in run_dirs:
        if Path(d).resolve() in seen:
            raise UsageError(f"RUN_DIR {d!r} is given twice (as {seen[Path(d).resolve()]!r} before): each run counts "
                             "once")
        seen[Path(d).resolve()] = d
    runs = [run_info(d) for d in run_dirs]
    groups = across_runs(runs)
    if as_json:
        print(json.dumps({"runs": runs, "across_runs": groups}, sort_keys=True))
        return 0
    table = [("run", "preset", "posterior", "seed", "epochs", "candidate", "held-out", "test", "params", "MACs")]
    for run in runs:
        chosen = run["chosen"] or {}
        row = (run["run_dir"], str(run["preset"]), run["posterior"], str(run["seed"]),
               f"{run['epochs_trained']}/{run['epochs']}")
        if chosen:
            row += (str(chosen["candidate"]), percent(chosen["heldout_accuracy"]), percent(chosen["test_accuracy"]),
                    *(f"{chosen[key]:,}" if chosen.get(key) is not None else "-" for key in ("params", "macs")))
        else:
            row += ("(search not finished)", "", "", "", "")
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for group in groups:
        def spread(key, shown):
            value = group[key]
            if value is None:
                return "-"
            return shown(value["mean"]) + (f" ± {shown(value['std'])}" if group["runs"] > 1 else "")

        changed = "".join(f"; {key} {value!r}" for key, value in group["changes"].items())
        protocol = f"{group['preset']} ({group['posterior']}{changed})"
        unfinished = (f"; not finished: seed{'s' if len(group['unfinished']) > 1 else ''} "
                      f"{', '.join(map(str, group['unfinished']))}" if group["unfinished"] else "")
        if not group["runs"]:
            print(f"{protocol}: no finished run{unfinished}")
            continue
        seeds = f"seed{'s' if group['runs'] > 1 else ''} {', '.join(map(str, group['seeds']))}"
        repeated = ("; note: a seed repeats, and runs of one seed repeat one search: they are not independent"
                    if len(set(group["seeds"])) < len(group["seeds"]) else "")
        print(f"{protocol}, {counted(group['runs'], 'finished run')} ({seeds}{unfinished}): "
              f"held-out {spread('heldout_accuracy', percent)}, test {spread('test_accuracy', percent)}, parameters "
              f"{spread('params', '{:,.0f}'.format)}, MACs per image {spread('macs', '{:,.0f}'.format)}"
              + (" (mean ± sample std)" if group["runs"] > 1 else "") + repeated)
    return 0


def _print_run(run: dict) -> None:
    from .search.budget import Budget
    from .search.rank import counted
    from .search.report import percent
    from .search.standalone import start_text
    from .search.study import correlation_text

    print(f"{run['run_dir']}: search of {run['preset']}, seed {run['seed']}, {run['posterior']} posterior")
    state = "finished" if run["finished"] else "not finished"
    print(f"  training   {run['epochs_trained']} of {counted(run['epochs'], 'epoch')}, search {state}")
    if chosen := run["chosen"]:
        budget = Budget(run["config"].get("max_params", 0), run["config"].get("max_macs", 0))
        drawn = (f" that fit the budget ({budget}) of {chosen['drawn_candidates']} drawn"
                 if budget and chosen["drawn_candidates"] is not None else "")
        size = (f", {chosen['params']:,} parameters, {chosen['macs']:,} MACs per image"
                if chosen["params"] is not None else "")
        print(f"  chosen     candidate {chosen['candidate']} of {chosen['candidates']}{drawn}: held-out "
              f"{percent(chosen['heldout_accuracy'])}, test {percent(chosen['test_accuracy'])}{size}")
    for ranking in run["rankings"]:
        line = f"rank-{ranking['tag']}: {ranking['state']}"
        if ranking["state"] == "finished":
            best, budget = ranking["best"], Budget(ranking["max_params"] or 0, ranking["max_macs"] or 0)
            fit = f" that fit the budget ({budget}) of {ranking['candidates']} drawn" if budget else ""
            line += (f", best {best['id']} ({percent(best['score'])} on {best['images']} images) of "
                     f"{ranking['ranked_candidates'] or ranking['candidates']}{fit}, {ranking['strategy']}"
                     + (f", BatchNorm recalibrated from {ranking['bn_recalibrate']} images"
                        if ranking["bn_recalibrate"] else "")
                     + (f", checkpoint-best.pt of epoch {ranking['checkpoint_epoch']}"
                        if ranking["checkpoint"] == "best" else "")
                     + (f", Pareto front of {len(ranking['pareto'])} (pareto.json)" if ranking["pareto"] else ""))
        else:
            line += f" ({counted(ranking['evaluations_logged'], 'candidate-round')} logged; --resume continues it)"
        print(f"  ranking    {line}")
    for study in run["studies"]:
        line = f"study-{study['tag']}: {study['state']}"
        if study["state"] == "finished":
            line += (f", {study['candidates']} candidates, guided mean {percent(study['guided_mean'])} against random "
                     f"{percent(study['random_mean'])}")
        print(f"  study      {line}")
    for training in run["trainings"]:
        line = f"train-{training['tag']}: {training['state']}"
        if training["state"] == "finished":
            line += (f", candidate {training['candidate']} from {start_text(training['init'])}, "
                     f"{counted(training['epochs'], 'epoch')}: held-out {percent(training['heldout_accuracy'])}, "
                     f"test {percent(training['test_accuracy'])}"
                     + (f" (inherited weights, untrained: held-out {percent(training['inherited_heldout_accuracy'])}, "
                        f"test {percent(training['inherited_test_accuracy'])})"
                        if training["inherited_test_accuracy"] is not None else ""))
            # (a search --resume trains the run's checkpoint on after it was read)
            if training["checkpoint"] == "last" and training["checkpoint_epoch"] not in (None, run["epochs_trained"]):
                line += (f"; from checkpoint.pt of epoch {training['checkpoint_epoch']}, which the run has trained on "
                         "since")
        else:
            line += f" ({counted(training['epochs_trained'], 'epoch')} trained; --resume continues it)"
        print(f"  alone      {line}")
    for correlation in run["correlations"]:
        line = f"correlate-{correlation['tag']}: {correlation['state']}"
        if correlation["state"] == "finished":
            top = " (the ranking's top)" if correlation["pick"] == "top" else ""
            line += (f", {counted(correlation['candidates'], 'candidate')}{top}: Kendall's tau "
                     f"{correlation_text(correlation['kendall_tau'])}, Spearman's rho "
                     f"{correlation_text(correlation['spearman_rho'])}")
        else:
            line += (f" ({counted(correlation['candidates_trained'], 'candidate')} trained; --resume continues "
                     "it)")
        print(f"  correlate  {line}")


def _doctor(_args) -> int:
    import torch

    import pgnas_fast

    from .ops import backends, dispatch, selected

    print(f"pgnas_fast {pgnas_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    except ImportError as err:
        print(f"triton: not importable ({err})")
    import numpy

    print(f"numpy {numpy.__version__}")
    cuda = torch.cuda.is_available()
    print(f"cuda: {'available, ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print(f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"cpus {os.cpu_count()}")
    print(f"cpu kernels: {torch.backends.cpu.get_cpu_capability()} (the instruction set torch's CPU kernels were "
          "chosen for: kernels chosen for another may round their sums in another order)")
    try:
        print(f"backend selection: {selected()}")
    except ValueError as err:  # a bad PGNAS_FAST_BACKEND: the diagnosis goes on
        print(f"backend selection: {err}")
    for name, (available, reason) in backends().items():
        print(f"  {name:<10} {'yes' if available else 'no ':<4} {reason}")
        if available and dispatch.missing_ops(name):
            print(f"  {'':<10} {'':<4} runs on reference: {', '.join(dispatch.missing_ops(name))}")
    return 0


DATA_PARALLEL_COMMANDS = ("search", "rank", "train")  # the commands that shard their work under torchrun


def main(argv: list[str] | None = None) -> int:
    from .interrupts import terminations_raised

    with terminations_raised():  # a SIGTERM stops a command as a Ctrl-C does (interrupts.py)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from .interrupts import interrupts_deferred

    try:  # torch and numpy load here (1-2 s): a Ctrl-C meanwhile is taken once they are whole
        with interrupts_deferred():
            from .configs import ConfigError
            from .data import DataError
            from .search import RunError
            from .search.host import keep_freed_host_memory
    except KeyboardInterrupt as stop:
        return _stopped(stop)

    keep_freed_host_memory()  # (a command owns its process: see search/host.py)
    command = None
    try:
        parser = _build_parser()
        args = parser.parse_args(argv)
        command = args.command
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command not in DATA_PARALLEL_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            shared = f"{', '.join(DATA_PARALLEL_COMMANDS[:-1])} and {DATA_PARALLEL_COMMANDS[-1]}"
            raise UsageError(f"{args.command} runs in one process (under torchrun every process would do all of "
                             f"it and write the same files); torchrun shares out {shared}")
        code = {"search": _search, "info": _info, "rank": _rank, "study": _study, "export": _export,
                "train": _train, "correlate": _correlate, "evaluate": _evaluate,
                "doctor": _doctor}[args.command](args)
        sys.stdout.flush()  # (a block-buffered pipe's last lines: a closed reader fails here, not at exit)
        return code
    except (UsageError, ConfigError, DataError, RunError) as err:  # bad input: one line, status 2
        print(f"pgnas-fast: error: {_error_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        return _stopped(stop, command)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe broke: a failure to report
        # stdout's reader left (`| head`): stop quietly, as a command killed by SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit's flush would raise again)
        return EXIT_BROKEN_PIPE


def _error_line(err: Exception) -> str:
    """The error's message; one raised in a DataLoader worker arrives with the worker's traceback, whose
    last line is the error."""
    message = str(err)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


def _stopped(stop: KeyboardInterrupt, command: str | None = None) -> int:
    """A Ctrl-C or a SIGTERM (interrupts.Terminated): one line, with how to continue, and the status a
    shell gives a process that the signal ended (128 + its number)."""
    from .interrupts import Terminated

    resumable = command in ("search", "rank", "train", "correlate")  # the others start over: nothing of theirs is lost
    again = ("the same torchrun command with --resume" if int(os.environ.get("WORLD_SIZE", "1")) > 1
             else f"`pgnas-fast {command} --resume` with the same arguments")  # (a resume takes as many processes)
    hint = f"; {again} continues" if resumable else ""
    terminated = isinstance(stop, Terminated)
    print(f"pgnas-fast: {'terminated (SIGTERM)' if terminated else 'interrupted'}{hint}", file=sys.stderr)
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def _stdout_reader_gone() -> bool:
    """stdout is a pipe whose read end is closed (poll reports an error on its write end)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no file descriptor
        return False


if __name__ == "__main__":
    sys.exit(main())
