"""Gated convolution and linear layers: the hybrid (weight x gate) variables of PGNAS.

A gated layer carries one learned drop logit per group of input channels (pgnas-method.md section 2)
and a posterior family, set for the whole network by `set_posterior`:

- ``concrete`` (default): the input channels are multiplied by concrete-dropout gates.
- ``gaussian``: Gaussian variational dropout (Kingma et al. 2015, Molchanov et al. 2017) with one
  log alpha per channel group. The drop logit IS log alpha: sigmoid(log alpha) = alpha / (1 + alpha)
  is the drop probability p of the equivalent Bernoulli dropout, so candidates, ranking and export
  read `p` the same way for both families.

Its gate mode is set for the whole network at once by `set_gates`:

- ``relaxed``: training. concrete: relaxed-Bernoulli gates per (example, channel) from the stream of
  (training step, gate-layer index), through `pgnas_fast.ops.gated_apply`. gaussian: the local
  reparameterization out = mu + sqrt(var + 1e-8) * eps with mu = layer(x, W), var = layer(x^2,
  alpha W^2) (alpha of W's input channel, log alpha clipped to [-8, 8]) and eps per output element
  from the stream (training step, gate-layer index) of Domain.GAUSSIAN, through
  `pgnas_fast.ops.gaussian_noise`.
- ``hard``: a candidate. One frozen 0/1 mask per input channel, the same for every example: from the
  stream of (candidate id, gate-layer index) and the learned p, or given explicitly. Both families.
- ``full``: every channel kept (the plain super-network; for gaussian, the mean mu).

The gate-layer index of a layer is its position among the gated layers of `model.modules()`.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .. import ops
from ..ops.dispatch import check_backend_name
from ..ops.streams import Domain, stream_id
from .conv import Conv2d


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


POSTERIORS = ("concrete", "gaussian")
# Molchanov et al. 2017 clip log alpha to [-8, 8] for stable training: beyond it p = sigmoid(8) =
# 0.9997 changes no candidate, while alpha W^2 would keep growing the noise.
LOG_ALPHA_LIMIT = 8.0


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def gate_precision(logits: torch.Tensor) -> torch.Tensor:
    """Drop logits in the precision of the gate math: float64 stays, any other dtype becomes float32."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def check_conv_input(conv: nn.Conv2d, x) -> None:
    """A 4-D [N, C, H, W] (or unbatched 3-D) tensor of conv.in_channels channels, else a ValueError that
    names them (as nn.Conv2d's; the gates would act on the wrong dim first)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(conv).__name__}: input must be a 4-D [N, C, H, W] (or unbatched 3-D [C, H, W]) "
                         f"tensor, got {got}")
    if x.shape[-3] != conv.in_channels:
        raise ValueError(f"{type(conv).__name__}: expected input{list(x.shape)} to have {conv.in_channels} channels "
                         f"(in_channels), but got {x.shape[-3]} channels instead")
    _check_data_dtype(conv, x)


def check_linear_input(linear: nn.Linear, x) -> None:
    """A tensor whose last dim is linear.in_features, else a ValueError that names it (folding the
    leading dims into rows would otherwise turn a wrong size into a wrong shape silently)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != linear.in_features:
        got = (f"{x.shape[-1]}" if x.dim() else "a scalar") if isinstance(x, torch.Tensor) else type(x).__name__
        shape = list(x.shape) if isinstance(x, torch.Tensor) else ""
        raise ValueError(f"{type(linear).__name__}: expected input{shape} to have {linear.in_features} features "
                         f"(in_features) in its last dim, got {got}")
    _check_data_dtype(linear, x)


def _check_data_dtype(layer: nn.Module, x: torch.Tensor) -> None:
    """A floating-point input the gate ops take, named for the layer (not only for the op's `x`)."""
    ops._check_tensor(f"{type(layer).__name__}: input", x, ops.DATA_DTYPES)


class GatedInput(nn.Module):
    """Mixin state of a gated layer: drop logits per channel group and the current gate mode."""

    def _init_gates(self, channels: int, gate_groups, p_init: float, tau: float, backend: str | None,
                    device=None, dtype=None) -> None:
        if not 0.0 < p_init < 1.0:
            raise ValueError(f"p_init must be in (0, 1), got {p_init}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if channels < 1:
            raise ValueError(f"{type(self).__name__}: a gated layer needs at least one input channel, got {channels}")
        sizes = _group_sizes(channels, gate_groups, type(self).__name__)
        self.gate_channels = channels
        self.tau = float(tau)
        self.backend = backend if backend is None else check_backend_name(backend)  # (not first at a call)
        # (the gate math's precision: float32, or float64 for a float64 layer, as gate_precision keeps it)
        precision = torch.float64 if dtype == torch.float64 else torch.float32
        self.p_logit = nn.Parameter(torch.full((len(sizes),), logit(p_init), dtype=precision, device=device))
        index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
        self.register_buffer("gate_group_index", index, persistent=False)
        # the posterior family (see set_posterior) is in the state dict too, as an index into POSTERIORS
        # (an int tensor, like BatchNorm's num_batches_tracked): it says what p_logit means, so a
        # Gaussian layer's state never loads as a concrete one
        self.register_buffer("posterior_index", torch.tensor(0, device=device))
        self.posterior = "concrete"
        self.gate_mode = "full"
        self.gate_seed = 0
        self.gate_stream = 0
        # rows of this process's batch start at this row of the global batch (data-parallel rank r: r * B),
        # so that every rank draws the random numbers the concatenated batch would give its rows
        self.gate_row_offset = 0
        self.gate_mask: torch.Tensor | None = None

    @property
    def posterior(self) -> str:
        return self._posterior

    @posterior.setter
    def posterior(self, family: str) -> None:
        self._posterior = family  # what the forward reads: no device sync
        self.posterior_index.fill_(POSTERIORS.index(family))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "posterior_index"
        if key in missing_keys:  # saved before the family was kept: the layer keeps its own
            missing_keys.remove(key)
        elif key in state_dict:
            index = int(self.posterior_index)
            if not 0 <= index < len(POSTERIORS):
                error_msgs.append(f"{key} must index a posterior family ({', '.join(POSTERIORS)}), got {index}")
            else:
                self._posterior = POSTERIORS[index]

    @property
    def gate_group_sizes(self) -> list[int]:
        return torch.bincount(self.gate_group_index, minlength=self.p_logit.shape[0]).tolist()

    def p_logit_per_channel(self) -> torch.Tensor:
        """Drop logits expanded from groups to input channels, [C_in], in float32 at least (the gate math's
        precision, also in a model cast to bfloat16 or float16)."""
        p_logit = gate_precision(self.p_logit)
        if p_logit.shape[0] == self.gate_channels:  # a group per channel: the parameter itself, whose fixed
            # address keeps the multi-tensor ops' cached launch tables valid (float32/64 logits: a model cast
            # to half precision makes a new float32 copy per call, and misses them)
            return p_logit
        if p_logit.shape[0] == 1:  # one group: a broadcast, whose gradient is a plain sum (Inductor's
            return p_logit.expand(self.gate_channels)  # CPU codegen fails on index_select's scatter into [1])
        return p_logit.index_select(0, self.gate_group_index)

    def log_alpha_per_channel(self) -> torch.Tensor:
        """The Gaussian family's log alpha per input channel, [C_in], clipped to +-LOG_ALPHA_LIMIT."""
        return self.p_logit_per_channel().clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def _as_trained(self, logits: torch.Tensor) -> torch.Tensor:
        """Drop logits as training reads them: the Gaussian family's log alpha clipped, else as they are."""
        return logits.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT) if self.posterior == "gaussian" else logits

    def drop_logit_per_channel(self) -> torch.Tensor:
        """logit(p) per input channel, [C_in], as training reads it. Candidates are sampled, and p
        reported, from these."""
        return self._as_trained(self.p_logit_per_channel())

    @property
    def p(self) -> torch.Tensor:
        """Drop probability per group (gaussian: alpha / (1 + alpha), alpha clipped as training reads it)."""
        return torch.sigmoid(self._as_trained(self.p_logit))

    @property
    def gaussian_relaxed(self) -> bool:
        """True when the forward is the Gaussian family's local reparameterization (else: gate, then layer)."""
        return self.posterior == "gaussian" and self.gate_mode == "relaxed"

    def weights_per_channel(self) -> int:
        """How many weights each input channel multiplies (grouped convs: only its group's outputs)."""
        return self.weight.numel() // self.gate_channels

    def gaussian_sample(self, mu: torch.Tensor, var: torch.Tensor, batch: int) -> torch.Tensor:
        """mu + sqrt(var + 1e-8) * eps; eps of the example rows from gate_row_offset on, so that every
        data-parallel rank draws what the concatenated batch would give its rows."""
        offset = self.gate_row_offset * (mu.numel() // max(batch, 1))
        return ops.gaussian_noise(mu, var, seed=self.gate_seed, stream=self.gate_stream, offset=offset,
                                  backend=self.backend)

    def gate(self, x: torch.Tensor, rows_per_example: int = 1) -> torch.Tensor:
        """x with its channels (dim 1) gated; `rows_per_example`: rows of x per example of the batch
        (a linear layer's [B, T, F] input folded to B * T rows), so that a data-parallel rank's gates
        start at its first example's first row."""
        if self.gate_mode == "relaxed":
            return ops.gated_apply(
                x, self.p_logit_per_channel(), seed=self.gate_seed, stream=self.gate_stream, tau=self.tau,
                mode="relaxed", offset=self.gate_row_offset * rows_per_example * self.gate_channels,
                backend=self.backend,
            )
        if self.gate_mode == "hard":
            mask = self.gate_mask.to(x.dtype)
            trailing = [1] * (x.dim() - 2)
            if mask.dim() == 1:
                return x * mask.view(1, -1, *trailing)
            # K candidates at once: the batch is K equal row groups, candidate-major
            k = mask.shape[0]
            if x.shape[0] % (k * max(rows_per_example, 1)):  # (an empty [B, 0, F] input: 0 rows per example)
                raise ValueError(f"{type(self).__name__}: set_gates gave masks of {k} candidates ([K, C_in]), so "
                                 f"the batch must be {k} equal row groups (a multiple of {k} examples), got "
                                 f"{x.shape[0] // rows_per_example} examples")
            return (x.unflatten(0, (k, -1)) * mask.view(k, 1, -1, *trailing)).flatten(0, 1)
        return x

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gate_groups={len(self.gate_group_sizes)}, tau={self.tau}, "
                f"posterior={self.posterior}")


class GatedConv2d(GatedInput, Conv2d):
    """nn.Conv2d whose input channels are gated (one drop logit per group of `gate_groups`); strided 1x1
    convs with few channels run as nn.conv.Conv2d says (a oneDNN defect on the CPU)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, gate_groups=None, p_init=0.1, tau=0.2,
                 backend=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device, dtype)
        self._init_gates(in_channels, gate_groups, p_init, tau, backend, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_conv_input(self, x)
        if x.dim() == 3:  # unbatched, as nn.Conv2d takes it: one example, one row of gates
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self.gaussian_relaxed:
            return self._gaussian_forward(x)
        return self._conv_forward(self.gate(x), self.weight, self.bias)

    def _gaussian_forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self._conv_forward(x, self.weight, self.bias)
        # weight [O, C_in / G, kh, kw]: output o of group g reads input channel g * C_in / G + j through
        # weight[o, j], so alpha [C_in] viewed [G, 1, C_in / G] and expanded over the O / G outputs lines up
        out_channels, per_group = self.weight.shape[:2]
        # (alpha in the weight's dtype: a model cast to bfloat16 convolves bfloat16 weights)
        alpha = self.log_alpha_per_channel().exp().to(self.weight.dtype).view(self.groups, 1, per_group)
        alpha = alpha.expand(-1, out_channels // self.groups, -1).reshape(out_channels, per_group, 1, 1)
        var = self._conv_forward(x * x, self.weight * self.weight * alpha, None)
        return self.gaussian_sample(mu, var, x.shape[0])


class GatedLinear(GatedInput, nn.Linear):
    """nn.Linear whose input features are gated (one drop logit per group of `gate_groups`)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, gate_groups=None, p_init=0.1,
                 tau=0.2, backend=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_gates(in_features, gate_groups, p_init, tau, backend, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input(self, x)
        # gates act on dim 1: fold any leading dims of [..., in_features] into the batch (one gate per row)
        flat = x.reshape(-1, self.in_features)
        batch = x.shape[0] if x.dim() > 1 else 1
        if self.gaussian_relaxed:
            mu = nn.functional.linear(flat, self.weight, self.bias)
            alpha = self.log_alpha_per_channel().exp().to(self.weight.dtype)
            var = nn.functional.linear(flat * flat, self.weight * self.weight * alpha)
            out = self.gaussian_sample(mu, var, batch)
        else:
            rows_per_example = math.prod(x.shape[1:-1])  # (also for an empty batch, B = 0)
            out = nn.functional.linear(self.gate(flat, rows_per_example), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)  # (-1 is ambiguous for an empty batch)


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

    def evaluation_module(self) -> nn.Module:
        """What `materialize` puts in this module's place: a module that computes its evaluation-mode
        forward. By default the module itself, kept as it is (its eval forward then runs in the
        materialized network); a module whose eval forward needs a pgnas_fast op returns a plain-torch
        equivalent (shake-shake: the mean of the branches; drop-path: the identity)."""
        return self


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
    candidates = list(candidates)
    odd = [c for c in candidates if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
    if odd:  # (as_tensor would truncate 1.9 to candidate 1)
        raise ValueError(f"candidate ids must be integers, got {odd[:5]}")
    layers = gated_layers(model)
    if not layers:
        raise ValueError("model has no gated layers (GatedConv2d, GatedLinear): it has no candidates")
    missing = [name for name, _ in layers if p_logits is not None and name not in p_logits]
    if missing:
        raise ValueError(f"p_logits has no entry for gated layers {missing}")
    masks = {}
    ids = torch.as_tensor(candidates, dtype=torch.int64)  # on the CPU: checked without a device sync
    with torch.no_grad():
        for index, (name, layer) in enumerate(layers):
            z = layer.drop_logit_per_channel() if p_logits is None else p_logits[name]
            masks[name] = ops.candidate_keep(z.detach().float(), ids, seed=seed, layer=index, domain=domain,
                                             backend=layer.backend)
    return masks


def kept_fraction(masks: Mapping[str, torch.Tensor]):
    """The kept fraction of the gated input channels: a float for one candidate's masks ({name: [C_in]}),
    a list for stacked ones ({name: [K, C_in]}); exact counts, a float64 ratio."""
    kept = sum(m.sum(-1) for m in masks.values())
    return (kept.double() / sum(m.shape[-1] for m in masks.values())).tolist()


def clip_log_alpha_(model: nn.Module) -> None:
    """Put every Gaussian-family drop logit (log alpha) back inside +-LOG_ALPHA_LIMIT, in place; call it
    after each optimizer step (the search does). The forward and the KL read log alpha clipped, whose
    gradient is zero outside the range: a logit that a step (momentum, a large lr) carried past the
    limit would otherwise never move again. Concrete-family logits are left as they are."""
    logits = [layer.p_logit for _, layer in gated_layers(model) if layer.posterior == "gaussian"]
    if logits:
        with torch.no_grad():  # two multi-tensor launches whatever the layer count (as torch's optimizers)
            torch._foreach_clamp_min_(logits, -LOG_ALPHA_LIMIT)
            torch._foreach_clamp_max_(logits, LOG_ALPHA_LIMIT)


def set_posterior(model: nn.Module, family: str) -> None:
    """Give every gated layer of `model` the posterior family `family` (one of POSTERIORS); the drop
    logits are kept as they are (for gaussian they are read as log alpha)."""
    if family not in POSTERIORS:
        raise ValueError(f"posterior family must be one of {', '.join(POSTERIORS)}; got {family!r}")
    layers = gated_layers(model)
    if not layers:
        raise ValueError("model has no gated layers")
    for _, layer in layers:
        layer.posterior = family


def posterior_of(model: nn.Module) -> str:
    """The posterior family of `model`'s gated layers; a ValueError if they mix families."""
    families = sorted({layer.posterior for _, layer in gated_layers(model)})
    if len(families) != 1:
        raise ValueError("model has no gated layers" if not families else
                         f"model mixes posterior families {families}; use set_posterior(model, family)")
    return families[0]


def check_masks(layers: list[tuple[str, GatedInput]], masks: Mapping[str, torch.Tensor], *, stacked: bool) -> None:
    """A keep mask for every gated layer (of `gated_layers`), [C_in] or, if `stacked`, [K, C_in] (K
    candidates at once); raises ValueError naming the layer. (Values are not read: no device sync.)"""
    missing = [name for name, _ in layers if name not in masks]
    if missing:
        raise ValueError(f"masks has no entry for gated layers {missing}")
    candidates = {}  # the K of each stacked mask (a [C_in] mask is every row's)
    for name, layer in layers:
        shape = tuple(masks[name].shape)
        if shape[-1:] != (layer.gate_channels,) or len(shape) > (2 if stacked else 1):
            raise ValueError(f"masks[{name!r}] must have shape [{layer.gate_channels}]"
                             + (f" or [K, {layer.gate_channels}] (K candidates at once)" if stacked else "")
                             + f", got {shape}")
        if len(shape) == 2:
            candidates[name] = shape[0]
    if len(set(candidates.values())) > 1:  # the layers would split a batch into different row groups
        raise ValueError(f"stacked masks must hold the same number of candidates K in every layer, got "
                         f"{', '.join(f'{k} in {name!r}' for name, k in candidates.items())}")


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
        set_step_streams(model, seed=seed, step=step, row_offset=row_offset)
    if mode == "hard":
        if (candidate is None) == (masks is None):
            raise ValueError("set_gates(mode='hard') needs exactly one of candidate= or masks=")
        if masks is None:
            masks = candidate_masks(model, seed, candidate)
        check_masks(layers, masks, stacked=True)  # every mask before switching any layer
    for index, (name, layer) in enumerate(layers):
        layer.gate_mode = mode
        layer.gate_mask = None
        if mode == "relaxed":
            domain = Domain.GAUSSIAN if layer.posterior == "gaussian" else Domain.TRAIN
            layer.gate_seed, layer.gate_stream = seed, stream_id(domain, step, index)
            layer.gate_row_offset = row_offset
        elif mode == "hard":
            layer.gate_mask = masks[name].to(layer.weight.device, torch.float32)


def set_step_streams(model: nn.Module, *, seed: int, step: int, row_offset: int = 0) -> None:
    """Hand every StochasticModule of `model` (shake-shake, drop-path) the random streams of training
    step `step`: set_gates(mode='relaxed') does it with the gates' streams; a candidate trained alone,
    its hard gates fixed (search/standalone.py), calls it alone. `row_offset` as for set_gates."""
    if isinstance(row_offset, bool) or not isinstance(row_offset, int) or row_offset < 0:
        raise ValueError(f"row_offset must be an int >= 0, got {row_offset!r}")
    for index, module in enumerate(_stochastic_modules(model)):
        module.rng_seed, module.rng_stream = seed, stream_id(module.rng_domain, step, index)
        module.rng_row_offset = row_offset


@contextlib.contextmanager
def training_modes_kept(model: nn.Module):
    """Within the block the model may be put in eval (or train) mode; afterwards every module has its own
    mode back (model.train(flag) would set one flag for all: a BatchNorm frozen in eval inside a training
    model would thaw)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def dynamic_streams():
    """Context for torch.compile of a training step: set_gates gives every stochastic module new int
    stream ids each step, and dynamo treats int attributes of modules as constants, so each step would
    compile anew. Inside this context the second step recompiles once with the ids symbolic and later
    steps reuse that graph. Ints of module globals are constants regardless: reach the model through
    an argument or a closure of the compiled function."""
    import torch._dynamo  # (not imported by `import torch`)

    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


def network_regularizer(model: nn.Module, *, weight_reg: float | None = None, drop_reg: float = 1.0, n_train: float,
                        backend: str | None = None) -> torch.Tensor:
    """The whole network's regulariser, the KL term of its posterior family, in one op call.

    concrete: R of pgnas-method.md section 2 (weight_reg: the L2 of the Gaussian weight prior;
    drop_reg: the entropy term). gaussian: the Molchanov KL over every weight, 1 / n_train *
    sum_l weights_per_channel_l * sum_c KL(log alpha_lc), log alpha clipped to +-LOG_ALPHA_LIMIT.
    The Gaussian family adds no L2 on the weights and ignores weight_reg and drop_reg: its prior is
    log-uniform, which is scale-invariant, so the KL depends on alpha alone (Kingma et al. 2015) and an
    L2 would be the Gaussian prior of the other family.
    """
    family = posterior_of(model)
    layers = [layer for _, layer in gated_layers(model)]
    if family == "gaussian":
        return ops.gaussian_kl([layer.log_alpha_per_channel() for layer in layers],
                               [layer.weights_per_channel() for layer in layers], n_train=n_train, backend=backend)
    if weight_reg is None:
        raise ValueError("network_regularizer: the concrete family needs weight_reg (l^2, the length-scale squared "
                         "of the weights' Gaussian prior; the presets' weight_reg)")
    return ops.regularizer(
        [layer.weight for layer in layers], [layer.p_logit_per_channel() for layer in layers],
        weight_reg=weight_reg, drop_reg=drop_reg, n_train=n_train, backend=backend,
    )
