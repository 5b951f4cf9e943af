"""The found architecture as data: `architecture.json` (design.md "Export")."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ..nn import gated_layers

FORMAT_VERSION = 1


def _layer_record(name: str, layer, mask: torch.Tensor) -> dict:
    record = {
        "name": name,
        "type": "linear" if isinstance(layer, nn.Linear) else "conv2d",
        "in_channels": layer.gate_channels,
        "out_channels": layer.weight.shape[0],
        "gate_groups": layer.gate_group_sizes,
        "p": torch.sigmoid(layer.p_logit.detach()).tolist(),
        "kept_channels": torch.nonzero(mask).flatten().tolist(),
    }
    if record["type"] == "conv2d":
        record.update(kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                      dilation=list(layer.dilation), groups=layer.groups)
    return record


def architecture_record(model: nn.Module, masks: Mapping[str, torch.Tensor], *, config: dict, seed: int,
                        candidate: dict, test_accuracy: float | None) -> dict:
    """Everything that names the found architecture; deterministic for a given (config, seed)."""
    layers = [_layer_record(name, layer, masks[name]) for name, layer in gated_layers(model)]
    return {
        "format_version": FORMAT_VERSION,
        "preset": config["preset"],
        "seed": seed,
        "candidate": candidate["id"],
        "score": candidate["score"],
        "test_accuracy": test_accuracy,
        "kept_fraction": candidate["kept_fraction"],
        "layers": layers,
    }
