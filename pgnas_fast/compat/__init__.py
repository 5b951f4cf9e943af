"""Drop-in replacements for the authors' `NAS_utils/ops.py` layers, running on the pgnas_fast op set.

`Conv2d_with_CD` and `Linear_with_CD` keep the authors' constructor signatures, defaults, subclassing,
state-dict keys and shapes, properties (`KLreg`, `p`) and forward values (pgnas-method.md section 2),
so existing PGNAS code and checkpoints work unchanged. Differences, all deliberate:

- Devices: the authors hard-code `.cuda()`; these run wherever their input is.
- Noise: one uniform per gate through the Philox contract (logistic noise log u - log(1 - u), same
  law as the authors' difference of two Gumbels) and p's logit used exactly (the authors add 1e-8
  inside the logs). The seed of each call comes from torch's default CPU generator, so
  `torch.manual_seed` reproduces a run.
- `KLreg` computes H'(p) from the logit (no NaN at p = 0 or 1) and is right for grouped convs.
- `Linear_with_CD` works without `split_pattern`. Its `KLreg` reproduces the VALUE of the authors'
  broadcasting bug by default, in closed form: in_features * weight_reg * sum_a (1 - p_a) * ||W||^2
  + drop_reg * sum_a H'(p_a), so losses match theirs; `kl_formula="intended"` gives
  weight_reg * sum_{o,c} (1 - p_c) W[o,c]^2 + drop_reg * sum_c H'(p_c).
- `debug=True` prints the p_logit gradient of every layer (the authors: convs with 64 inputs only).
- `Linear_with_CD` ignores `deterministic`, like the authors' (always relaxed gates).
- An unbatched [C, H, W] input gives [O, H, W], as nn.Conv2d does (the authors': [1, O, H, W]).
- A `backend=` that names no backend is refused at construction.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..nn.conv import Conv2d
from ..nn.gated import check_conv_input, check_linear_input, gate_precision, logit
from ..ops import FLOAT32_MAX
from ..ops.dispatch import check_backend_name
from ..ops.streams import Domain, stream_id
from ..supernets import check_sizes

TRAINING_SIZE = 1281167.0
TEMPERATURE = 0.2  # the authors' 1 / 5
_COMPAT_STREAM = stream_id(Domain.COMPAT, 0)
_warned_zero_noise = False


def _real(name: str, value, where: str) -> float:
    """A real number (python, numpy or 0-dim tensor; not a bool) as a float, or a TypeError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _p_init_logit(p_init, where: str = "Conv2d_with_CD") -> float:
    p_init = _real("p_init", p_init, where)
    if not 0.0 < p_init < 1.0:
        raise ValueError(f"{where}: p_init must be in (0, 1), got {p_init}")
    return logit(p_init)


def _check_regs(weight_reg, drop_reg, where: str) -> tuple[float, float]:
    out = []
    for name, value in (("weight_reg", weight_reg), ("drop_reg", drop_reg)):
        number = _real(name, value, where)
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
        if number / TRAINING_SIZE > FLOAT32_MAX:  # (the layer's coefficient is value / TRAINING_SIZE, in float32)
            raise ValueError(f"{where}: {name} must be <= {FLOAT32_MAX * TRAINING_SIZE:.6g} (float32's largest times "
                             f"the authors' N = {TRAINING_SIZE:.0f}), got {value!r}")
        out.append(number)
    return out[0], out[1]


def _has_pattern(split_pattern) -> bool:
    """The authors test `if split_pattern:`; len() also takes a numpy array, whose truth is ambiguous."""
    return split_pattern is not None and len(split_pattern) > 0


def _is_channel_count(n) -> bool:
    """A whole number >= 1 (python, numpy or 0-dim tensor; not a bool, nor a string of digits)."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Real, torch.Tensor)):
        return False
    try:
        value = float(n)
    except (TypeError, ValueError, RuntimeError):
        return False
    return value.is_integer() and value >= 1


def _check_split(split: int, split_pattern, channels: int, where: str) -> int:
    """`split` as an int (numpy integers too, as the authors' code takes them), checked with its pattern."""
    if isinstance(split, bool) or not isinstance(split, numbers.Integral) or split < 1:
        raise ValueError(f"{where}: split must be an int >= 1, got {split!r}")
    split = int(split)
    if split_pattern is not None and not hasattr(split_pattern, "__len__"):
        raise ValueError(f"{where}: split_pattern must be a list of channel counts (or None), got "
                         f"{type(split_pattern).__name__} {split_pattern!r}")
    if _has_pattern(split_pattern):
        if not all(_is_channel_count(n) for n in split_pattern):
            raise ValueError(f"{where}: split_pattern must hold channel counts (ints >= 1), got {list(split_pattern)}")
        if len(split_pattern) != split or sum(split_pattern) != channels:
            raise ValueError(
                f"{where}: split_pattern must have split={split} entries summing to {channels}, "
                f"got {list(split_pattern)}"
            )
    elif split != 1:
        raise ValueError(f"{where}: split={split} needs a split_pattern")
    return split


@torch.compiler.disable  # one clean graph break per call, without dynamo's Tensor.item() warnings
def _fresh_seed() -> int:
    """A per-call seed from torch's default CPU generator (no device sync)."""
    ops.check_not_traced()  # (relaxed gates; before torch.export fails on the int below)
    return int(torch.empty((), dtype=torch.int64).random_(0, 1 << 62))


def _neg_entropy_sum(p_logit: torch.Tensor, drop_reg: float, backend=None) -> torch.Tensor:
    """drop_reg * sum_c H'(p_c) through the op set (its weight term switched off)."""
    no_weight = p_logit.detach().new_zeros(1, p_logit.shape[0])  # a [1, C] "linear" weight of zeros
    return ops.regularizer([no_weight], [p_logit], weight_reg=0.0, drop_reg=drop_reg, n_train=1.0, backend=backend)


class Conv2d_with_CD(Conv2d):  # noqa: N801 (the authors' name)
    """nn.Conv2d with concrete dropout on its input channels; the authors' signature and state dict. A
    subclass of nn.Conv2d, as theirs, through nn.conv.Conv2d (clear of a oneDNN defect in strided 1x1 convs
    on the CPU)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, weight_reg=10.0, drop_reg=1.0, p_init=1e-1, deterministic=True, debug=False,
                 split=1, split_pattern=None, *, backend=None):
        # (before nn.Conv2d sees them: a negative size fails there as "negative dimension", a zero one later
        # inside the regulariser)
        check_sizes("Conv2d_with_CD", in_channels=in_channels, out_channels=out_channels)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        split = _check_split(split, split_pattern, in_channels, "Conv2d_with_CD")
        weight_reg, drop_reg = _check_regs(weight_reg, drop_reg, "Conv2d_with_CD")
        self._weight_reg = weight_reg / TRAINING_SIZE
        self._drop_reg = drop_reg / TRAINING_SIZE
        self._deterministic = deterministic
        self._det_mode = deterministic  # the authors' conv keeps both names
        self._p_init = p_init
        self._eps = 1e-8  # the authors' log epsilon (unused: the logit is used exactly)
        self._noise_shape = (in_channels, 1, 1)
        # like pgnas_fast.nn's modules: None follows use_backend / set_backend / auto
        self.backend = backend if backend is None else check_backend_name(backend)
        self._debug_mode = debug
        self._temp = TEMPERATURE
        self.split = split
        self.split_pattern = split_pattern  # may be a caller's shared list: read entries 0 and 1 only
        self.p_logit = nn.Parameter(torch.full((split,), _p_init_logit(p_init, "Conv2d_with_CD")))
        if deterministic:
            self.unif_noise_variable = nn.Parameter(torch.zeros(1, in_channels, 1, 1), requires_grad=False)
            global _warned_zero_noise
            if not _warned_zero_noise:
                _warned_zero_noise = True
                warnings.warn(
                    "Conv2d_with_CD(deterministic=True) starts with unif_noise_variable = 0, which keeps "
                    "every channel (the full network, no dropout) until a candidate's noise is loaded into it",
                    stacklevel=2,
                )
        if debug:
            self.p_logit.register_hook(lambda grad: print(f"Conv2d_with_CD p_logit grad: {grad}"))

    def _p_logit_per_channel(self) -> torch.Tensor:
        """Split expansion: group 0 covers split_pattern[0] channels, later groups split_pattern[1]."""
        if not _has_pattern(self.split_pattern):
            return self.p_logit[:1].expand(self.in_channels)
        first, rest = int(self.split_pattern[0]), int(self.split_pattern[1]) if self.split > 1 else 0
        if first + (self.split - 1) * rest != self.in_channels:
            raise ValueError(
                f"split_pattern expands to {first} + {self.split - 1} x {rest} channels, "
                f"but in_channels = {self.in_channels}"
            )
        z = self.p_logit[:1].expand(first)
        if self.split > 1:
            z = torch.cat((z, self.p_logit[1:].repeat_interleave(rest)))
        return z

    def _concrete_dropout(self, x: torch.Tensor) -> torch.Tensor:
        z = self._p_logit_per_channel()
        if self._deterministic:
            # drop iff u + p >= 1 (the authors' floor(u + p)) with the loaded noise u
            p = torch.sigmoid(z).view(1, -1, 1, 1)
            keep = (self.unif_noise_variable + p < 1.0).to(x.dtype)
            # floor's gradient: zero, not none (momentum and hooks see p_logit, as the authors'); not in a
            # trace, which is for inference (torch.jit.trace's check runs it again without grad)
            if torch.is_grad_enabled() and p.requires_grad and not torch.jit.is_tracing():
                keep = keep + (0.0 * (p - p.detach())).to(x.dtype)
            return x * keep
        return ops.gated_apply(x, gate_precision(z), seed=_fresh_seed(), stream=_COMPAT_STREAM, tau=self._temp,
                               backend=self.backend)

    def forward(self, input):  # noqa: A002 (nn.Conv2d's argument name)
        check_conv_input(self, input)
        if input.dim() == 3:  # unbatched, like nn.Conv2d: one row of gates
            return self.forward(input.unsqueeze(0)).squeeze(0)
        return self._conv_forward(self._concrete_dropout(input), self.weight, self.bias)

    @property
    def unif_noise_var(self) -> torch.Tensor:
        """The authors' second name for unif_noise_variable's storage (their code writes a candidate's
        noise through either); deterministic layers only."""
        return self.unif_noise_variable.data

    @unif_noise_var.setter
    def unif_noise_var(self, noise: torch.Tensor) -> None:
        """Assigning a candidate's noise copies it in (the authors' attribute could be rebound)."""
        if not isinstance(noise, torch.Tensor) or noise.shape != self.unif_noise_variable.shape:
            got = f"shape {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"Conv2d_with_CD: unif_noise_var must be a tensor of shape "
                             f"{tuple(self.unif_noise_variable.shape)}, got {got}")
        self.unif_noise_variable.data.copy_(noise)

    @property
    def KLreg(self) -> torch.Tensor:  # noqa: N802
        return ops.regularizer([self.weight], [gate_precision(self._p_logit_per_channel())],
                               weight_reg=self._weight_reg, drop_reg=self._drop_reg, n_train=1.0, backend=self.backend)

    @property
    def p(self) -> torch.Tensor:
        return self.p_logit.sigmoid()


class Linear_with_CD(nn.Linear):  # noqa: N801 (the authors' name)
    """nn.Linear with concrete dropout on its input features (one p each); the authors' signature."""

    def __init__(self, in_features, out_features, bias=True, weight_reg=10.0, drop_reg=1.0, p_init=1e-1,
                 deterministic=False, debug=False, split=1, split_pattern=None, *, kl_formula="authors",
                 backend=None):
        check_sizes("Linear_with_CD", in_features=in_features, out_features=out_features)
        super().__init__(in_features, out_features, bias)
        split = _check_split(split, split_pattern, in_features, "Linear_with_CD")
        weight_reg, drop_reg = _check_regs(weight_reg, drop_reg, "Linear_with_CD")
        if kl_formula not in ("authors", "intended"):
            raise ValueError(f"kl_formula must be 'authors' or 'intended', got {kl_formula!r}")
        self._weight_reg = weight_reg / TRAINING_SIZE
        self._drop_reg = drop_reg / TRAINING_SIZE
        self._det_mode = deterministic  # accepted and unused, as in the authors' code
        self._debug_mode = debug
        self._temp = TEMPERATURE
        self.kl_formula = kl_formula
        self.backend = backend if backend is None else check_backend_name(backend)
        self.split = split
        self.split_pattern = split_pattern
        self._p_init = p_init
        self._eps = 1e-8
        self._noise_shape = (in_features,)
        self.p_logit = nn.Parameter(torch.full((in_features,), _p_init_logit(p_init, "Linear_with_CD")))
        if debug:
            self.p_logit.register_hook(lambda grad: print(f"Linear_with_CD p_logit grad: {grad}"))

    def _concrete_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gated_apply(x, gate_precision(self.p_logit), seed=_fresh_seed(), stream=_COMPAT_STREAM,
                               tau=self._temp, backend=self.backend)

    def forward(self, input):  # noqa: A002
        check_linear_input(self, input)
        # gated_apply gates dim 1: fold any leading dims of [..., in_features] into the batch
        lead = input.shape[:-1]
        flat = input.reshape(math.prod(lead), self.in_features)
        return F.linear(self._concrete_dropout(flat), self.weight, self.bias).view(*lead, self.out_features)

    @property
    def KLreg(self) -> torch.Tensor:  # noqa: N802
        z = gate_precision(self.p_logit)
        if self.kl_formula == "intended":
            return ops.regularizer([self.weight], [z], weight_reg=self._weight_reg, drop_reg=self._drop_reg,
                                   n_train=1.0, backend=self.backend)
        # authors: sum((W^2 [out, in]) * (1 - p).view(1, in, 1, 1)) broadcasts to [1, in, out, in], giving
        # sum_a (1 - p_a) * ||W||^2, and the scalar is then summed once per input feature
        # (||W||^2 in float32 at least: a float16 layer's sum overflows past 65504)
        squares = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)).square().sum()
        weight_term = self.in_features * self._weight_reg * torch.sigmoid(-z).sum() * squares
        return weight_term + _neg_entropy_sum(z, self._drop_reg, self.backend)

    @property
    def p(self) -> torch.Tensor:
        return self.p_logit.sigmoid()
