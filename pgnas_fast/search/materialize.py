"""The found architecture as a network: a physically smaller plain-torch module, and its export.

`materialize(model, masks)` copies the super-network in eval mode and replaces
- every gated conv/linear by one that gathers only its kept input channels and holds only their
  weights (`SlicedConv2d`, `SlicedLinear`; a grouped conv keeps its width and zeroes the dropped
  channels, `MaskedConv2d`; a layer that keeps nothing becomes `ZeroInput`, what the layer gives for
  an all-zero input);
- every stochastic module by its evaluation-mode behaviour in plain torch ops (shake-shake: the mean
  of the branches; drop-path: identity),
so the result equals the masked super-network in eval mode (outputs within float rounding), needs
no pgnas_fast op, and exports with torch.export to an artefact that plain torch loads.

Not done yet (said in the issue): removing producers' output channels that no consumer reads, and
folding BatchNorm into convolutions. Parameter savings are therefore the dropped input channels'
weights of the gated layers.

Export directory: `subnet.pt` (the materialized module, pickled; `load_subnet` reads it),
`model.pt2` (torch.export: `torch.export.load(path).module()` without pgnas_fast),
`architecture.json`, `config.json`, `export.json` (sizes before and after).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..nn import GatedConv2d, ShakeShake, StochasticModule, gated_layers


class SlicedConv2d(nn.Module):
    """A conv that reads only the kept input channels `index` of its input."""

    def __init__(self, conv: nn.Conv2d, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())
        self.conv = nn.Conv2d(len(index), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, 1, conv.bias is not None, conv.padding_mode)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.index_select(1, index))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.index_select(1, self.index))


class SlicedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())
        self.linear = nn.Linear(len(index), linear.out_features, linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight.index_select(1, index))
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.index))


def _plain_copy(layer: nn.Module) -> nn.Module:
    """A plain nn.Conv2d / nn.Linear with the gated layer's hyper-parameters and weights."""
    if isinstance(layer, GatedConv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    plain.load_state_dict({"weight": layer.weight, **({"bias": layer.bias} if layer.bias is not None else {})})
    return plain.to(layer.weight.device)


class ZeroInput(nn.Module):
    """A gated layer with every input channel dropped: what it gives for an all-zero input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = _plain_copy(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.zeros_like(x))


class MaskedConv2d(nn.Module):
    """A grouped gated conv: slicing would regroup it, so its dropped channels are zeroed instead."""

    def __init__(self, layer: nn.Conv2d, mask: torch.Tensor):
        super().__init__()
        self.conv = _plain_copy(layer)
        self.register_buffer("mask", mask.view(1, -1, 1, 1).to(layer.weight).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * self.mask)


class MeanCombine(nn.Module):
    """Shake-shake in evaluation mode: the mean of the branches, plus the skip."""

    def forward(self, branches: list[torch.Tensor], skip: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.stack(branches).mean(0)
        return out if skip is None else out + skip


def _plain(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    """The plain-torch replacement of one gated layer with keep mask `mask`."""
    index = torch.nonzero(mask).flatten().to(layer.weight.device)
    if len(index) == 0:
        return ZeroInput(layer)
    if isinstance(layer, GatedConv2d):
        return SlicedConv2d(layer, index) if layer.groups == 1 else MaskedConv2d(layer, mask)
    return SlicedLinear(layer, index)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def materialize(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain-torch copy of `model` in eval mode that computes the candidate `masks` names."""
    subnet = copy.deepcopy(model).eval()
    for name, layer in gated_layers(subnet):
        _replace(subnet, name, _plain(layer, masks[name]))
    for name, module in list(subnet.named_modules()):
        if isinstance(module, ShakeShake):
            _replace(subnet, name, MeanCombine())
        elif isinstance(module, StochasticModule):  # e.g. drop-path: identity in evaluation
            _replace(subnet, name, nn.Identity())
    return subnet.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_subnet(directory: str | Path, map_location="cpu") -> nn.Module:
    """The materialized network of an export directory (written by `pgnas-fast export`)."""
    path = Path(directory) / "subnet.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not an export directory: subnet.pt is missing")
    return torch.load(path, map_location=map_location, weights_only=False).eval()


__all__ = ["MaskedConv2d", "MeanCombine", "SlicedConv2d", "SlicedLinear", "ZeroInput", "count_parameters",
           "load_subnet", "materialize"]
