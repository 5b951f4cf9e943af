"""The found architecture as a network: a physically smaller plain-torch module, and its export.

`materialize(model, masks)` copies the super-network in eval mode and replaces
- every gated conv/linear by one that gathers only its kept input channels and holds only their
  weights (`SlicedConv2d`, `SlicedLinear`; a grouped conv keeps its width and zeroes the dropped
  channels, `MaskedConv2d`; a layer that keeps nothing is deleted: `ZeroInput` returns its bias; one
  that keeps every channel becomes a plain conv / nn.Linear; the convs are nn.conv.Conv2d, an
  nn.Conv2d clear of a oneDNN defect in strided 1x1 convs on the CPU, which pruning makes more likely);
- every stochastic module by its `evaluation_module()` (shake-shake: the mean of the branches in
  plain torch ops; drop-path: identity; a module of another kind is kept as it is, in eval mode),
so the result equals the masked super-network in eval mode (outputs within float rounding), needs
no pgnas_fast op, and exports with torch.export to an artefact that plain torch loads.

Then the output channels of producers that no consumer reads are removed (through BatchNorm, ReLU
and depthwise convs, inside nn.Sequential runs or a module's declared `channel_chains`); what feeds
only a deleted layer goes (the run of a declared chain; in an nn.Sequential everything before it
whose effect on the map's size is known: convs, pools, channel-wise modules). A producer that
several layers read, each in its own forward (R-50's conv1 before the four branches), keeps its
channels even when every reader keeps nothing. Each eval-mode BatchNorm that directly follows a conv is
folded into it, and the modules a super-network names in `training_only_modules` (never run in
evaluation, e.g. an auxiliary head) are removed.

Export directory: `subnet.pt` (the materialized module, pickled; `load_subnet` reads it),
`model.pt2` (torch.export: `torch.export.load(path).module()` without pgnas_fast),
`architecture.json`, `config.json`, `export.json` (sizes before and after), and the run's `data.json`
when it read a --data-dir.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..nn import GatedConv2d, GatedLinear, StochasticModule, check_masks, gated_layers
from ..nn.batchnorm import BATCHNORM_2D, batchnorm_after_conv, folded_into_conv, shared_modules
from ..nn.combine import MeanCombine
from ..nn.conv import Conv2d


class SlicedConv2d(nn.Module):
    """A conv that reads only the kept input channels `index` of its input."""

    def __init__(self, conv: nn.Conv2d, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())
        self.conv = _holding(Conv2d(len(index), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    conv.dilation, 1, conv.bias is not None, conv.padding_mode, device="meta"),
                             conv.weight.index_select(1, index), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.index_select(-3, self.index))  # (-3: a batch of maps [N, C, H, W] or one [C, H, W])


class SlicedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())
        self.linear = _holding(nn.Linear(len(index), linear.out_features, linear.bias is not None, device="meta"),
                               linear.weight.index_select(1, index), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.index))


def _holding(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """`layer`, built on the meta device (no initialisation), given copies of `weight` and `bias`: their
    values, dtype and device, those of the super-network (materialize makes every weight contiguous at
    the end)."""
    layer.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def _plain_copy(layer: nn.Module) -> nn.Module:
    """A plain nn.Conv2d / nn.Linear with the gated layer's hyper-parameters and weights."""
    if isinstance(layer, GatedConv2d):
        plain = Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    return _holding(plain, layer.weight, layer.bias)


class ZeroInput(nn.Module):
    """A gated layer with every input channel dropped, deleted: its output for an all-zero input is
    its bias (or zeros), computed from the output shape alone."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.out_channels = layer.weight.shape[0]
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(self.out_channels)
        self.register_buffer("bias", bias.detach().clone())
        if self.is_conv:
            # the convs between the input and the output, in order: this layer's, and those of the
            # producers whose outputs only it read (absorbed by `_prune_producers`)
            self.geometries = [_geometry(layer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return self.bias.to(x.dtype).expand(*x.shape[:-1], self.out_channels)
        h, w = x.shape[-2], x.shape[-1]
        for (kh, kw), (sh, sw), (ph, pw), (dh, dw) in self.geometries:
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return self.bias.to(x.dtype).view(-1, 1, 1).expand(*x.shape[:-3], -1, h, w)  # (as the conv: [N,] C, H, W)


def _geometry(conv: nn.Module) -> tuple:
    """(kernel, stride, padding, dilation) of a conv (or of a sliced one's conv): its output's size."""
    conv = conv.conv if isinstance(conv, SlicedConv2d) else conv
    if conv.padding == "same":  # (nn.Conv2d allows it at stride 1 only) the input's size: a 1x1 conv's
        return (1, 1), (1, 1), (0, 0), (1, 1)
    return conv.kernel_size, conv.stride, (0, 0) if conv.padding == "valid" else conv.padding, conv.dilation


def _size_steps(module: nn.Module) -> list[tuple] | None:
    """The geometries (see _geometry) by which `module` changes a map's height and width, in order; None
    for a module whose effect on them is not known here."""
    if isinstance(module, (nn.Conv2d, SlicedConv2d)):
        return [_geometry(module)]
    if isinstance(module, (*_CHANNELWISE, Gather)):
        return []
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and not module.ceil_mode:
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        dilation = pair(getattr(module, "dilation", 1))
        return [(pair(module.kernel_size), pair(module.stride or module.kernel_size), pair(module.padding), dilation)]
    if isinstance(module, nn.Sequential):
        steps = [_size_steps(child) for child in module]
        return None if any(s is None for s in steps) else [g for s in steps for g in s]
    return None


class MaskedConv2d(nn.Module):
    """A grouped gated conv: slicing would regroup it, so its dropped channels are zeroed instead."""

    def __init__(self, layer: nn.Conv2d, mask: torch.Tensor):
        super().__init__()
        self.conv = _plain_copy(layer)
        self.register_buffer("mask", mask.view(-1, 1, 1).to(layer.weight).clone())  # [C, 1, 1]: batched or not

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * self.mask)


def _plain(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    """The plain-torch replacement of one gated layer with keep mask `mask`."""
    index = torch.nonzero(mask).flatten().to(layer.weight.device)
    if len(index) == 0:
        return ZeroInput(layer)
    if len(index) == len(mask):  # every channel kept: the layer as it is (gathering them all would copy its input)
        return _plain_copy(layer)
    if isinstance(layer, GatedConv2d):
        return SlicedConv2d(layer, index) if layer.groups == 1 else MaskedConv2d(layer, mask)
    return SlicedLinear(layer, index)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class Gather(nn.Module):
    """Keeps input channels `index`: a sliced consumer's gather moved in front of channel-wise work."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-3, self.index)


# the super-network's plain convs, and those materialize makes of gated ones (not a GatedConv2d: it is gated)
PLAIN_CONVS = (nn.Conv2d, Conv2d)
# the modules that act per channel of an NCHW map
_CHANNELWISE = (*BATCHNORM_2D, nn.ReLU, nn.Identity)


def _is_depthwise(m: nn.Module) -> bool:
    return type(m) in PLAIN_CONVS and m.groups == m.in_channels == m.out_channels


def _chains(container: nn.Module) -> list[list[str]]:
    """Runs of children [producer or None, channel-wise..., sliced consumer] whose channels flow only
    from one to the next: inside an nn.Sequential, or named by a module's `channel_chains`."""
    found = [list(chain) for chain in getattr(container, "channel_chains", ())
             if _consumer(getattr(container, chain[-1])) and _producer(getattr(container, chain[0]))]
    if isinstance(container, nn.Sequential):
        names = [name for name, _ in container.named_children()]
        children = list(container.children())
        for j, consumer in enumerate(children):
            if not _consumer(consumer):
                continue
            i = j - 1
            while i >= 0 and (isinstance(children[i], _CHANNELWISE) or _is_depthwise(children[i])):
                i -= 1
            found.append(([names[i]] if i >= 0 and _producer(children[i]) else [None]) + names[i + 1:j + 1])
    return found


def _consumer(module: nn.Module) -> bool:
    """A layer that reads only some input channels: a sliced conv, or a deleted one (reads none)."""
    return isinstance(module, SlicedConv2d) or (isinstance(module, ZeroInput) and module.is_conv)


def _producer(module: nn.Module) -> bool:
    """A module whose output channels can be sliced: a sliced or plain ungrouped conv."""
    return isinstance(module, SlicedConv2d) or (type(module) in PLAIN_CONVS and module.groups == 1)


def _slice_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep output channels `index` of a conv, a depthwise conv (and its inputs) or a BatchNorm."""
    conv = module.conv if isinstance(module, SlicedConv2d) else module
    if isinstance(conv, nn.Conv2d):
        conv.weight = nn.Parameter(conv.weight.index_select(0, index))
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.index_select(0, index))
        conv.out_channels = len(index)
        if _is_depthwise(module) or conv.groups > 1:
            conv.in_channels = conv.groups = len(index)
    elif isinstance(module, BATCHNORM_2D):
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                setattr(module, name, nn.Parameter(getattr(module, name).index_select(0, index)))
        if module.running_mean is not None:  # (none kept: track_running_stats=False)
            module.running_mean = module.running_mean.index_select(0, index)
            module.running_var = module.running_var.index_select(0, index)
        module.num_features = len(index)


def _prune_producers(subnet: nn.Module) -> None:
    """Remove the output channels that a sliced consumer never reads from the modules feeding it, and
    the modules whose outputs only a deleted layer (ZeroInput) read; not along a run that holds a module
    held in another place too (slicing it for one would change the other)."""
    shared = shared_modules(subnet)
    for container in list(subnet.modules()):
        for head, *middle, tail in _chains(container):
            if any(getattr(container, name) in shared for name in (head, *middle, tail) if name is not None):
                continue
            consumer = getattr(container, tail)
            if head is None and not middle and not isinstance(consumer, ZeroInput):
                continue  # nothing between the consumer and its input: its own gather stays
            run = ([head] if head is not None else []) + middle
            if isinstance(consumer, ZeroInput):  # nobody reads the run: it goes, its convs' sizes stay
                if isinstance(container, nn.Sequential):  # and so does all that comes before it there
                    names = [name for name, _ in container.named_children()]
                    start = names.index(tail)
                    while start > 0 and _size_steps(getattr(container, names[start - 1])) is not None:
                        start -= 1
                    run = names[start:names.index(tail)]
                consumer.geometries = [g for name in run for g in _size_steps(getattr(container, name))] \
                    + consumer.geometries
                for name in run:
                    setattr(container, name, nn.Identity())
                continue
            index = consumer.index
            for name in run:
                _slice_outputs(getattr(container, name), index)
            if head is None:  # no producer in this run: gather at its start instead
                setattr(container, middle[0], nn.Sequential(Gather(index), getattr(container, middle[0])))
            setattr(container, tail, getattr(container, tail).conv)


def _fold_batchnorm(subnet: nn.Module) -> None:
    """Fold each eval-mode BatchNorm that directly follows a conv in an nn.Sequential into that conv
    (the arithmetic of every evaluation pass: nn.batchnorm.folded_batchnorm)."""
    pairs = batchnorm_after_conv(subnet, conv_of=lambda m: m.conv if isinstance(m, SlicedConv2d) else m)
    for container, conv, bn_name, bn in list(pairs):
        weight, bias = folded_into_conv(conv, bn)
        conv.weight, conv.bias = nn.Parameter(weight), nn.Parameter(bias)
        setattr(container, bn_name, nn.Identity())


@torch.no_grad()
def materialize(model: nn.Module, masks: Mapping[str, torch.Tensor], *, fold_batchnorm: bool = True) -> nn.Module:
    """A plain-torch copy of `model` in eval mode that computes the candidate `masks` names: dropped
    input channels sliced out, the producers' channels nobody reads removed, BatchNorm folded."""
    layers = gated_layers(model)
    check_masks(layers, masks, stacked=False)
    for name, mask in masks.items():
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"masks[{name!r}] must hold only 0 (dropped) and 1 (kept)")
    unknown = [f"{name or '(the model itself)'}: {type(layer).__name__}" for name, layer in layers
               if not isinstance(layer, (GatedConv2d, GatedLinear))]
    if unknown:
        raise TypeError(f"materialize knows how to slice GatedConv2d and GatedLinear layers (and their subclasses), "
                        f"not the gated layers {unknown}")
    subnet = copy.deepcopy(model).eval()
    if isinstance(subnet, (GatedConv2d, GatedLinear)):  # the model is one gated layer: its plain layer is the whole
        return _plain(subnet, masks[""]).eval()
    # a module held under two names is replaced under both, by one replacement (its first name's mask)
    plain = {layer: _plain(layer, masks[name]) for name, layer in gated_layers(subnet)}
    for module in list(subnet.modules()):
        for name in getattr(module, "training_only_modules", ()):  # e.g. ENAS's auxiliary head
            setattr(module, name, None)
    for name, module in list(subnet.named_modules(remove_duplicate=False)):
        if module in plain:
            _replace(subnet, name, plain[module])
        elif isinstance(module, StochasticModule) and name:
            _replace(subnet, name, plain.setdefault(module, module.evaluation_module()))
    _prune_producers(subnet)
    if fold_batchnorm:
        _fold_batchnorm(subnet)
    # one layout for every weight: slicing and folding made new contiguous tensors, and a weight left in
    # the run's evaluation layout (channels_last, e.g. an ungated stem) would be the odd one out (and
    # torch.export.save warns about each non-contiguous one)
    for param in subnet.parameters():
        param.data = param.data.contiguous()
    return subnet.eval()


def materialize_all_channels(model: nn.Module) -> nn.Module:
    """The super-network materialized with every channel kept: the baseline a candidate's size is
    measured against (without the drop logits and training-only heads, BatchNorm folded the same way)."""
    return materialize(model, {name: torch.ones(layer.gate_channels, device=layer.p_logit.device)
                               for name, layer in gated_layers(model)})


def load_subnet(directory: str | Path, map_location="cpu") -> nn.Module:
    """The materialized network of an export directory (written by `pgnas-fast export`)."""
    path = Path(directory) / "subnet.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not an export directory: subnet.pt is missing")
    return torch.load(path, map_location=map_location, weights_only=False).eval()


__all__ = ["MaskedConv2d", "MeanCombine", "SlicedConv2d", "SlicedLinear", "ZeroInput", "load_subnet", "materialize",
           "materialize_all_channels"]
