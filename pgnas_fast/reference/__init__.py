"""The `reference` backend: the whole op set in plain torch ops (design.md layer 6).

Always available, on any device, and the oracle every other backend is tested against. It favours
clarity over speed. Inputs arrive validated (pgnas_fast.ops); gate math runs in float32, or float64
when p_logit is float64 (the gradcheck path).

Every backend module provides exactly these functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import philox


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The contract's math dtype (design.md "Numerics"): float32 whatever the data dtype, float64 when
    any input is float64 (the gradcheck path). Every backend follows it."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def common_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype every tensor of the list promotes to: a multi-tensor op's flat gradient buffer has it."""
    dtypes = {t.dtype for t in tensors}  # promotion is commutative: each distinct dtype once
    dtype = dtypes.pop()
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return dtype


def philox_uniform(n: int, seed: int, stream: int, offset: int, device: torch.device) -> torch.Tensor:
    return philox.uniform(n, seed, stream, offset, device)


def gate_keep(
    p_logit: torch.Tensor, batch: int, seed: int, stream: int, tau: float, mode: str, offset: int
) -> torch.Tensor:
    channels = p_logit.shape[0]
    if mode == "full":
        return torch.ones(batch, channels, dtype=p_logit.dtype, device=p_logit.device)
    u = philox.uniform(batch * channels, seed, stream, offset, p_logit.device).view(batch, channels)
    u = u.to(p_logit.dtype)
    if mode == "hard":  # the authors' 1 - floor(u + p)
        return (u + torch.sigmoid(p_logit) < 1.0).to(p_logit.dtype)
    logistic = torch.log(u) - torch.log1p(-u)
    # keep = 1 - sigmoid((logit p + L) / tau), written without the cancelling subtraction
    return torch.sigmoid(-(p_logit + logistic) / tau)


def candidate_keep(p_logit: torch.Tensor, candidates: torch.Tensor, seed: int, layer: int, domain: int) -> torch.Tensor:
    """Hard keep masks [K, C] of candidates `candidates` (int64 [K]) for gate layer `layer`: row k is
    gate_keep(p_logit, 1, seed, stream_id(domain, candidates[k], layer), mode="hard")."""
    streams = (domain << 56) | (candidates << 16) | layer
    u = philox.uniform_streams(p_logit.shape[0], seed, streams).to(p_logit.dtype)
    return (u + torch.sigmoid(p_logit) < 1.0).to(p_logit.dtype)


def _relaxed_keep_grad(grad_keep: torch.Tensor, keep: torch.Tensor, tau: float) -> torch.Tensor:
    """d p_logit [C] from d keep [B, C]: d keep / d p_logit = -keep (1 - keep) / tau."""
    return -(grad_keep * keep * (1.0 - keep)).sum(0) / tau


def gate_keep_backward(grad_keep: torch.Tensor, keep: torch.Tensor, tau: float, mode: str) -> torch.Tensor:
    if mode != "relaxed":  # hard and full gates do not depend on p_logit differentiably
        return torch.zeros(keep.shape[1], dtype=keep.dtype, device=keep.device)
    return _relaxed_keep_grad(grad_keep.to(keep.dtype), keep, tau)


def _per_channel(keep: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B, C] -> [B, C, 1, ...] broadcasting over the trailing (spatial) dims."""
    return keep.view(*keep.shape, *([1] * (ndim - 2)))


def gated_apply(
    x: torch.Tensor, p_logit: torch.Tensor, seed: int, stream: int, tau: float, mode: str, offset: int
) -> torch.Tensor:
    keep = gate_keep(p_logit, x.shape[0], seed, stream, tau, mode, offset)
    out = torch.empty_like(x)
    return torch.mul(x, _per_channel(keep, x.dim()), out=out)


def gated_apply_backward(
    grad: torch.Tensor, x: torch.Tensor, p_logit: torch.Tensor, seed: int, stream: int, tau: float, mode: str,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The gates are regenerated from (seed, stream, offset), never stored (design.md, FlashAttention habit).
    keep = gate_keep(p_logit, x.shape[0], seed, stream, tau, mode, offset)
    grad_x = torch.mul(grad, _per_channel(keep, x.dim()), out=torch.empty_like(x))
    if mode != "relaxed":
        return grad_x, torch.zeros_like(p_logit)
    grad_keep = grad.to(keep.dtype) * x.to(keep.dtype)
    if x.dim() > 2:
        grad_keep = grad_keep.sum(tuple(range(2, x.dim())))
    return grad_x, _relaxed_keep_grad(grad_keep, keep, tau)


def stacked_empty_like(x: torch.Tensor, copies: int) -> torch.Tensor:
    """[copies, *x.shape], each copy in x's memory layout (NCHW or channels_last), as gated_copies returns."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        b, c, h, w = x.shape
        return x.new_empty(copies, b, h, w, c).permute(0, 1, 4, 2, 3)
    return x.new_empty(copies, *x.shape)


def gated_copies(x, p_logits, seed, streams, tau, mode, offset, relu):
    out = stacked_empty_like(x, len(streams))
    source = torch.relu(x) if relu else x
    for s, stream in enumerate(streams):
        out[s] = gated_apply(source, p_logits[s], seed, stream, tau, mode, offset)
    return out


def gated_copies_backward(grad, x, p_logits, seed, streams, tau, mode, offset, relu):
    source = torch.relu(x) if relu else x
    grad_source = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, p_logits.dtype), device=x.device)
    grad_p = []
    for s, stream in enumerate(streams):
        g, gp = gated_apply_backward(grad[s], source, p_logits[s], seed, stream, tau, mode, offset)
        grad_source += g
        grad_p.append(gp)
    if relu:
        grad_source = torch.where(x > 0, grad_source, 0.0)
    return torch.empty_like(x).copy_(grad_source), torch.stack(grad_p)


def _channel_vector(v: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """[C] -> [1, C, 1, ...] broadcasting against [B, C, ...] data."""
    return v.to(dtype).view(1, -1, *([1] * (ndim - 2)))


def affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, mode, offset):
    dtype = math_dtype(x, scale, shift, p_logit)
    keep = gate_keep(p_logit, x.shape[0], seed, stream, tau, mode, offset).to(dtype)
    pre = x.to(dtype) * _channel_vector(scale, x.dim(), dtype) + _channel_vector(shift, x.dim(), dtype)
    return torch.empty_like(x).copy_(torch.relu(pre) * _per_channel(keep, x.dim()))


def affine_relu_gate_backward(grad, x, scale, shift, p_logit, seed, stream, tau, mode, offset):
    dtype = math_dtype(x, scale, shift, p_logit)
    keep = gate_keep(p_logit, x.shape[0], seed, stream, tau, mode, offset).to(dtype)  # regenerated, never stored
    xd = x.to(dtype)
    pre = xd * _channel_vector(scale, x.dim(), dtype) + _channel_vector(shift, x.dim(), dtype)
    g = grad.to(dtype)
    grad_pre = torch.where(pre > 0, g * _per_channel(keep, x.dim()), 0.0)  # through the gate and the ReLU
    spatial = tuple(range(2, x.dim()))
    grad_shift = grad_pre.sum((0, *spatial))
    grad_scale = (grad_pre * xd).sum((0, *spatial))
    grad_x = torch.empty_like(x).copy_(grad_pre * _channel_vector(scale, x.dim(), dtype))
    if mode != "relaxed":
        grad_p = torch.zeros_like(p_logit)
    else:
        grad_keep = g * torch.relu(pre)
        if spatial:
            grad_keep = grad_keep.sum(spatial)
        grad_p = _relaxed_keep_grad(grad_keep, keep, tau).to(p_logit.dtype)
    return grad_x, grad_scale.to(scale.dtype), grad_shift.to(shift.dtype), grad_p


def _branch_weight(weights: torch.Tensor, s: int, ndim: int) -> torch.Tensor:
    """Weight of branch s: per example [B, S] -> [B, 1, ...]; per branch [S] -> a 0-dim tensor."""
    if weights.dim() == 1:
        return weights[s]
    return weights[:, s].view(-1, *([1] * (ndim - 1)))


def branch_combine(ys: list[torch.Tensor], weights: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    ndim = ys[0].dim()
    # accumulate in the weights' precision at least (a 0-dim weight would not promote half data)
    acc_dtype = torch.promote_types(ys[0].dtype, weights.dtype)
    acc = None if skip is None else skip.to(acc_dtype)
    for s, y in enumerate(ys):
        term = _branch_weight(weights, s, ndim) * y.to(acc_dtype)
        acc = term if acc is None else acc + term
    return torch.empty_like(ys[0]).copy_(acc)


def branch_combine_backward(
    grad: torch.Tensor, ys: list[torch.Tensor], weights: torch.Tensor, backward_weights: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    ndim = grad.dim()
    weights_b = weights if backward_weights is None else backward_weights
    acc_dtype = torch.promote_types(grad.dtype, weights.dtype)
    grad_ys = [torch.empty_like(y).copy_(grad.to(acc_dtype) * _branch_weight(weights_b, s, ndim))
               for s, y in enumerate(ys)]
    if backward_weights is not None:
        # Shake-shake: the forward weights are random constants, not parameters.
        return grad_ys, torch.zeros_like(weights)
    columns = []
    for y in ys:
        prod = grad.to(weights.dtype) * y.to(weights.dtype)
        per_row = math.prod(prod.shape[1:])  # named, not -1: an empty batch's rows have a length too
        columns.append(prod.sum() if weights.dim() == 1 else prod.reshape(prod.shape[0], per_row).sum(1))
    return grad_ys, torch.stack(columns, dim=-1)




def _squared_norm_per_input_channel(weight: torch.Tensor, in_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """sum over outputs and kernel taps of W^2, per input channel [C_in]; grouped convs included.

    weight [O, C_in / G, ...]: output o belongs to group g = o // (O / G) and reads input channels
    g * C_in / G + j.
    """
    out_channels, per_group = weight.shape[0], weight.shape[1]
    groups = in_channels // per_group
    sq = weight.to(dtype).square()
    if sq.dim() > 2:
        sq = sq.flatten(2).sum(2)
    return sq.view(groups, out_channels // groups, per_group).sum(1).reshape(in_channels)


def _keep_prob_per_weight(keep_prob: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1 - p) of each weight's input channel, shaped to broadcast against `weight`."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    groups = keep_prob.shape[0] // per_group
    per_weight = keep_prob.view(groups, 1, per_group).expand(groups, out_channels // groups, per_group)
    return per_weight.reshape(out_channels, per_group, *([1] * (weight.dim() - 2)))


def _neg_entropy(p_logit: torch.Tensor) -> torch.Tensor:
    """H'(p) = p log p + (1 - p) log(1 - p) from the logit: finite for p near 0 or 1, and 1 - p taken as
    sigmoid(-logit), which keeps its digits where a subtraction from 1 would cancel (p near 1). At p
    exactly 0 or 1 (an infinite logit) it is its limit, 0, where the formula would give 0 * inf."""
    value = torch.sigmoid(p_logit) * F.logsigmoid(p_logit) + torch.sigmoid(-p_logit) * F.logsigmoid(-p_logit)
    return value.masked_fill(p_logit.isinf(), 0.0)


def regularizer(
    weights: list[torch.Tensor], p_logits: list[torch.Tensor], weight_reg: float, drop_reg: float, n_train: float
) -> torch.Tensor:
    dtype = math_dtype(*p_logits)
    total = torch.zeros((), dtype=dtype, device=p_logits[0].device)
    for weight, p_logit in zip(weights, p_logits):
        z = p_logit.to(dtype)
        sq = _squared_norm_per_input_channel(weight, z.shape[0], dtype)
        total = total + (weight_reg / n_train) * (torch.sigmoid(-z) * sq).sum()
        total = total + (drop_reg / n_train) * _neg_entropy(z).sum()
    return total


def regularizer_backward(
    grad: torch.Tensor,
    weights: list[torch.Tensor],
    p_logits: list[torch.Tensor],
    weight_reg: float,
    drop_reg: float,
    n_train: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat gradients (the op contract, pgnas_fast.ops._library): every weight's, row-major in list
    order, in common_dtype(weights); every p_logit's in the math dtype."""
    dtype = math_dtype(*p_logits)
    g = grad.to(dtype)
    grad_weights = weights[0].new_empty(sum(w.numel() for w in weights), dtype=common_dtype(weights))
    grad_p_logits = []
    for weight, p_logit, grad_w in zip(weights, p_logits, grad_weights.split([w.numel() for w in weights])):
        z = p_logit.to(dtype)
        p = torch.sigmoid(z)
        keep_prob = torch.sigmoid(-z)
        scale = g * (2.0 * weight_reg / n_train)
        torch.mul(scale * _keep_prob_per_weight(keep_prob, weight), weight.to(dtype), out=grad_w.view(weight.shape))
        sq = _squared_norm_per_input_channel(weight, z.shape[0], dtype)
        # d/dz (1 - p) = -p (1 - p);  d/dz H'(p) = logit(p) * p (1 - p) = z p (1 - p), 0 at an infinite z
        grad_z = g * (p * keep_prob) * ((drop_reg / n_train) * z - (weight_reg / n_train) * sq)
        grad_p_logits.append(grad_z.masked_fill(z.isinf(), 0.0))
    return grad_weights, torch.cat(grad_p_logits)


# ---- the Gaussian family (design.md "Gaussian family") ---------------------------------------------
# Local reparameterization: out = mu + sqrt(max(var, 0) + VAR_EPS) * eps, eps ~ N(0, 1) per element of
# mu from philox.normal (element index = flat row-major index of mu's logical shape, plus `offset`).
# var is clamped at 0 because fast convolution algorithms can return tiny negatives for conv(x^2, W^2).
VAR_EPS = 1e-8
# Molchanov et al. 2017: -KL(log alpha) ~ K1 sigmoid(K2 + K3 log alpha) - 0.5 log1p(1 / alpha) - K1
KL_K1, KL_K2, KL_K3 = 0.63576, 1.87320, 1.48695


def _eps(like: torch.Tensor, seed: int, stream: int, offset: int) -> torch.Tensor:
    return philox.normal(like.numel(), seed, stream, offset, like.device).view(like.shape).to(math_dtype(like))


def gaussian_noise(mu: torch.Tensor, var: torch.Tensor, seed: int, stream: int, offset: int) -> torch.Tensor:
    dtype = math_dtype(mu)
    std = torch.sqrt(var.to(dtype).clamp_min(0.0) + VAR_EPS)
    return torch.empty_like(mu).copy_(mu.to(dtype) + std * _eps(mu, seed, stream, offset))


def gaussian_noise_backward(grad: torch.Tensor, var: torch.Tensor, seed: int, stream: int, offset: int) -> torch.Tensor:
    """d var (d mu is grad itself): grad * eps / (2 sqrt(var + VAR_EPS)) where var > 0, else 0;
    eps regenerated from (seed, stream, offset), never stored."""
    dtype = math_dtype(var)
    v = var.to(dtype)
    std = torch.sqrt(v.clamp_min(0.0) + VAR_EPS)
    grad_var = torch.where(v > 0, grad.to(dtype) * _eps(var, seed, stream, offset) / (2.0 * std), 0.0)
    return torch.empty_like(var).copy_(grad_var)


def _kl_per_channel(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL of one channel's weight: K1 (1 - sigmoid(K2 + K3 log alpha)) + 0.5 log1p(1 / alpha), written
    without cancellation: 1 - sigmoid(t) as sigmoid(-t), log1p(e^-a) as logaddexp(0, -a) (softplus
    returns its input past 20, a relative 1e-9 short)."""
    return (KL_K1 * torch.sigmoid(-(KL_K2 + KL_K3 * log_alpha))
            + 0.5 * torch.logaddexp(torch.zeros((), dtype=log_alpha.dtype, device=log_alpha.device), -log_alpha))


def gaussian_kl(log_alphas: list[torch.Tensor], weights_per_channel: list[int], n_train: float) -> torch.Tensor:
    dtype = math_dtype(*log_alphas)
    total = torch.zeros((), dtype=dtype, device=log_alphas[0].device)
    for log_alpha, count in zip(log_alphas, weights_per_channel):
        total = total + (count / n_train) * _kl_per_channel(log_alpha.to(dtype)).sum()
    return total


def gaussian_kl_backward(
    grad: torch.Tensor, log_alphas: list[torch.Tensor], weights_per_channel: list[int], n_train: float
) -> torch.Tensor:
    """The flat gradient (every log alpha's, in list order, in the math dtype), as regularizer_backward."""
    dtype = math_dtype(*log_alphas)
    g = grad.to(dtype)
    grads = []
    for log_alpha, count in zip(log_alphas, weights_per_channel):
        a = log_alpha.to(dtype)
        t = KL_K2 + KL_K3 * a
        # d/da [-K1 sigmoid(t) + 0.5 softplus(-a)] = -K1 K3 s (1 - s) - 0.5 sigmoid(-a), s = sigmoid(t) and
        # 1 - s = sigmoid(-t) (no cancelling for large t)
        d = -KL_K1 * KL_K3 * torch.sigmoid(t) * torch.sigmoid(-t) - 0.5 * torch.sigmoid(-a)
        grads.append(g * (count / n_train) * d)
    return torch.cat(grads)
