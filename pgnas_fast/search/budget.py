"""A size budget on the candidates: the config keys `max_params` and `max_macs` (`search` and `rank`
take them as --max-params and --max-macs).

A candidate's size is that of the network `pgnas-fast export` would give it (`materialize`: dropped
channels sliced out, the producers' unread channels removed, BatchNorm folded, training-only heads
gone): parameters, and multiply-accumulates of its convolutions and linear layers for one image. A
ranking under a budget sizes every drawn candidate first and ranks only those that fit, so racing
spends no images on networks that could not be chosen, and the best candidate fits by construction.
Sizing materializes each candidate once (medians on the 2-core CPU: digits 11 ms, SupNet-M 0.17 s,
SupNet-E 0.43 s; benchmarks/test_bench_sizing.py), sharded across torchrun's ranks like the ranking, and keeps every size in the run's
SIZES_DIRECTORY (SizeCache), so that rankings under other budgets or tags, and a resume after a kill
mid-sizing, size no candidate twice.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ..nn import candidate_masks, gated_layers
from ..ops.streams import Domain
from .io import RunError


class BudgetError(RunError):
    """No drawn candidate fits the budget."""


@dataclass(frozen=True)
class Budget:
    max_params: int = 0  # 0: no limit
    max_macs: int = 0

    @classmethod
    def of(cls, config: Mapping) -> Budget:
        return cls(config["max_params"], config["max_macs"])

    def __bool__(self) -> bool:
        return bool(self.max_params or self.max_macs)

    def fits(self, size: Mapping[str, int]) -> bool:
        return ((not self.max_params or size["params"] <= self.max_params)
                and (not self.max_macs or size["macs"] <= self.max_macs))

    def settings(self) -> dict:
        """The budget as a ranking's settings.json and the summaries record it (0: no limit)."""
        return {"max_params": self.max_params, "max_macs": self.max_macs}

    def __str__(self) -> str:
        limits = [f"{limit:,} {what if limit != 1 else one}" for limit, what, one in
                  ((self.max_params, "parameters", "parameter"), (self.max_macs, "MACs per image", "MAC per image"))
                  if limit]
        return "at most " + " and ".join(limits) if limits else "no budget"


def candidate_size(model: nn.Module, masks: Mapping[str, torch.Tensor], input_size) -> dict[str, int]:
    """{params, macs} of the network that `masks` materializes `model` into (what export writes)."""
    from ..supernets.info import describe
    from .materialize import materialize

    facts = describe(materialize(model, masks), input_size)
    return {"params": facts["params"], "macs": facts["macs"]}


def check_reachable(model: nn.Module, budget: Budget, input_size) -> str | None:
    """Before any training or sizing: a BudgetError when no candidate can fit `budget` (even the network
    with every gated input channel dropped, the smallest any candidate can be, is over it); a note when
    every candidate fits (the network with every channel kept is within it); None otherwise."""
    def every_channel(value: float) -> dict[str, int]:
        return candidate_size(model, {name: torch.full((layer.gate_channels,), value, device=layer.p_logit.device)
                                      for name, layer in gated_layers(model)}, input_size)

    smallest = every_channel(0.0)
    if not budget.fits(smallest):
        raise BudgetError(f"no candidate can fit the budget ({budget}): with every gated input channel dropped the "
                          f"network still has {smallest['params']:,} parameters and {smallest['macs']:,} MACs per "
                          "image (its ungated layers)")
    largest = every_channel(1.0)
    if budget.fits(largest):
        return (f"the budget ({budget}) excludes no candidate: the network with every channel kept has "
                f"{largest['params']:,} parameters and {largest['macs']:,} MACs per image")
    return None


SIZES_DIRECTORY = "sizes"  # in a run directory; a fresh search removes it with the rankings


def size_cache_key(checkpoint: str, epoch: int, device) -> str:
    """What a candidate's masks, and so its size, derive from beyond the run's config and seed: the
    checkpoint's drop probabilities (which and of what epoch), computed on a device type (whose last bit
    may flip a mask at its threshold)."""
    return f"{checkpoint}-epoch{epoch}-{torch.device(device).type}"


class SizeCache:
    """The sizes of one checkpoint's candidates (`key`, e.g. 'last-epoch30'), kept in `directory`: every
    process appends to a log of its own (its pid: concurrent rankings and torchrun's ranks never share a
    file) and reads all of them (a line a kill cut is skipped; sizes are deterministic, so repeats agree)."""

    def __init__(self, directory: str | Path, key: str):
        self.directory, self.key = Path(directory), key

    def load(self) -> dict[int, dict[str, int]]:
        sizes = {}
        for path in sorted(self.directory.glob(f"{self.key}-*.jsonl")):
            try:
                lines = path.read_text().split("\n")[:-1]  # (the part after the last newline is a cut line)
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:
                try:
                    row = json.loads(line)
                    sizes[int(row["id"])] = {"params": int(row["params"]), "macs": int(row["macs"])}
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
        return sizes

    def appender(self):
        """A file to append rows to (one JSON line each, flushed as written)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return open(self.directory / f"{self.key}-{os.getpid()}.jsonl", "a", buffering=1)


def candidate_sizes(model: nn.Module, seed: int, candidates: Sequence[int], input_size, *,
                    domain: Domain = Domain.CANDIDATE, p_logits: Mapping[str, torch.Tensor] | None = None,
                    shard: tuple[int, int] = (0, 1), gather: Callable[[list], list] | None = None,
                    cache: SizeCache | None = None, progress: bool = True) -> dict[int, dict[str, int]]:
    """{id: {params, macs}} of `candidates` (masks as `candidate_masks` draws them). shard = (rank, world):
    this process takes every world-th candidate, sizes those that `cache` does not hold yet, and appends
    each size to it; `gather` (all-gather) gives every rank all of them. The shares do not depend on the
    cache, which the ranks may read at different moments (each while the others append to it)."""
    known = cache.load() if cache is not None else {}
    share = list(candidates)[shard[0]::shard[1]]
    rows = [{"id": c, **known[c]} for c in share if c in known]
    mine = [c for c in share if c not in known]
    log = cache.appender() if cache is not None and mine else None
    try:
        for c in tqdm(mine, desc="sizing candidates", unit="cand", disable=not progress, dynamic_ncols=True):
            masks = candidate_masks(model, seed, c, domain=domain, p_logits=p_logits)
            rows.append({"id": c, **candidate_size(model, masks, input_size)})
            if log is not None:
                log.write(json.dumps(rows[-1]) + "\n")
    finally:
        if log is not None:
            log.close()
    if gather is not None:
        rows = gather(rows)
    return {row["id"]: {"params": row["params"], "macs": row["macs"]} for row in rows}


def within_budget(sizes: Mapping[int, Mapping[str, int]], budget: Budget) -> list[int]:
    """The ids whose size fits `budget`, in id order; a BudgetError naming the smallest sizes if none does."""
    fitting = sorted(c for c, size in sizes.items() if budget.fits(size))
    if not fitting:
        smallest = {key: min(size[key] for size in sizes.values()) for key in ("params", "macs")}
        over = [f"every one has more than {limit:,} {what} (the smallest: {smallest[key]:,}; {flag})"
                for key, limit, what, flag in (("params", budget.max_params, "parameters", "--max-params"),
                                               ("macs", budget.max_macs, "MACs per image", "--max-macs"))
                if limit and smallest[key] > limit]
        why = "; ".join(over) or (f"some fit each limit, none both (the smallest has {smallest['params']:,} "
                                  f"parameters, the cheapest {smallest['macs']:,} MACs per image)")
        raise BudgetError(f"none of the {len(sizes)} drawn candidates fits the budget ({budget}): {why}; raise a "
                          "limit, or draw more candidates")
    return fitting


def pareto_front(rows: Sequence[Mapping]) -> list[dict]:
    """The sized rows ({id, score, images, params, macs, ...}) scored on the most images (racing's
    finalists; every row for exhaustive ranking) that no other such row dominates: none is at least as
    accurate with at most as many parameters and MACs, better in one. Smallest first; among rows of one
    score and size, the lowest id stands for them."""
    most = max(r["images"] for r in rows)
    finalists = sorted((r for r in rows if r["images"] == most), key=lambda r: (r["params"], r["macs"], -r["score"],
                                                                                 r["id"]))
    front: list[dict] = []
    for row in finalists:
        if not any(f["score"] >= row["score"] and f["params"] <= row["params"] and f["macs"] <= row["macs"]
                   for f in front):
            front.append(dict(row))
    return front


__all__ = ["SIZES_DIRECTORY", "Budget", "BudgetError", "SizeCache", "candidate_size", "candidate_sizes",
           "check_reachable", "pareto_front", "size_cache_key", "within_budget"]
