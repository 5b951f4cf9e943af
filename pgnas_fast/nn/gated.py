"""Gated convolution and linear layers: the hybrid (weight x gate) variables of PGNAS.

A gated layer multiplies its input channels by concrete-dropout gates before the conv/linear, with
one learned drop logit per channel group (pgnas-method.md section 2). Its gate mode is set for the
whole network at once by `set_gates`:

- ``relaxed``: training. Relaxed-Bernoulli gates per (example, channel) from the stream of
  (training step, gate-layer index), through `pgnas_fast.ops.gated_apply`.
- ``hard``: a candidate. One frozen 0/1 mask per input channel, the same for every example: from the
  stream of (candidate id, gate-layer index) and the learned p, or given explicitly.
- ``full``: every channel kept (the plain super-network).

The gate-layer index of a layer is its position among the gated layers of `model.modules()`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .. import ops
from ..ops.streams import Domain, stream_id


def _group_sizes(channels: int, gate_groups: Sequence[int] | int | None, where: str) -> list[int]:
    """Channel-group sizes: None = one group; an int g = groups of g channels (last one shorter)."""
    if gate_groups is None:
        return [channels]
    if isinstance(gate_groups, bool):
        raise ValueError(f"{where}: gate_groups must be None, channels per group or a list of sizes, got {gate_groups}")
    if isinstance(gate_groups, int):
        if gate_groups < 1:
            raise ValueError(f"{where}: gate_groups must be >= 1 channels per group, got {gate_groups}")
        return [min(gate_groups, channels - start) for start in range(0, channels, gate_groups)]
    sizes = [int(s) for s in gate_groups]
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != channels:
        raise ValueError(f"{where}: gate_groups must be positive sizes summing to {channels}, got {list(gate_groups)}")
    return sizes


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class GatedInput(nn.Module):
    """Mixin state of a gated layer: drop logits per channel group and the current gate mode."""

    def _init_gates(self, channels: int, gate_groups, p_init: float, tau: float, backend: str | None) -> None:
        if not 0.0 < p_init < 1.0:
            raise ValueError(f"p_init must be in (0, 1), got {p_init}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        sizes = _group_sizes(channels, gate_groups, type(self).__name__)
        self.gate_channels = channels
        self.tau = float(tau)
        self.backend = backend
        self.p_logit = nn.Parameter(torch.full((len(sizes),), logit(p_init), dtype=torch.float32))
        index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.register_buffer("gate_group_index", index, persistent=False)
        self.gate_mode = "full"
        self.gate_seed = 0
        self.gate_stream = 0
        # rows of this process's batch start at this row of the global batch (data-parallel rank r: r * B),
        # so that every rank draws the random numbers the concatenated batch would give its rows
        self.gate_row_offset = 0
        self.gate_mask: torch.Tensor | None = None

    @property
    def gate_group_sizes(self) -> list[int]:
        return torch.bincount(self.gate_group_index, minlength=self.p_logit.shape[0]).tolist()

    def p_logit_per_channel(self) -> torch.Tensor:
        """Drop logits expanded from groups to input channels, [C_in]."""
        return self.p_logit.index_select(0, self.gate_group_index)

    @property
    def p(self) -> torch.Tensor:
        """Drop probability per group."""
        return torch.sigmoid(self.p_logit)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_mode == "relaxed":
            return ops.gated_apply(
                x, self.p_logit_per_channel(), seed=self.gate_seed, stream=self.gate_stream,
                tau=self.tau, mode="relaxed", offset=self.gate_row_offset * self.gate_channels, backend=self.backend,
            )
        if self.gate_mode == "hard":
            mask = self.gate_mask.to(x.dtype)
            trailing = [1] * (x.dim() - 2)
            if mask.dim() == 1:
                return x * mask.view(1, -1, *trailing)
            # K candidates at once: the batch is K equal row groups, candidate-major
            k = mask.shape[0]
            return (x.unflatten(0, (k, -1)) * mask.view(k, 1, -1, *trailing)).flatten(0, 1)
        return x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate_groups={len(self.gate_group_sizes)}, tau={self.tau}"


class GatedConv2d(GatedInput, nn.Conv2d):
    """nn.Conv2d whose input channels are gated (one drop logit per group of `gate_groups`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, *, gate_groups=None, p_init=0.1, tau=0.2, backend=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._init_gates(in_channels, gate_groups, p_init, tau, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.gate(x), self.weight, self.bias)


class GatedLinear(GatedInput, nn.Linear):
    """nn.Linear whose input features are gated (one drop logit per group of `gate_groups`)."""

    def __init__(self, in_features, out_features, bias=True, *, gate_groups=None, p_init=0.1, tau=0.2, backend=None):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_gates(in_features, gate_groups, p_init, tau, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gates act on dim 1: fold any leading dims of [..., in_features] into the batch (one gate per row)
        flat = x.reshape(-1, self.in_features)
        return nn.functional.linear(self.gate(flat), self.weight, self.bias).view(*x.shape[:-1], -1)


class StochasticModule(nn.Module):
    """A module other than a gate whose training noise comes from the RNG contract (e.g. shake-shake).

    `set_gates` hands it (seed, stream) for each training step, so one seed reproduces a run, and
    `rng_row_offset`, the global row of this process's first example: a module whose numbers are per
    example draws those of its rows of the concatenated batch (data parallel), as the gates do.
    """

    rng_domain: Domain
    rng_seed: int = 0
    rng_stream: int | None = None
    rng_row_offset: int = 0


def gated_layers(model: nn.Module) -> list[tuple[str, GatedInput]]:
    """(qualified name, layer) of every gated layer, in gate-layer-index order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GatedInput)]


def _stochastic_modules(model: nn.Module) -> Iterator[StochasticModule]:
    return (m for m in model.modules() if isinstance(m, StochasticModule))


def candidate_masks(model: nn.Module, seed: int, candidate: int, *, domain: Domain = Domain.CANDIDATE,
                    p_logits: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Hard keep masks {layer name: float32 [C_in]} of candidate `candidate` of a search with `seed`.

    A candidate is one uniform per input channel of every gated layer, drawn from stream
    (candidate id, gate-layer index); a channel is dropped iff u + p >= 1. `p_logits` replaces the
    learned per-channel logits (e.g. the random-sampling baseline's uniform p).
    """
    stacked = stacked_candidate_masks(model, seed, [candidate], domain=domain, p_logits=p_logits)
    return {name: mask[0] for name, mask in stacked.items()}


def stacked_candidate_masks(model: nn.Module, seed: int, candidates: Sequence[int], *,
                            domain: Domain = Domain.CANDIDATE,
                            p_logits: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks of several candidates, {layer name: [K, C_in]}, for batched evaluation: with these set,
    a batch of K equal row groups runs candidate k on group k. Row k is what gate_keep(mode="hard")
    draws from stream (candidates[k], gate-layer index): see ops.candidate_keep."""
    masks = {}
    with torch.no_grad():
        for index, (name, layer) in enumerate(gated_layers(model)):
            z = layer.p_logit_per_channel() if p_logits is None else p_logits[name]
            ids = torch.as_tensor(list(candidates), dtype=torch.int64, device=z.device)
            masks[name] = ops.candidate_keep(z.detach().float(), ids, seed=seed, layer=index, domain=domain,
                                             backend=layer.backend)
    return masks


def set_gates(model: nn.Module, mode: str, *, seed: int = 0, step: int | None = None, row_offset: int = 0,
              candidate: int | None = None, masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Put every gated layer of `model` into one gate mode.

    relaxed: needs `step` (the training step; with `seed` it names the random streams, which also
    drive StochasticModules such as shake-shake); `row_offset` is the global row of this process's
    first example (data parallel: rank * local batch). hard: needs `candidate` (masks drawn from the
    learned p, see candidate_masks) or explicit `masks` ([C_in] each, or [K, C_in] to run K
    candidates on K equal row groups of every batch). full: no arguments.
    """
    if mode not in ops.GATE_MODES:
        raise ValueError(f"mode must be one of {', '.join(ops.GATE_MODES)}; got {mode!r}")
    layers = gated_layers(model)
    if mode == "relaxed":
        if step is None:
            raise ValueError("set_gates(mode='relaxed') needs step=")
        if isinstance(row_offset, bool) or not isinstance(row_offset, int) or row_offset < 0:
            raise ValueError(f"row_offset must be an int >= 0, got {row_offset!r}")
        for index, module in enumerate(_stochastic_modules(model)):
            module.rng_seed, module.rng_stream = seed, stream_id(module.rng_domain, step, index)
            module.rng_row_offset = row_offset
    if mode == "hard":
        if (candidate is None) == (masks is None):
            raise ValueError("set_gates(mode='hard') needs exactly one of candidate= or masks=")
        if masks is None:
            masks = candidate_masks(model, seed, candidate)
        missing = [name for name, _ in layers if name not in masks]
        if missing:
            raise ValueError(f"masks has no entry for gated layers {missing}")
        for name, layer in layers:  # check every mask before switching any layer
            shape = tuple(masks[name].shape)
            if shape[-1:] != (layer.gate_channels,) or len(shape) > 2:
                raise ValueError(f"masks[{name!r}] must have shape [{layer.gate_channels}] or "
                                 f"[K, {layer.gate_channels}] (K candidates at once), got {shape}")
    for index, (name, layer) in enumerate(layers):
        layer.gate_mode = mode
        layer.gate_mask = None
        if mode == "relaxed":
            layer.gate_seed, layer.gate_stream = seed, stream_id(Domain.TRAIN, step, index)
            layer.gate_row_offset = row_offset
        elif mode == "hard":
            layer.gate_mask = masks[name].to(layer.weight.device, torch.float32)


def network_regularizer(model: nn.Module, *, weight_reg: float, drop_reg: float = 1.0, n_train: float,
                        backend: str | None = None) -> torch.Tensor:
    """The whole network's regulariser R (pgnas-method.md section 2) in one op call."""
    layers = [layer for _, layer in gated_layers(model)]
    if not layers:
        raise ValueError("model has no gated layers")
    return ops.regularizer(
        [layer.weight for layer in layers], [layer.p_logit_per_channel() for layer in layers],
        weight_reg=weight_reg, drop_reg=drop_reg, n_train=n_train, backend=backend,
    )
