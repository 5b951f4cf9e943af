"""Sampling and ranking candidates: hard gates from the learned p, scored on held-out data with the
inherited weights, BatchNorm in eval mode with the super-network's running statistics (the authors';
folded into the conv before it where there is one: nn.batchnorm.folded_batchnorm).

Evaluators (all give the same counts, image for image):
- ``batched``: K candidates x b images as one batch of K*b rows, each row group with its own
  candidate's masks (design.md "Ranking at speed"); the checkpoint is loaded once.
- ``sequential``: one candidate at a time, same model.
- ``reload``: the authors' procedure, the baseline for benchmarks: for every candidate the model
  rebuilt, its checkpoint reloaded and, where the caller says how (`load_heldout`), the held-out data
  read again. Their CIFAR selection loop (the public code's src/cifar10/main.py, `selection()`) read the
  data set (`read_data`), built the graph and restored the checkpoint for each of its 1500 candidates;
  their ImageNet one (examples/imagenet_eval.py) rebuilt the model and reloaded the checkpoint, and
  decoded the validation images again through its DataLoader.

Strategies: ``exhaustive`` scores every candidate on the whole held-out set; ``racing`` is paired
successive halving: every survivor sees the same first images, the best 1/eta go on to a share eta
times larger, and the last survivors are scored on the whole set. Progress is appended to a log as
chunks finish, so a killed ranking resumes without evaluating anything twice.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .. import ops
from ..configs import DEFAULTS, RANKING_STRATEGIES
from ..nn import gated_layers, kept_fraction, set_gates, stacked_candidate_masks, training_modes_kept
from ..nn.batchnorm import folded_batchnorm, grouped_batchnorm
from ..nn.gated import logit
from ..ops.streams import Domain, stream_id
from ..supernets.info import largest_activation_bytes
from .io import RunError
from .train import mean_drop_probability

EVALUATORS = ("batched", "sequential", "reload")
# On a CPU a batched pass gains nothing once its activations outgrow the caches, and loses per row
# after (SupNet-E, 8 candidates x 100 images: sequential 23 s, 2 candidates a pass 30 s, 8 a pass 58 s;
# benchmarks/results/cpu-2core.md): there a pass holds several candidates only while its largest
# activation stays under this many bytes (the digits preset's 1,200 rows: 4.9 MB).
CPU_PASS_BYTES = 16 << 20
# On a GPU the bound is memory: a pass's largest activation gets at most this share of the free memory
# (a DenseNet block holds its concatenation twice and a layer's intermediates beside it: about 3x its
# largest activation per image; D-121 at the ImageNet presets' 8,192 rows would need about 80 GB).
CUDA_ACTIVATION_SHARE = 1 / 4


def pass_bytes_budget(device: torch.device) -> int | None:
    """Bytes the largest activation of a batched pass may take on `device` (see CPU_PASS_BYTES and
    CUDA_ACTIVATION_SHARE); None: no bound."""
    if device.type == "cpu":
        return CPU_PASS_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # (a driver query: no stream sync)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free for torch too
        return int((free + cached) * CUDA_ACTIVATION_SHARE)
    return None


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of `model` (in eval mode, gates as they are set, BatchNorm folded as in ranking)
    over (images, labels) batches; the model gets its modules' training modes back."""
    correct = seen = 0
    with training_modes_kept(model), folded_batchnorm(model.eval()):
        for images, labels in batches:
            correct += (model(images).argmax(1) == labels).sum().item()
            seen += len(labels)
    return correct / seen


def uniform_drop_logits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-channel logits of one shared p: the guided candidates' expected drop rate (mean p over
    every gated channel), for the random-sampling baseline of the paper's Table 3."""
    z = logit(mean_drop_probability(model))
    return {name: torch.full((layer.gate_channels,), z, device=layer.p_logit.device) for name, layer in gated_layers(model)}


def _normalises_across_rows(model: nn.Module) -> bool:
    """A BatchNorm without running statistics (track_running_stats=False) normalises with its batch's
    statistics in eval mode too."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


class CandidateScorer:
    """Counts correct held-out predictions of candidates on image ranges [start, end).

    `images`, `labels`: the held-out split, already on the model's device; `prepare` maps stored
    images to model inputs (e.g. normalisation). `rows_per_pass` bounds the batched evaluator's
    K * batch_size rows, and so does the device's budget for a pass's largest activation
    (pass_bytes_budget; never below one candidate a pass). `load_model` (reload evaluator only) builds
    the model from its checkpoint; `load_heldout` (reload only, optional) reads the held-out split again,
    stored as `images` and `labels` are (None: they stay resident). `recalibration_images` (model
    inputs): BatchNorm statistics are recomputed per candidate from them (see nn.batchnorm) instead of
    the super-network's running statistics.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seed: int,
                 evaluator: str = "batched", batch_size: int = DEFAULTS["eval_batch_size"],
                 rows_per_pass: int = DEFAULTS["rank_rows"],
                 domain: Domain = Domain.CANDIDATE, p_logits: Mapping[str, torch.Tensor] | None = None,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 load_model: Callable[[], nn.Module] | None = None,
                 load_heldout: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 recalibration_images: torch.Tensor | None = None):
        if evaluator not in EVALUATORS:
            raise ValueError(f"evaluator must be one of {', '.join(EVALUATORS)}; got {evaluator!r}")
        if evaluator == "reload" and load_model is None:
            raise ValueError("the reload evaluator needs load_model")
        if load_heldout is not None and evaluator != "reload":
            raise ValueError(f"load_heldout is the reload evaluator's (the authors' per-candidate read of the data), "
                             f"not the {evaluator} one's: that reads the resident images")
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"images and labels must hold the same number of held-out examples, at least one, got "
                             f"{len(images)} and {len(labels)}")
        for name, value in (("batch_size", batch_size), ("rows_per_pass", rows_per_pass)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not gated_layers(model):
            raise ValueError("model has no gated layers (GatedConv2d, GatedLinear): it has no candidates to score")
        device = next(model.parameters()).device  # (a gated layer holds its drop logits at least)
        if images.device != device or labels.device != device:
            raise ValueError(f"images and labels must be on the model's device ({device}), got {images.device} and "
                             f"{labels.device}")
        self.model, self.images, self.labels = model, images, labels
        self.seed, self.evaluator, self.domain, self.p_logits = seed, evaluator, domain, p_logits
        self.batch_size, self.rows_per_pass = batch_size, rows_per_pass
        self.prepare = prepare or (lambda x: x)
        self.load_model, self.load_heldout = load_model, load_heldout
        self.recalibration_images = recalibration_images
        self._rows_fit = None  # (_rows_that_fit)

    @property
    def size(self) -> int:
        return len(self.labels)

    def kept_fractions(self, candidates: Sequence[int], chunk: int = 1024) -> list[float]:
        """Kept fraction of the gated input channels of each candidate, masks drawn `chunk` at a time."""
        out = []
        candidates = list(candidates)
        for lo in range(0, len(candidates), chunk):
            out += kept_fraction(stacked_candidate_masks(self.model, self.seed, candidates[lo:lo + chunk],
                                                         domain=self.domain, p_logits=self.p_logits))
        return out

    def candidates_per_pass(self, start: int, end: int) -> int:
        if self.evaluator != "batched":
            return 1
        if self.recalibration_images is None and _normalises_across_rows(self.model):
            return 1  # eval-mode statistics of the whole pass would mix the candidates' rows
        recalibration = 0 if self.recalibration_images is None else len(self.recalibration_images)
        rows = max(min(self.batch_size, end - start), recalibration)
        return max(1, min(self.rows_per_pass, self._rows_that_fit()) // rows)

    def _rows_that_fit(self) -> int:
        """Rows whose largest activation fits the device's pass budget (pass_bytes_budget), worked out on
        the first batched call: one image measured (shapes do not depend on the gates)."""
        if self._rows_fit is None:
            image = self.prepare(self.images[:1])  # (what the model reads, where it reads it)
            budget = pass_bytes_budget(image.device)
            self._rows_fit = self.rows_per_pass
            if budget is not None:
                self._rows_fit = budget // max(1, largest_activation_bytes(self.model, image.shape[1:]))
        return self._rows_fit

    @torch.no_grad()
    def correct(self, candidates: Sequence[int], start: int, end: int) -> list[int]:
        """Correct predictions of each candidate on held-out images start .. end - 1. Every evaluator
        runs the same code: `sequential` and `reload` are passes of one candidate."""
        candidates = list(candidates)
        counts = torch.zeros(len(candidates), dtype=torch.int64, device=self.labels.device)
        # BatchNorm folded once for all the passes of the call, not per pass (a fold is a few small ops
        # per conv); the reload evaluator's fresh model is folded in its pass, recalibrated statistics never
        fold_once = self.recalibration_images is None and self.evaluator != "reload"
        with training_modes_kept(self.model):  # scoring runs in eval mode
            try:
                # (gates 'full' before the fold: a Gaussian conv left 'relaxed' by training is not folded,
                # and every pass sets its candidates' hard gates anyway)
                set_gates(self.model, "full")
                with folded_batchnorm(self.model.eval()) if fold_once else contextlib.nullcontext():
                    self._passes(candidates, counts, self.candidates_per_pass(start, end), start, end)
            finally:
                set_gates(self.model, "full")
        return counts.tolist()  # one host sync per call

    def _passes(self, candidates: list[int], counts: torch.Tensor, per_pass: int, start: int, end: int) -> None:
        for lo in range(0, len(candidates), per_pass):
            group = candidates[lo:lo + per_pass]
            if self.evaluator == "reload":
                counts[lo:lo + len(group)] = self._correct_pass(self.load_model(), group, start, end,
                                                                images=self._reread_images())
            else:
                counts[lo:lo + len(group)] = self._correct_pass(self.model, group, start, end)

    def _reread_images(self) -> torch.Tensor:
        """(reload) The held-out images read again by `load_heldout`, or the resident ones without it; refused
        when the read differs from the split the ranking started with (its rows would mix two data sets)."""
        if self.load_heldout is None:
            return self.images
        images, labels = self.load_heldout()
        images, labels = images.to(self.images.device), labels.to(self.labels.device)
        if not (torch.equal(labels, self.labels) and images.shape == self.images.shape
                and torch.equal(images, self.images)):
            raise RunError(f"the held-out data read again for a candidate differs from the {len(self.labels)} images "
                           "the ranking started with (the data changed during the ranking?): rank again with the data "
                           "as it is now")
        return images

    def _correct_pass(self, model: nn.Module, group: list[int], start: int, end: int,
                      images: torch.Tensor | None = None) -> torch.Tensor:
        """K = len(group) candidates on K candidate-major row groups of every batch (of `images`, default the
        resident held-out images)."""
        images = self.images if images is None else images
        k = len(group)
        model.eval()
        set_gates(model, "hard", masks=stacked_candidate_masks(model, self.seed, group, domain=self.domain,
                                                               p_logits=self.p_logits))

        def rows(x):  # K copies; cat keeps x's memory format (channels_last convs are faster on CPU too)
            return x if k == 1 else torch.cat([x] * k)

        with contextlib.ExitStack() as stack:
            if self.recalibration_images is not None:
                statistics = stack.enter_context(grouped_batchnorm(model, k))
                model(rows(self.recalibration_images))  # collect each candidate's statistics
                statistics.mode = "apply"
            elif model is not self.model:  # (reload) the running statistics, constants: folded
                stack.enter_context(folded_batchnorm(model))
            counts = torch.zeros(k, dtype=torch.int64, device=self.labels.device)
            for lo in range(start, end, self.batch_size):
                hi = min(lo + self.batch_size, end)
                predictions = model(rows(self.prepare(images[lo:hi]))).argmax(1).view(k, -1)
                counts += (predictions == self.labels[lo:hi]).sum(1)
        return counts


class ProgressLog:
    """Append-only JSONL of finished evaluations {round, id, correct, start, end}, flushed per chunk;
    every rank of a sharded ranking appends to its own file and reads them all on resume."""

    FIELDS = ("round", "id", "correct", "start", "end")

    def __init__(self, directory: Path, rank: int = 0):
        self.directory = Path(directory)
        self.path = self.directory / f"progress-rank{rank}.jsonl"
        self.restored = 0  # evaluations the last `rank` over this log took from it (every rank's file)

    def load(self, rounds: Sequence[tuple[int, int]] | None = None) -> dict[tuple[int, int], dict]:
        """{(round, id): row} of every rank's file; with `rounds` ((start, end) of each round) only the rows on
        their round's images (a log written with other rounds, e.g. by a version that ranked a lone candidate
        in one round, is evaluated again rather than added up)."""
        done = {}
        for path in sorted(self.directory.glob("progress-rank*.jsonl")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that chunk is evaluated again
                # (a kill cuts a line into invalid JSON; a valid line of anything else is another file's)
                if not (isinstance(row, dict) and all(type(row.get(key)) is int for key in self.FIELDS)):
                    raise RunError(f"{str(path)!r} line {number} is not a progress row (integer "
                                   f"{', '.join(self.FIELDS)}): {line[:80]!r}; rank afresh (--overwrite) "
                                   "or under another --tag")
                key = (row["round"], row["id"])
                if rounds is None or (key[0] < len(rounds) and (row["start"], row["end"]) == rounds[key[0]]):
                    done[key] = row
        return done

    def append(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        with open(self.path, "a+b") as f:  # (appends go to the end, wherever the reads left the position)
            # a kill mid-write leaves a cut last line: start a line of our own, or the first new row
            # would join it and be unreadable on the next resume (evaluated again)
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())


def round_ends(strategy: str, size: int, eta: int, first_share: float) -> list[int]:
    """Image counts that the rounds end at: [size] for exhaustive; growing by eta for racing (whatever the
    number of candidates: a lone candidate's first round is everyone's, so its first-round score compares
    with another family's)."""
    if strategy == "exhaustive":
        return [size]
    ends, k = [], 0
    # round k's share of the images, first_share x eta^k, rounded to 1e-6 of an image before the ceiling:
    # 0.1 x 3 x 300 is 90.00000000000001 in floats, and would make round 2 read 91 images, not 90
    while (images := math.ceil(round(first_share * eta**k * size, 6))) < size:
        end = max(1, images)
        if not ends or end > ends[-1]:  # a tiny held-out set may round two shares to one count
            ends.append(end)
        k += 1
    return ends + [size]


def rank(scorer: CandidateScorer, candidates: Sequence[int], *, strategy: str = "exhaustive",
         eta: int = DEFAULTS["racing_eta"], first_share: float = DEFAULTS["racing_first_share"], chunk: int = 64,
         log: ProgressLog | None = None, shard: tuple[int, int] = (0, 1),
         gather: Callable[[list[dict]], list[dict]] | None = None,
         progress: bool = True, desc: str = "ranking candidates") -> list[dict]:
    """Score `candidates`; one row {id, score, images, first_round_score, kept_fraction} each, in id
    order. `first_round_score` is the accuracy on the first round's images, which every candidate saw
    (racing's first share; the whole set for exhaustive): the score to average over all candidates.

    shard = (rank, world): this process evaluates every world-th survivor; `gather` exchanges the
    finished rows between ranks (all-gather) so that all ranks agree on the survivors.
    """
    if strategy not in RANKING_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(RANKING_STRATEGIES)}; got {strategy!r}")
    if eta < 2 or not 0 < first_share <= 1:
        raise ValueError(f"racing needs eta >= 2 and 0 < first_share <= 1, got {eta} and {first_share}")
    candidates = list(candidates)  # (any iterable of ids: it is read more than once)
    repeated = sorted(c for c, n in collections.Counter(candidates).items() if n > 1)
    if repeated:  # their rows would add up: scores above 1
        raise ValueError(f"candidates must be distinct ids, got {repeated} more than once")
    rank_id, world = shard
    ends = round_ends(strategy, scorer.size, eta, first_share)
    done = log.load(list(zip([0] + ends[:-1], ends))) if log is not None else {}
    if gather is not None:
        # all ranks read the logs before any of them appends (this is a collective), and take the
        # union: ranks that read at different moments would otherwise split different todo lists
        done = {(row["round"], row["id"]): row for row in gather(list(done.values()))}
    correct = {c: 0 for c in candidates}
    images = {c: 0 for c in candidates}
    survivors, start = list(candidates), 0
    round_sizes = [len(candidates)]
    for _ in ends[1:]:
        round_sizes.append(math.ceil(round_sizes[-1] / eta))
    # the bar counts every rank's evaluations: those restored from the logs from the start (outside its
    # rate: they took no time now), its own as they finish, the other ranks' at each round's end
    restored = sum(1 for _, c in done if c in images)
    if log is not None:
        log.restored = restored
    # racing scores a candidate once per round it reaches: the bar counts such candidate-rounds
    bar = tqdm(total=sum(round_sizes), initial=restored, desc=desc, unit="cand" if len(ends) == 1 else "cand-round",
               disable=not progress, dynamic_ncols=True)
    for round_index, end in enumerate(ends):
        todo = [c for c in survivors if (round_index, c) not in done]
        mine = todo[rank_id::world]
        finished = [done[(round_index, c)] for c in survivors if (round_index, c) in done]
        for lo in range(0, len(mine), chunk):
            group = mine[lo:lo + chunk]
            rows = [{"round": round_index, "id": c, "correct": n, "start": start, "end": end}
                    for c, n in zip(group, scorer.correct(group, start, end))]
            if log is not None:
                log.append(rows)
            finished += rows
            bar.update(len(group))
        if gather is not None:
            # every rank read every rank's log on resume: keep one row per (round, candidate)
            finished = list({(row["round"], row["id"]): row for row in gather(finished)}.values())
            bar.update(len(todo) - len(mine))
        for row in finished:
            correct[row["id"]] += row["correct"]
            images[row["id"]] = row["end"]
        if round_index == 0:
            first_round = {c: correct[c] / end for c in candidates}
        start = end
        if end < scorer.size:  # keep the best 1/eta (all saw the same images), ties in a drawn order
            draw = tie_order(scorer.seed, round_index, survivors)
            survivors.sort(key=lambda c: (-correct[c], draw[c], c))
            survivors = sorted(survivors[:math.ceil(len(survivors) / eta)])
    bar.close()
    ids = sorted(candidates)
    return [{"id": c, "score": correct[c] / images[c], "images": images[c], "first_round_score": first_round[c],
             "kept_fraction": fraction} for c, fraction in zip(ids, scorer.kept_fractions(ids))]


def tie_order(seed: int, round_index: int, ids: Sequence[int]) -> dict[int, float]:
    """A number per candidate that orders those tied at racing's cut of round `round_index`: drawn from
    the RNG contract (Domain.RACING_TIES, element: the candidate id), so the same on every shard and
    resume, and without the bias of an order by id (which would drop the high ids of every tie: on a
    small first share hundreds of candidates tie)."""
    low = min(ids)
    u = ops.philox_uniform(max(ids) - low + 1, seed=seed, stream=stream_id(Domain.RACING_TIES, round_index),
                           offset=low).tolist()  # (ids are ranges of candidates: their span is their count)
    return {c: u[c - low] for c in ids}


def rank_candidates(model: nn.Module, heldout: tuple[torch.Tensor, torch.Tensor], *, seed: int,
                    candidates: Sequence[int],
                    domain: Domain = Domain.CANDIDATE, p_logits: Mapping[str, torch.Tensor] | None = None,
                    batch_size: int = DEFAULTS["eval_batch_size"],
                    rows_per_pass: int = DEFAULTS["rank_rows"], prepare=None, progress: bool = True,
                    desc: str = "ranking candidates", **rank_kwargs) -> list[dict]:
    """`candidates` (ids) of a search, batched; see `rank` for the strategies."""
    scorer = CandidateScorer(model, *heldout, seed=seed, batch_size=batch_size, rows_per_pass=rows_per_pass,
                             domain=domain, p_logits=p_logits, prepare=prepare)
    return rank(scorer, candidates, progress=progress, desc=desc, **rank_kwargs)


def first_round_cut(rows: list[dict]) -> dict | None:
    """Racing's first cut, read from its rows: the first round's images, the places it kept, the score at
    the cut, how many candidates had that score and how many of those the cut dropped by its drawn order
    alone (on a small first share scores are coarse, and many tie). None when nothing was cut (exhaustive)."""
    first = min(r["images"] for r in rows)
    kept = [r for r in rows if r["images"] > first]
    if not kept:
        return None
    score = min(r["first_round_score"] for r in kept)
    tied = sum(1 for r in rows if r["first_round_score"] == score)
    return {"images": first, "places": len(kept), "score": score, "tied": tied,
            "dropped_by_draw": tied - sum(1 for r in kept if r["first_round_score"] == score)}


def tied_for_best(rows: list[dict]) -> int:
    """How many finalists share the best held-out score (best_candidate breaks the tie)."""
    best = best_candidate(rows)
    return sum(1 for r in rows if r["images"] == best["images"] and r["score"] == best["score"])


def counted(n: int, noun: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cut_note(cut: dict | None) -> str | None:
    """One line on a first cut that dropped tied candidates by its drawn order, or None."""
    if not cut or not cut["dropped_by_draw"]:
        return None
    return (f"racing's first round ({counted(cut['images'], 'image')}) kept {counted(cut['places'], 'place')}: "
            f"{cut['tied']} candidates tied at its cut score {cut['score']:.2%}, {cut['dropped_by_draw']} of them "
            "dropped by a seeded draw alone; a larger first share (or exhaustive ranking) decides them on more "
            "images")


def best_first(row: dict) -> tuple:
    """Sort key of candidates scored on the same images: highest held-out accuracy first, ties to the
    smaller network, then to the lower id."""
    return -row["score"], row["kept_fraction"], row["id"]


def best_candidate(rows: list[dict]) -> dict:
    """The first, in best_first's order, of those scored on the most images (racing's finalists)."""
    most = max(r.get("images", 0) for r in rows)
    return min((r for r in rows if r.get("images", 0) == most), key=best_first)
