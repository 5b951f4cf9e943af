"""The functional op set of design.md ("Public functional API"): check, pick a backend, call the op.

Every function validates its arguments (shape, dtype, device, range) and raises a ValueError or
TypeError naming the argument and what was expected before any kernel runs, then resolves the
backend (`backend=None`: the active selection, see `pgnas_fast.ops.dispatch`) and calls the custom
op declared in `pgnas_fast.ops._library`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import _library
from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    backends,
    resolve,
    selected,
    set_backend,
    use_backend,
)
from .streams import LAYER_LIMIT, MAJOR_LIMIT, SEED_LIMIT, Domain, stream_id
from .transfer import to_device

__all__ = [
    "BACKENDS",
    "GATE_MODES",
    "BackendUnavailableError",
    "Domain",
    "affine_relu_gate",
    "backends",
    "branch_combine",
    "candidate_keep",
    "check_not_traced",
    "gate_keep",
    "gated_apply",
    "gated_copies",
    "gaussian_kl",
    "gaussian_noise",
    "philox_uniform",
    "regularizer",
    "selected",
    "set_backend",
    "stream_id",
    "use_backend",
]

GATE_MODES = ("relaxed", "hard", "full")
DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GATE_DTYPES = (torch.float32, torch.float64)  # float64 only for gradcheck
MAX_COPIES = 16  # gated_copies per call (the native kernels' PGNAS_MAX_COPIES)
# The kernels take tau and the regulariser's scales as float32 (Triton as a float32 pair hi + lo)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


# ---- argument checks ------------------------------------------------------------------------------
def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_real(name: str, value, *, positive: bool) -> float:
    """A real number (numpy scalars too, not a bool), > 0 (positive) or >= 0, and at most float32's
    largest finite value: the kernels compute with it in float32."""
    if type(value) is float:  # the usual case, without the ABC check (this runs on every op call)
        number = value
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    else:
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64
            number = math.inf
    if not ((number > 0 if positive else number >= 0) and number <= FLOAT32_MAX):  # NaN fails both
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0 and <= {FLOAT32_MAX:.6g} "
                         f"(float32's largest), got {value!r}")
    return number


def _check_rng(seed: int, stream: int) -> None:
    _check_int("seed", seed, 0, SEED_LIMIT)
    _check_int("stream", stream, 0, SEED_LIMIT)


def _check_tensor(name: str, t, dtypes: Sequence[torch.dtype], ndim: int | None = None, min_ndim: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def _check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_not_traced(what: str = "mode='relaxed' (gates drawn afresh from seed and stream)") -> None:
    """torch.jit.trace and torch.export record Python numbers as constants: a random draw in their graph
    would be the same on every call, silently (torch.compile guards them instead, and compiles anew)."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        raise RuntimeError(f"{what} cannot be traced: torch.jit.trace and torch.export would record its seed and "
                           "stream as constants and draw the same numbers on every call. Trace or export in eval "
                           "mode with gates 'full' or 'hard' (pgnas_fast.nn.set_gates; the drop-in layers with "
                           "deterministic=True), or use torch.compile")


def _check_gate_args(p_logit, tau: float, mode: str, seed: int, stream: int) -> None:
    _check_tensor("p_logit", p_logit, GATE_DTYPES, ndim=1)
    _check_real("tau", tau, positive=True)
    if mode not in GATE_MODES:
        raise ValueError(f"mode must be one of {', '.join(GATE_MODES)}; got {mode!r}")
    if mode == "relaxed":
        check_not_traced()
    _check_rng(seed, stream)


# ---- the op set -----------------------------------------------------------------------------------
def philox_uniform(n: int, *, seed: int, stream: int, offset: int = 0, device="cpu", backend: str | None = None):
    """float32 [n]: u of elements offset .. offset + n - 1 of (seed, stream); 0 < u < 1."""
    check_not_traced("philox_uniform (random numbers of seed and stream)")
    _check_int("n", n, 0)
    _check_rng(seed, stream)
    _check_int("offset", offset, 0, SEED_LIMIT)
    if offset + n > SEED_LIMIT:
        raise ValueError(f"offset + n must be <= 2^63, got {offset + n}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}: {err}"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():  # (every other op has tensors, on a live device)
        raise BackendUnavailableError(f"no backend runs on {device}: this torch ({torch.__version__}) sees no CUDA "
                                      "device")
    return _library.call("philox_uniform", n, seed, stream, offset, device, resolve(backend, device))


def _check_gate_offset(offset: int, n_gates: int) -> None:
    _check_int("offset", offset, 0, SEED_LIMIT)
    if offset + n_gates > SEED_LIMIT:
        raise ValueError(f"offset + batch * C must be <= 2^63, got {offset + n_gates}")


def gate_keep(p_logit, batch: int, *, seed: int, stream: int, tau: float = 0.2, mode: str = "relaxed",
              offset: int = 0, backend=None):
    """keep [batch, C] (float32) from per-channel drop logits p_logit [C].

    Gate (b, c) uses element i = offset + b * C + c of the stream. relaxed: 1 - sigmoid((p_logit + L) / tau)
    with logistic noise L; hard: 0 where u + sigmoid(p_logit) >= 1, else 1; full: ones. With
    offset = r * C, the gates are rows r .. r + batch - 1 of a call on a larger batch (data parallel).
    """
    _check_gate_args(p_logit, tau, mode, seed, stream)
    _check_int("batch", batch, 1)
    _check_gate_offset(offset, batch * p_logit.shape[0])
    # p_logit is tiny ([C]); a contiguous copy spares every backend a strided path (e.g. expanded views)
    return _library.call("gate_keep", p_logit.contiguous(), batch, seed, stream, float(tau), mode, offset,
                         resolve(backend, p_logit.device))


def candidate_keep(p_logit, candidates, *, seed: int, layer: int, domain: Domain = Domain.CANDIDATE, backend=None):
    """Hard keep masks [K, C] (float32) of K candidates of one gate layer in one call.

    Row k equals gate_keep(p_logit, 1, seed=seed, stream=stream_id(domain, candidates[k], layer),
    mode="hard")[0]: candidate ids name their masks whatever the batch they are drawn in.
    candidates: int64 [K], on p_logit's device or on the CPU: CPU ids are checked on the host and
    copied without stalling the GPU (checking ids on a GPU reads them back, a synchronisation).
    """
    _check_tensor("p_logit", p_logit, GATE_DTYPES, ndim=1)
    _check_tensor("candidates", candidates, (torch.int64,), ndim=1)
    _check_rng(seed, 0)
    _check_int("layer", layer, 0, LAYER_LIMIT)
    if not isinstance(domain, Domain):
        raise TypeError(f"domain must be a pgnas_fast.ops.Domain, got {domain!r}")
    if candidates.numel() and not bool(((candidates >= 0) & (candidates < MAJOR_LIMIT)).all()):
        raise ValueError("candidates must be ids in [0, 2^40)")
    if candidates.device.type == "cpu":
        candidates = to_device(candidates, p_logit.device, "candidate ids")
    _check_same_device("p_logit", p_logit, candidates=candidates)
    return _library.call("candidate_keep", p_logit.contiguous(), candidates.contiguous(), seed, layer, int(domain),
                         resolve(backend, p_logit.device))


def gated_apply(x, p_logit, *, seed: int, stream: int, tau: float = 0.2, mode: str = "relaxed", offset: int = 0,
                backend=None):
    """x * gate_keep(p_logit, x.shape[0], ..., offset=offset) broadcast over x's trailing dims; x is [B, C, ...]."""
    _check_tensor("x", x, DATA_DTYPES, min_ndim=2)
    _check_gate_args(p_logit, tau, mode, seed, stream)
    if p_logit.shape[0] != x.shape[1]:
        raise ValueError(f"p_logit must have shape [{x.shape[1]}] (x.shape[1]), got {tuple(p_logit.shape)}")
    _check_gate_offset(offset, x.shape[0] * x.shape[1])
    _check_same_device("x", x, p_logit=p_logit)
    return _library.call("gated_apply", x, p_logit.contiguous(), seed, stream, float(tau), mode, offset,
                         resolve(backend, x.device))


def affine_relu_gate(x, scale, shift, p_logit, *, seed: int, stream: int, tau: float = 0.2, mode: str = "relaxed",
                     offset: int = 0, backend=None):
    """The fused pre-activation of the authors' BN - ReLU - [gate] - conv order, in one pass over x:

        gated_apply(relu(x * scale[c] + shift[c]), p_logit, ..., offset=offset)

    x [B, C, ...]; scale, shift [C] (a BatchNorm's affine map folded with its statistics: scale =
    gamma / sqrt(var + eps), shift = beta - mean * scale), float32 (float64 on the gradcheck path).
    The affine map and the ReLU run in float32 (float64 when any input is float64) and the result is
    rounded once to x's dtype. Gradients for x, scale, shift and (relaxed) p_logit.
    """
    _check_tensor("x", x, DATA_DTYPES, min_ndim=2)
    _check_gate_args(p_logit, tau, mode, seed, stream)
    channels = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift), ("p_logit", p_logit)):
        _check_tensor(name, t, GATE_DTYPES, ndim=1)
        if t.shape[0] != channels:
            raise ValueError(f"{name} must have shape [{channels}] (x.shape[1]), got {tuple(t.shape)}")
    _check_gate_offset(offset, x.shape[0] * channels)
    _check_same_device("x", x, scale=scale, shift=shift, p_logit=p_logit)
    return _library.call("affine_relu_gate", x, scale.contiguous(), shift.contiguous(), p_logit.contiguous(), seed,
                         stream, float(tau), mode, offset, resolve(backend, x.device))


def gated_copies(x, p_logits, *, seed: int, streams, tau: float = 0.2, mode: str = "relaxed", offset: int = 0,
                 relu: bool = False, backend=None):
    """One input, S gated copies in one read of x: out[s] = gated_apply(relu(x) if relu else x,
    p_logits[s], seed=seed, stream=streams[s], ...), stacked as [S, *x.shape] (each copy in x's
    layout). The multi-branch blocks' ReLU - [gate] - conv branches read their shared input once.

    p_logits: [S, C] drop logits, one row per copy; streams: S stream ids (one per gate layer).
    """
    _check_tensor("x", x, DATA_DTYPES, min_ndim=2)
    _check_tensor("p_logits", p_logits, GATE_DTYPES, ndim=2)
    if isinstance(streams, (str, bytes, torch.Tensor)) or not isinstance(streams, Sequence):
        raise TypeError("streams must be a list of ints, one per copy")
    streams = list(streams)
    if not 1 <= len(streams) <= MAX_COPIES:
        raise ValueError(f"streams must name 1 to {MAX_COPIES} copies, got {len(streams)}")
    if tuple(p_logits.shape) != (len(streams), x.shape[1]):
        raise ValueError(f"p_logits must have shape [{len(streams)}, {x.shape[1]}] (len(streams), x.shape[1]), got "
                         f"{tuple(p_logits.shape)}")
    for k, stream in enumerate(streams):
        _check_int(f"streams[{k}]", stream, 0, SEED_LIMIT)
    _check_gate_args(p_logits[0], tau, mode, seed, streams[0])
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    _check_gate_offset(offset, x.shape[0] * x.shape[1])
    _check_same_device("x", x, p_logits=p_logits)
    return _library.call("gated_copies", x, p_logits.contiguous(), seed, streams, float(tau), mode, offset, relu,
                         resolve(backend, x.device))


def branch_combine(ys, weights, *, skip=None, backward_weights=None, backend=None):
    """sum_s w[b, s] * ys[s] (+ skip). weights [B, S] (per example) or [S] (per branch).

    backward_weights (same shape): weights used for the gradients of ys instead of `weights`, the
    shake-shake rule; the forward weights then count as constants (zero gradient).
    """
    if isinstance(ys, torch.Tensor) or not isinstance(ys, Sequence) or len(ys) == 0:
        raise TypeError("ys must be a non-empty list of tensors")
    ys = list(ys)
    for s, y in enumerate(ys):
        _check_tensor(f"ys[{s}]", y, DATA_DTYPES, min_ndim=1)
        if y.shape != ys[0].shape or y.dtype != ys[0].dtype:
            raise ValueError(
                f"ys[{s}] has shape {tuple(y.shape)} and dtype {y.dtype}; every branch must match ys[0]: "
                f"{tuple(ys[0].shape)}, {ys[0].dtype}"
            )
        _check_same_device("ys[0]", ys[0], **{f"ys[{s}]": y})
    n_branches, batch = len(ys), ys[0].shape[0]
    _check_tensor("weights", weights, GATE_DTYPES)
    if tuple(weights.shape) not in ((batch, n_branches), (n_branches,)):
        raise ValueError(
            f"weights must have shape [{batch}, {n_branches}] (per example) or [{n_branches}] (per branch), "
            f"got {tuple(weights.shape)}"
        )
    if backward_weights is not None:
        _check_tensor("backward_weights", backward_weights, GATE_DTYPES)
        if backward_weights.shape != weights.shape:
            raise ValueError(
                f"backward_weights must have the shape of weights {tuple(weights.shape)}, "
                f"got {tuple(backward_weights.shape)}"
            )
    if skip is not None:
        _check_tensor("skip", skip, DATA_DTYPES)
        if skip.shape != ys[0].shape or skip.dtype != ys[0].dtype:  # (the native kernels add it in ys' dtype)
            raise ValueError(f"skip must have the shape and dtype of ys[0] ({tuple(ys[0].shape)}, {ys[0].dtype}), "
                             f"got {tuple(skip.shape)}, {skip.dtype}")
    _check_same_device("ys[0]", ys[0], weights=weights, backward_weights=backward_weights, skip=skip)
    return _library.call("branch_combine", ys, weights, skip, backward_weights, resolve(backend, ys[0].device))


def regularizer(weights, p_logits, *, weight_reg: float, drop_reg: float, n_train: float, backend=None):
    """The whole network's R (pgnas-method.md section 2) as a 0-dim float32 tensor:

    R = weight_reg / n_train * sum_l sum_{o,c,k} (1 - p_c) W_l[o,c,k]^2 + drop_reg / n_train * sum_l sum_c H'(p_c)

    weights: conv or linear weights [O, C_in / groups, ...]; p_logits: matching per-input-channel
    drop logits [C_in]. Grouped and depthwise convs are handled (C_in / weight.shape[1] groups).
    """
    if isinstance(weights, torch.Tensor) or isinstance(p_logits, torch.Tensor):
        raise TypeError("weights and p_logits must be lists of tensors")
    weights, p_logits = list(weights), list(p_logits)
    if len(weights) == 0 or len(weights) != len(p_logits):
        raise ValueError(
            f"weights and p_logits must be non-empty lists of equal length, got {len(weights)} and {len(p_logits)}"
        )
    weight_reg, drop_reg = (_check_real(name, value, positive=False)
                            for name, value in (("weight_reg", weight_reg), ("drop_reg", drop_reg)))
    n_train = _check_real("n_train", n_train, positive=True)
    for name, value in (("weight_reg", weight_reg), ("drop_reg", drop_reg)):
        if value / n_train > FLOAT32_MAX:
            raise ValueError(f"{name} / n_train must be <= {FLOAT32_MAX:.6g} (float32's largest), got "
                             f"{value} / {n_train}")
    for k, (w, p) in enumerate(zip(weights, p_logits)):
        _check_tensor(f"weights[{k}]", w, DATA_DTYPES, min_ndim=2)
        _check_tensor(f"p_logits[{k}]", p, GATE_DTYPES, ndim=1)
        in_channels, per_group, out_channels = p.shape[0], w.shape[1], w.shape[0]
        if in_channels == 0:
            raise ValueError(f"p_logits[{k}] must have at least one channel, got shape {tuple(p.shape)}")
        if per_group == 0 or out_channels == 0:
            raise ValueError(f"weights[{k}] must have no empty dims, got shape {tuple(w.shape)}")
        if in_channels % per_group or out_channels % (in_channels // per_group):
            raise ValueError(
                f"p_logits[{k}] has {in_channels} channels, which does not fit weights[{k}] of shape "
                f"{tuple(w.shape)}: expected C_in = groups * {per_group} with groups dividing {out_channels}"
            )
        _check_same_device("weights[0]", weights[0], **{f"weights[{k}]": w, f"p_logits[{k}]": p})
    return _library.call(
        "regularizer", [_in_memory_order(w) for w in weights], [p.contiguous() for p in p_logits], float(weight_reg),
        float(drop_reg), float(n_train), resolve(backend, weights[0].device))


def _in_memory_order(weight: torch.Tensor) -> torch.Tensor:
    """A gated weight as a view that is dense in its own memory order, so that no backend copies it.

    A channels_last conv weight [O, J, kh, kw] lies in memory as [O, kh, kw, J]: element for element
    the weight [O * kh * kw, J] of one tap, with the same input channel at every element and the same
    group on every row (output o's rows o * kh * kw .. are all in group o // (O / G)). Its gradient
    then comes back through the view's autograd in the weight's own channels_last layout.
    """
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    return weight


def gaussian_noise(mu, var, *, seed: int, stream: int, offset: int = 0, backend=None):
    """The Gaussian family's local-reparameterization epilogue: mu + sqrt(max(var, 0) + 1e-8) * eps.

    eps is standard normal per element, drawn from (seed, stream) at element offset + i, i the flat
    row-major index of the element in mu's shape (whatever the memory layout): element j is lane
    j mod 4 of the four normals of Philox counter j div 4, Box-Muller on the word pairs (w0, w1) and
    (w2, w3) in float32 with every operation rounded to nearest, so every backend has the same bits
    (see `pgnas_fast.reference.philox.normal_quads`). Gradients: d mu = grad, d var = grad * eps / (2 sqrt(var +
    1e-8)) where var > 0; backward regenerates eps instead of storing it.
    """
    _check_tensor("mu", mu, DATA_DTYPES, min_ndim=1)
    _check_tensor("var", var, DATA_DTYPES, min_ndim=1)
    if var.shape != mu.shape or var.dtype != mu.dtype:
        raise ValueError(
            f"var must have the shape and dtype of mu ({tuple(mu.shape)}, {mu.dtype}), got {tuple(var.shape)}, {var.dtype}"
        )
    _check_same_device("mu", mu, var=var)
    check_not_traced("gaussian_noise (normals of seed and stream)")
    _check_rng(seed, stream)
    _check_int("offset", offset, 0, SEED_LIMIT)
    if offset + mu.numel() > SEED_LIMIT:
        raise ValueError(f"offset + mu.numel() must be <= 2^63, got {offset + mu.numel()}")
    return _library.call("gaussian_noise", mu, var, seed, stream, offset, resolve(backend, mu.device))


def gaussian_kl(log_alphas, weights_per_channel, *, n_train: float, backend=None):
    """The whole network's KL of the Gaussian family (Molchanov et al. 2017) as a 0-dim tensor:

    KL = 1 / n_train * sum_l weights_per_channel[l] * sum_c (K1 - K1 sigmoid(K2 + K3 a_lc) + 0.5 log1p(exp(-a_lc)))

    log_alphas: per-input-channel log alpha [C_l] of each gated layer (already clipped by the caller);
    weights_per_channel: how many weights each input channel of layer l multiplies (every weight
    counts once). Gradients flow to log_alphas only.
    """
    if isinstance(log_alphas, torch.Tensor) or not isinstance(log_alphas, Sequence):
        raise TypeError("log_alphas must be a list of tensors")
    if isinstance(weights_per_channel, torch.Tensor) or not isinstance(weights_per_channel, Sequence):
        raise TypeError("weights_per_channel must be a list of ints")
    log_alphas, counts = list(log_alphas), list(weights_per_channel)
    if len(log_alphas) == 0 or len(log_alphas) != len(counts):
        raise ValueError(
            f"log_alphas and weights_per_channel must be non-empty lists of equal length, got {len(log_alphas)} and {len(counts)}"
        )
    n_train = _check_real("n_train", n_train, positive=True)
    if 1 / n_train > FLOAT32_MAX:
        raise ValueError(f"1 / n_train must be <= {FLOAT32_MAX:.6g} (float32's largest), got 1 / {n_train}")
    for k, (a, count) in enumerate(zip(log_alphas, counts)):
        _check_tensor(f"log_alphas[{k}]", a, GATE_DTYPES, ndim=1)
        _check_int(f"weights_per_channel[{k}]", count, 1, SEED_LIMIT)  # the native kernels take an int64
        _check_same_device("log_alphas[0]", log_alphas[0], **{f"log_alphas[{k}]": a})
    return _library.call("gaussian_kl", [a.contiguous() for a in log_alphas], [int(c) for c in counts], float(n_train),
                         resolve(backend, log_alphas[0].device))
