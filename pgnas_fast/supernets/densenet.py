"""SupNet-D-121: DenseNet-121 with gates, for ImageNet (design.md layer 3; pgnas-method.md section 3).

DenseNet-121 (Huang et al. 2017; growth 32, blocks 6/12/24/16, bottleneck width 4 x growth,
compression 0.5, 7x7 stride-2 stem + 3x3 max-pool, classifier a plain nn.Linear), with BN - ReLU -
[gate] - conv in every dense layer and transition.

A gated conv whose input is a dense block's concatenation has one p per input group, as the authors'
`split_pattern`: the block input, then each earlier layer's `growth` channels. That holds for the
dense layers' 1x1 convs and for the transitions (whose input is the whole block's concatenation);
the 3x3 conv of a dense layer has one p. This gives the published 119 gated convs and 638 p values
(one p per transition would give 596).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import GatedConv2d, norm_relu_conv
from . import check_sizes, register


class DenseLayer(nn.Module):
    # conv1's channels reach only conv2 (through norm2 and a ReLU): materialize may drop the ones
    # conv2's candidate does not read
    channel_chains = (("conv1", "norm2", "conv2"),)

    def __init__(self, input_groups: list[int], growth: int, bn_size: int, gate_kw: dict):
        super().__init__()
        c_in = sum(input_groups)
        width = bn_size * growth
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = GatedConv2d(c_in, width, 1, bias=False, gate_groups=list(input_groups), **gate_kw)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = GatedConv2d(width, growth, 3, padding=1, bias=False, gate_groups=None, **gate_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_relu_conv(self.norm2, self.conv2, norm_relu_conv(self.norm1, self.conv1, x))


class DenseBlock(nn.Module):
    def __init__(self, n_layers: int, c_in: int, growth: int, bn_size: int, gate_kw: dict):
        super().__init__()
        self.layers = nn.ModuleList()
        groups = [c_in]
        for _ in range(n_layers):
            self.layers.append(DenseLayer(groups, growth, bn_size, gate_kw))
            groups = groups + [growth]
        self.out_groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, input_groups: list[int], c_out: int, gate_kw: dict):
        c_in = sum(input_groups)
        super().__init__(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            GatedConv2d(c_in, c_out, 1, bias=False, gate_groups=list(input_groups), **gate_kw),
            nn.AvgPool2d(2, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, _, conv, pool = self
        return pool(norm_relu_conv(norm, conv, x))


class DenseNetSupernet(nn.Module):
    def __init__(self, num_classes: int = 1000, *, growth: int = 32, block_config=(6, 12, 24, 16),
                 stem_width: int = 64, bn_size: int = 4, compression: float = 0.5, p_init: float = 0.1,
                 tau: float = 0.2, backend: str | None = None):
        super().__init__()
        check_sizes("DenseNet super-network", growth=growth, block_config=block_config, stem_width=stem_width,
                    bn_size=bn_size, lists=("block_config",))
        gate_kw = dict(p_init=p_init, tau=tau, backend=backend)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, padding=1),
        )
        stages, c = [], stem_width
        for i, n_layers in enumerate(block_config):
            block = DenseBlock(n_layers, c, growth, bn_size, gate_kw)
            stages.append(block)
            c = sum(block.out_groups)
            if i < len(block_config) - 1:
                c_out = int(c * compression)
                stages.append(Transition(block.out_groups, c_out, gate_kw))
                c = c_out
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.features(self.stem(x))))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register("supnet-d121")
def supnet_d121(num_classes: int = 1000, p_init: float = 0.1, tau: float = 0.2, backend: str | None = None,
                **kwargs) -> DenseNetSupernet:
    """SupNet-D-121: gated DenseNet-121, about 7.98M parameters, 119 gated convs, 638 p values."""
    return DenseNetSupernet(num_classes, p_init=p_init, tau=tau, backend=backend, **kwargs)
