"""Sampling and ranking candidates: hard gates from the learned p, scored on held-out data with the
inherited weights, BatchNorm in eval mode with the super-network's running statistics (the authors').

One candidate at a time here; batched ranking of many candidates per pass is a later layer.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from ..nn import candidate_masks, gated_layers, set_gates
from ..ops.streams import Domain


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of `model` (in eval mode, gates as they are set) over (images, labels) batches."""
    model.eval()
    correct = seen = 0
    for images, labels in batches:
        correct += (model(images).argmax(1) == labels).sum().item()
        seen += len(labels)
    return correct / seen


def kept_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    kept = sum(mask.sum().item() for mask in masks.values())
    return kept / sum(mask.numel() for mask in masks.values())


def uniform_drop_logits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-channel logits of one shared p: the guided candidates' expected drop rate (mean p over
    every gated channel), for the random-sampling baseline of the paper's Table 3."""
    layers = gated_layers(model)
    with torch.no_grad():
        p = torch.cat([torch.sigmoid(layer.p_logit_per_channel()) for _, layer in layers]).mean().item()
    z = math.log(p) - math.log1p(-p)
    return {name: torch.full((layer.gate_channels,), z, device=layer.p_logit.device) for name, layer in layers}


def rank_candidates(model: nn.Module, heldout: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                    seed: int, count: int, domain: Domain = Domain.CANDIDATE,
                    p_logits: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
                    desc: str = "ranking candidates") -> list[dict]:
    """Score candidates 0 .. count - 1 on the batches `heldout()` yields: one row {id, score,
    kept_fraction} each."""
    rows = []
    for candidate in tqdm(range(count), desc=desc, unit="cand", disable=not progress, dynamic_ncols=True):
        masks = candidate_masks(model, seed, candidate, domain=domain, p_logits=p_logits)
        set_gates(model, "hard", masks=masks)
        rows.append({"id": candidate, "score": accuracy(model, heldout()),
                     "kept_fraction": kept_fraction(masks)})
    set_gates(model, "full")
    return rows


def best_candidate(rows: list[dict]) -> dict:
    """Highest held-out accuracy; ties go to the smaller network, then to the lower id."""
    return min(rows, key=lambda r: (-r["score"], r["kept_fraction"], r["id"]))
