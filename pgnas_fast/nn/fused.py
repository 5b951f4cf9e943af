"""Fused variants the super-networks use (design.md op set):

- `norm_relu_conv(norm, conv, x)` is `conv(relu(norm(x)))`, the authors' BN - ReLU - [gate] - conv
  order, with the first three in one pass;
- `relu_gated_convs(convs, x)` is `[conv(relu(x)) for conv in convs]`, the S branches of a block
  reading their shared input once (one input -> S gated copies).

While `conv`'s gates are relaxed concrete gates (training) and its backend is a kernel backend
(every one implements the whole op set), the BatchNorm is folded into a per-channel affine map
(batch statistics in training mode, with the running statistics updated exactly as nn.BatchNorm2d
does; running statistics in eval mode) and the affine map, the ReLU and the gate run as one op: one
read of x and one write instead of three of each. Otherwise (hard or full gates, the Gaussian
family, the reference backend, a BatchNorm whose forward was replaced, e.g. by ranking's
per-candidate statistics) it is the plain module composition. The modules' structure, state dicts
and export are unchanged.

In training mode the batch statistics come from ATen's batch-norm kernel and the backward pass is
BatchNorm's own (see _TrainingNormReluGate); autograd through torch.var_mean measured slower than
the unfused modules on CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import _library, dispatch
from .gated import GatedConv2d


def _fused_op_live(conv: GatedConv2d, x: torch.Tensor) -> bool:
    """conv's gates are relaxed concrete gates and its backend is a kernel backend (the reference
    backend keeps the plain module composition, its own definition of these ops)."""
    if conv.gate_mode != "relaxed" or conv.posterior != "concrete":
        return False
    return dispatch.resolve(conv.backend, x.device) != "reference"


def _fusable(norm: nn.Module, conv: nn.Module, x: torch.Tensor) -> bool:
    # a materialized (exported) network has plain or sliced modules here: the composition then
    if not isinstance(conv, GatedConv2d) or type(norm) is not nn.BatchNorm2d or "forward" in vars(norm):
        return False
    return _fused_op_live(conv, x)


class _TrainingNormReluGate(torch.autograd.Function):
    """relu(batch_norm(x)) gated, BatchNorm in training mode, with BatchNorm's own two-pass backward.

    Forward: the batch statistics (ATen's batch-norm kernel, which also updates the running
    statistics), folded into scale and shift, then the fused op. Backward: the fused op's backward
    gives dx through the gate and ReLU with the per-channel sums d scale and d shift; the chain rule
    through scale = w rstd and shift = b - mean scale adds the statistics' share of dx, a per-channel
    affine map of x (mean and variance are means over the batch): one more elementwise pass, where
    autograd through torch.var_mean would take several.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p_logit, norm, gate):
        momentum = norm.momentum
        if norm.track_running_stats:
            norm.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(norm.num_batches_tracked)
            _, mean, rstd = torch.ops.aten._native_batch_norm_legit(
                x, None, None, norm.running_mean, norm.running_var, True, momentum, norm.eps)
        else:
            _, mean, rstd = torch.ops.aten._native_batch_norm_legit.no_stats(x, None, None, True, 0.0, norm.eps)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, rstd = mean.to(dtype), rstd.to(dtype)
        w = weight.to(dtype) if weight is not None else torch.ones_like(rstd)
        scale = w * rstd
        shift = -mean * scale if bias is None else bias.to(dtype) - mean * scale
        ctx.gate = gate
        ctx.has_affine = weight is not None
        ctx.save_for_backward(x, w, p_logit, mean, rstd, scale, shift)
        seed, stream, tau, offset, backend = gate
        return ops.affine_relu_gate(x, scale, shift, p_logit, seed=seed, stream=stream, tau=tau, offset=offset,
                                    backend=backend)

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            grads = _TrainingNormReluGate._gradients(ctx, grad)
        if torch.is_grad_enabled():  # create_graph=True
            grads = _library.no_second_derivative("affine_relu_gate", grads, (grad, *ctx.saved_tensors))
        return (*grads, None, None)

    @staticmethod
    def _gradients(ctx, grad):
        x, w, p_logit, mean, rstd, scale, shift = ctx.saved_tensors
        seed, stream, tau, offset, backend = ctx.gate
        grad_x, grad_scale, grad_shift, grad_p = _library.call(
            "affine_relu_gate_backward", grad.contiguous(memory_format=_memory_format(x)), x, scale, shift, p_logit,
            seed, stream, tau, "relaxed", offset, dispatch.resolve(backend, x.device))
        count = x.numel() // x.shape[1]
        grad_var = (grad_scale - grad_shift * mean) * w * (-0.5) * rstd.pow(3)
        grad_mean = -grad_shift * scale
        alpha = grad_var * (2.0 / count)  # d var / d x = 2 (x - mean) / count; d mean / d x = 1 / count
        beta = grad_mean / count - alpha * mean
        view = (1, -1, *([1] * (x.dim() - 2)))
        grad_x = grad_x.addcmul_(x, alpha.view(view).to(grad_x.dtype)).add_(beta.view(view).to(grad_x.dtype))
        grad_weight = grad_bias = None
        if ctx.has_affine:
            grad_weight, grad_bias = (grad_scale - grad_shift * mean) * rstd, grad_shift
        return [grad_x, grad_weight, grad_bias, grad_p]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def norm_relu_conv(norm: nn.Module, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(relu(norm(x))), with norm - relu - gate fused when it can be (see the module docstring)."""
    if not _fusable(norm, conv, x):
        return conv(F.relu(norm(x)))
    p_logit = conv.p_logit_per_channel()
    gate = (conv.gate_seed, conv.gate_stream, conv.tau, conv.gate_row_offset * x.shape[1], conv.backend)
    if norm.training or not norm.track_running_stats:
        # contiguous: the backward calls the backend op directly, past the public op's checks and copies
        gated = _TrainingNormReluGate.apply(x, norm.weight, norm.bias, p_logit.contiguous(), norm, gate)
    else:  # eval statistics are constants: scale and shift depend on the affine parameters alone
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
        if norm.affine:
            scale = norm.weight.to(dtype) * scale
        shift = -norm.running_mean.to(dtype) * scale
        if norm.affine:
            shift = shift + norm.bias.to(dtype)
        seed, stream, tau, offset, backend = gate
        gated = ops.affine_relu_gate(x, scale, shift, p_logit, seed=seed, stream=stream, tau=tau, offset=offset,
                                     backend=backend)
    return conv._conv_forward(gated, conv.weight, conv.bias)


def _copies_fusable(convs, x: torch.Tensor) -> bool:
    if not 1 < len(convs) <= ops.MAX_COPIES or not all(isinstance(c, GatedConv2d) for c in convs):
        return False
    first = convs[0]
    shared = all((c.gate_seed, c.gate_row_offset, c.tau, c.backend, c.p_logit.dtype)
                 == (first.gate_seed, first.gate_row_offset, first.tau, first.backend, first.p_logit.dtype)
                 for c in convs)
    return shared and all(_fused_op_live(c, x) for c in convs)


def relu_gated_convs(convs, x: torch.Tensor) -> list[torch.Tensor] | None:
    """[conv(relu(x)) for conv in convs]: with relaxed concrete gates of one seed on a kernel backend,
    the ReLU and every conv's gate in one read of x; with hard or full gates (candidates, ranking),
    one ReLU for all the convs. None otherwise (relaxed gates the op cannot take, or a materialized
    network's plain modules): the caller then runs its modules."""
    if all(isinstance(c, GatedConv2d) and c.gate_mode != "relaxed" for c in convs):
        h = F.relu(x)
        return [c(h) for c in convs]
    if not _copies_fusable(convs, x):
        return None
    first = convs[0]
    copies = ops.gated_copies(x, torch.stack([c.p_logit_per_channel() for c in convs]), seed=first.gate_seed,
                              streams=[c.gate_stream for c in convs], tau=first.tau,
                              offset=first.gate_row_offset * x.shape[1], relu=True, backend=first.backend)
    return [c._conv_forward(h, c.weight, c.bias) for c, h in zip(convs, copies.unbind(0))]


__all__ = ["norm_relu_conv", "relu_gated_convs"]
