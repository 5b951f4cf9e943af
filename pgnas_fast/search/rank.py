"""Sampling and ranking candidates: hard gates from the learned p, scored on held-out data with the
inherited weights, BatchNorm in eval mode with the super-network's running statistics (the authors').

One candidate at a time here; batched ranking of many candidates per pass is a later layer.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from ..nn import candidate_masks, gated_layers, set_gates
from ..ops.streams import Domain


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> float:
    """Top-1 accuracy of `model` (in eval mode, gates as they are set) on (images, labels)."""
    model.eval()
    images, labels = data
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


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


def rank_candidates(model: nn.Module, heldout: tuple[torch.Tensor, torch.Tensor], *, seed: int, count: int,
                    batch_size: int, domain: Domain = Domain.CANDIDATE,
                    p_logits: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
                    desc: str = "ranking candidates") -> list[dict]:
    """Score candidates 0 .. count - 1: one row {id, score, kept_fraction} each."""
    rows = []
    for candidate in tqdm(range(count), desc=desc, unit="cand", disable=not progress, dynamic_ncols=True):
        masks = candidate_masks(model, seed, candidate, domain=domain, p_logits=p_logits)
        set_gates(model, "hard", masks=masks)
        rows.append({"id": candidate, "score": accuracy(model, heldout, batch_size),
                     "kept_fraction": kept_fraction(masks)})
    set_gates(model, "full")
    return rows


def best_candidate(rows: list[dict]) -> dict:
    """Highest held-out accuracy; ties go to the smaller network, then to the lower id."""
    return min(rows, key=lambda r: (-r["score"], r["kept_fraction"], r["id"]))
