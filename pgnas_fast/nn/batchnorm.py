"""BatchNorm in evaluation: folded into the conv before it, and statistics per candidate group for
ranking with recalibrated statistics.

Every evaluation pass with the running statistics (ranking, accuracies) runs under
`folded_batchnorm`: an eval-mode BatchNorm that directly follows a conv in an nn.Sequential becomes
that conv's weight scale and bias (the folding that materialized exports keep), one pass over the
activations fewer per pair (on the 2-core CPU a batched digits ranking pass 581 -> 526 ms;
oneDNN adds the bias inside the conv).

The authors rank with the super-network's running statistics. A candidate that drops channels
shifts the activations behind them, so `--bn-recalibrate N` recomputes every BatchNorm's statistics
for each candidate from N training images. With K candidates in one batch (K equal row groups,
candidate-major, see set_gates), `grouped_batchnorm` makes every BatchNorm layer

- ``collect``: normalise each row group with its own batch statistics (as training mode does) and
  keep them, mean and unbiased variance per group, [K, C] (what PyTorch's running statistics would
  hold after one training-mode pass with momentum 1);
- ``apply``: normalise each row group with its kept statistics (eval mode, per candidate),

without copying the model. Affine parameters are the super-network's.
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn


BATCHNORM_2D = (nn.BatchNorm2d, nn.SyncBatchNorm)  # (SyncBatchNorm: what sync_bn training makes)


def shared_modules(model: nn.Module) -> set[nn.Module]:
    """The modules that `model` holds in more than one place (one object under two names): a change made
    for one place, a fold or a slice, would change what the others compute."""
    uses = collections.Counter(module for _, module in model.named_modules(remove_duplicate=False))
    return {module for module, count in uses.items() if count > 1}


def batchnorm_after_conv(model: nn.Module, conv_of: Callable[[nn.Module], nn.Module] = lambda m: m):
    """(container, conv, name, bn) for each BatchNorm with running statistics that directly follows a
    conv inside an nn.Sequential of `model` (`conv_of` maps a child to the conv it holds); not where
    the conv or the BatchNorm is shared (shared_modules: folding for one place would change another)."""
    shared = shared_modules(model)
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for (_, producer), (name, bn) in zip(children, children[1:]):
            conv = conv_of(producer)
            if (isinstance(conv, nn.Conv2d) and type(bn) in BATCHNORM_2D and bn.track_running_stats
                    and not {producer, conv, bn} & shared):
                yield container, conv, name, bn


def folded_into_conv(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of `conv` followed by eval-mode `bn`, as one conv; the weight keeps its memory
    format (strides), so that the conv runs the same kernel."""
    with torch.no_grad():  # (constants; mul's out= takes no autograd)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
        bias = conv.bias * scale + shift if conv.bias is not None else shift
        weight = torch.mul(conv.weight, scale.view(-1, 1, 1, 1), out=torch.empty_like(conv.weight))
    return weight, bias


@contextlib.contextmanager
def folded_batchnorm(model: nn.Module):
    """Within the block, each eval-mode BatchNorm that follows a conv in an nn.Sequential is folded into
    that conv (and replaced by nn.Identity); afterwards the same modules and Parameters are back. Not
    folded: a conv or BatchNorm held in two places (batchnorm_after_conv) and a conv sampling Gaussian
    noise (relaxed Gaussian gates: the noise's scale would change sign with a negative BatchNorm weight)."""
    folded, pairs = [], list(batchnorm_after_conv(model))
    try:
        with torch.no_grad():
            for container, conv, name, bn in pairs:
                if bn.training or getattr(conv, "gaussian_relaxed", False):
                    continue
                weight, bias = folded_into_conv(conv, bn)
                folded.append((container, conv, name, bn, conv.weight, conv.bias))
                conv.weight, conv.bias = nn.Parameter(weight, False), nn.Parameter(bias, False)
                setattr(container, name, nn.Identity())
        yield model
    finally:
        for container, conv, name, bn, weight, bias in reversed(folded):
            conv.weight, conv.bias = weight, bias
            setattr(container, name, bn)


class GroupStatistics:
    def __init__(self, groups: int):
        self.groups = groups
        self.mode = "collect"
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        grouped = x.unflatten(0, (self.groups, -1)).float()  # [K, n, C, ...]
        trailing = [1] * (x.dim() - 2)
        if self.mode == "collect":
            dims = (1, *range(3, grouped.dim()))
            count = grouped[0].numel() // grouped.shape[2]
            if count < 2:
                raise ValueError("BatchNorm recalibration needs at least 2 values per channel and candidate")
            mean, var = grouped.mean(dims), grouped.var(dims, unbiased=False)  # training mode normalises so
            self.stats[bn] = (mean, var * count / (count - 1))  # and keeps the unbiased variance
        else:
            mean, var = self.stats[bn]
        out = (grouped - mean.view(self.groups, 1, -1, *trailing)) * torch.rsqrt(
            var.view(self.groups, 1, -1, *trailing) + bn.eps)
        if bn.affine:
            out = out * bn.weight.float().view(-1, *trailing) + bn.bias.float().view(-1, *trailing)
        return out.to(x.dtype).flatten(0, 1)


@contextlib.contextmanager
def grouped_batchnorm(model: nn.Module, groups: int):
    """Within the block, every BatchNorm of `model` follows the returned GroupStatistics (set its
    `mode` to 'collect', then 'apply')."""
    state = GroupStatistics(groups)
    patched = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = (lambda bn: (lambda x: state.forward(bn, x)))(module)
            patched.append(module)
    try:
        yield state
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Replace every BatchNorm's running statistics by those of one pass over `images` under the model's
    current gates: the statistics that ranking with `--bn-recalibrate` normalised the candidate with
    (one row group of `grouped_batchnorm`), kept in the module so that an export carries them."""
    for name, bn in model.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is None:
            raise ValueError(f"BatchNorm {name!r} keeps no running statistics (track_running_stats=False): there is "
                             "nowhere to keep recalibrated ones")
    with grouped_batchnorm(model, 1) as statistics:
        model(images)
    for bn, (mean, var) in statistics.stats.items():
        bn.running_mean.copy_(mean[0])
        bn.running_var.copy_(var[0])


__all__ = ["BATCHNORM_2D", "GroupStatistics", "batchnorm_after_conv", "folded_batchnorm", "folded_into_conv",
           "grouped_batchnorm", "recalibrate_batchnorm"]
