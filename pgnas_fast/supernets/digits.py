"""A tiny gated multi-branch super-network for the 8x8 digits (the `digits-tiny` preset).

Three mixed blocks (8x8, 8x8 -> 4x4, 4x4). A block sums S branches with shake-shake weights, each
branch ReLU - [gate] - conv - BN with its own receptive field (3x3, dilated 3x3 = 5x5 field, 1x1),
plus a shortcut (identity, or [gate] - 1x1 conv - BN where the shape changes). Head: ReLU, global
average pool, [gate] linear. Gates have one drop probability per group of `gate_group_size` input
channels, so a candidate can thin every branch or remove it. Any image size (the head pools globally)
and `in_channels` (1 for digits; 3 to search RGB images of your own: README "Your own data").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import GatedConv2d, GatedLinear, ShakeShake, relu_gated_convs
from . import check_sizes, register

BRANCHES = {  # name -> (kernel, dilation)
    "conv3x3": (3, 1),
    "dil3x3": (3, 2),
    "conv1x1": (1, 1),
}


class MixedBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, branches, gate_kw: dict):
        super().__init__()
        self.branches = nn.ModuleList()
        for name in branches:
            kernel, dilation = BRANCHES[name]
            conv = GatedConv2d(c_in, c_out, kernel, stride=stride, padding=dilation * (kernel // 2),
                               dilation=dilation, bias=False, **gate_kw)
            self.branches.append(nn.Sequential(nn.ReLU(), conv, nn.BatchNorm2d(c_out)))
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(GatedConv2d(c_in, c_out, 1, stride=stride, bias=False, **gate_kw),
                                          nn.BatchNorm2d(c_out))
        self.combine = ShakeShake()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        # each branch is ReLU - [gate] - conv - BN: the S branches share the ReLU (and in training its read)
        convs = relu_gated_convs([branch[1] for branch in self.branches], x)
        if convs is None:
            return self.combine([branch(x) for branch in self.branches], skip=skip)
        return self.combine([branch[2](h) for branch, h in zip(self.branches, convs)], skip=skip)


class DigitsSupernet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10, branches=("conv3x3", "dil3x3", "conv1x1"),
                 gate_group_size: int = 4, p_init: float = 0.1, tau: float = 0.2, in_channels: int = 1):
        super().__init__()
        check_sizes("digits super-network", width=width, in_channels=in_channels)
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches:
            raise ValueError(f"branches must be a non-empty list from {sorted(BRANCHES)}, got {list(branches)}")
        gate_kw = dict(gate_groups=gate_group_size, p_init=p_init, tau=tau)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.blocks = nn.Sequential(
            MixedBlock(width, width, 1, branches, gate_kw),
            MixedBlock(width, 2 * width, 2, branches, gate_kw),
            MixedBlock(2 * width, 2 * width, 1, branches, gate_kw),
        )
        self.classifier = GatedLinear(2 * width, num_classes, **gate_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


@register("digits-tiny")
def digits_tiny(**kwargs) -> DigitsSupernet:
    return DigitsSupernet(**kwargs)
