"""SupNet-M and SupNet-MI: gated Shake-Shake-26 2x(16k)d for CIFAR (design.md layer 3; pgnas-method.md 3).

Three stages of four blocks, widths 16k / 32k / 64k, strides 1 / 2 / 2 (k = 6: SupNet-M, 26.2M
parameters; k = 10: SupNet-MI, 72.7M). A block mixes two residual branches, ReLU - [gate] -
conv3x3(stride) - BN - ReLU - [gate] - conv3x3 - BN, with shake-shake weights
(`pgnas_fast.nn.ShakeShake`: random convex weights per example forward, an independent set backward,
1/2 each in eval). The skip is the identity, or where the channel count changes the two-path
shortcut of Gastaldi's code: (subsample by the stride - [gate] - conv1x1 to w/2) and (shift by one
pixel - subsample - [gate] - conv1x1 to w/2), concatenated, then BN. Head: ReLU, global average
pool, [gate] linear.

Every gated layer has one scalar p (gate_groups=None), as the authors' TF code. The stem conv is
gated too by default (`gate_stem=True`): with it the network has the 56 gated layers the authors'
code has (48 branch convs + 6 shortcut convs + classifier + stem); `gate_stem=False` gives 55.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import GatedConv2d, GatedLinear, ShakeShake, norm_relu_conv, relu_gated_convs
from . import check_sizes, register

DEPTH_BLOCKS = 4  # Shake-Shake-26: (26 - 2) / 6 blocks per stage


class ShakeBranch(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int, gate_kw: dict):
        super().__init__(
            nn.ReLU(),
            GatedConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, **gate_kw),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            GatedConv2d(c_out, c_out, 3, padding=1, bias=False, **gate_kw),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_first_conv(self[1](self[0](x)))

    def after_first_conv(self, h: torch.Tensor) -> torch.Tensor:
        """The branch from the output of its first conv on (ShakeBlock runs the first ReLU - [gate] - conv
        of both branches together)."""
        _, _, norm1, _, conv2, norm2 = self
        return norm2(norm_relu_conv(norm1, conv2, h))


class TwoPathShortcut(nn.Module):
    """Gastaldi's shortcut where the shape changes: two half-width 1x1 paths, one shifted a pixel.

    The shift (pad right/bottom, crop top/left) makes the second path see the pixels the strided
    subsampling of the first skips.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, gate_kw: dict):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"two-path shortcut needs an even output width, got {c_out}")
        self.stride = stride
        self.path1 = GatedConv2d(c_in, c_out // 2, 1, bias=False, **gate_kw)
        self.path2 = GatedConv2d(c_in, c_out // 2, 1, bias=False, **gate_kw)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        # avg-pool with a 1x1 window and stride s is plain subsampling
        return self.bn(torch.cat([self.path1(x[:, :, ::s, ::s]), self.path2(shifted[:, :, ::s, ::s])], 1))


class ShakeBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, gate_kw: dict, backend: str | None):
        super().__init__()
        self.branches = nn.ModuleList([ShakeBranch(c_in, c_out, stride, gate_kw) for _ in range(2)])
        # as Gastaldi's code: the identity whenever the width is unchanged (stride 1 there)
        self.shortcut = None if c_in == c_out else TwoPathShortcut(c_in, c_out, stride, gate_kw)
        self.combine = ShakeShake(backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        firsts = relu_gated_convs([branch[1] for branch in self.branches], x)
        if firsts is None:
            return self.combine([branch(x) for branch in self.branches], skip=skip)
        return self.combine([branch.after_first_conv(h) for branch, h in zip(self.branches, firsts)], skip=skip)


class ShakeShakeSupernet(nn.Module):
    def __init__(self, k: int = 6, num_classes: int = 10, *, blocks_per_stage: int = DEPTH_BLOCKS,
                 stem_width: int = 16, gate_stem: bool = True, p_init: float = 0.1, tau: float = 0.2,
                 backend: str | None = None):
        super().__init__()
        check_sizes("shake-shake super-network", k=k, blocks_per_stage=blocks_per_stage, stem_width=stem_width)
        gate_kw = dict(gate_groups=None, p_init=p_init, tau=tau, backend=backend)
        stem_conv = (GatedConv2d(3, stem_width, 3, padding=1, bias=False, **gate_kw) if gate_stem
                     else nn.Conv2d(3, stem_width, 3, padding=1, bias=False))
        self.stem = nn.Sequential(stem_conv, nn.BatchNorm2d(stem_width))
        stages, c_in = [], stem_width
        for width, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(ShakeBlock(c_in, width, stride if b == 0 else 1, gate_kw, backend))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = GatedLinear(c_in, num_classes, **gate_kw)
        for m in self.modules():  # He init of Gastaldi's code: std sqrt(2 / (k * k * c_out))
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


@register("supnet-m")
def supnet_m(num_classes: int = 10, p_init: float = 0.1, tau: float = 0.2, backend: str | None = None,
             k: int = 6, **kwargs) -> ShakeShakeSupernet:
    """SupNet-M: Shake-Shake-26 2x96d (k = 6), 26.2M parameters."""
    return ShakeShakeSupernet(k, num_classes, p_init=p_init, tau=tau, backend=backend, **kwargs)


@register("supnet-mi")
def supnet_mi(num_classes: int = 10, p_init: float = 0.1, tau: float = 0.2, backend: str | None = None,
              k: int = 10, **kwargs) -> ShakeShakeSupernet:
    """SupNet-MI ("inflated"): Shake-Shake-26 2x160d (k = 10), 72.7M parameters."""
    return ShakeShakeSupernet(k, num_classes, p_init=p_init, tau=tau, backend=backend, **kwargs)
