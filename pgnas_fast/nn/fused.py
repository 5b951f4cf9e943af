"""The authors' BN - ReLU - [gate] - conv order with the first three in one pass (design.md op set,
"fused variants"): `norm_relu_conv(norm, conv, x)` is `conv(relu(norm(x)))`.

While `conv`'s gates are relaxed concrete gates (training) and the active backend implements
`affine_relu_gate` natively, the BatchNorm is folded into a per-channel affine map (batch statistics
in training mode, with the running statistics updated exactly as nn.BatchNorm2d does; running
statistics in eval mode) and the affine map, the ReLU and the gate run as one op: one read of x and
one write instead of three of each. Otherwise (hard or full gates, the Gaussian family, the reference
backend, a BatchNorm whose forward was replaced, e.g. by ranking's per-candidate statistics) it is
the plain module composition. The modules' structure, state dicts and export are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import dispatch
from .gated import GatedConv2d

FUSED_OP = "affine_relu_gate"


def _fusable(norm: nn.Module, conv: GatedConv2d, x: torch.Tensor) -> bool:
    if type(norm) is not nn.BatchNorm2d or "forward" in vars(norm) or x.dim() != 4:
        return False
    if conv.gate_mode != "relaxed" or getattr(conv, "posterior", "concrete") != "concrete":
        return False
    backend = dispatch.resolve(conv.backend, x.device)
    return backend != "reference" and FUSED_OP not in dispatch.missing_ops(backend)


def _batch_statistics(norm: nn.BatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of a training-mode batch, updating the running statistics
    as F.batch_norm does (momentum None: cumulative average; unbiased variance kept)."""
    var, mean = torch.var_mean(x if x.dtype in (torch.float32, torch.float64) else x.float(),
                               dim=(0, 2, 3), correction=0)
    if norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = (1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum)
            count = x.numel() // x.shape[1]
            if count < 2:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
            norm.running_mean.lerp_(mean.detach().to(norm.running_mean.dtype), momentum)
            norm.running_var.lerp_((var.detach() * (count / (count - 1))).to(norm.running_var.dtype), momentum)
    return mean, var


def _folded_affine(norm: nn.BatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] with norm(x) = x * scale + shift, differentiable in x and the affine parameters."""
    if norm.training or not norm.track_running_stats:
        mean, var = _batch_statistics(norm, x)
    else:
        mean, var = norm.running_mean, norm.running_var
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(var.to(dtype) + norm.eps)
    if norm.affine:
        scale = norm.weight.to(dtype) * scale
    shift = -mean.to(dtype) * scale
    if norm.affine:
        shift = shift + norm.bias.to(dtype)
    return scale, shift


def norm_relu_conv(norm: nn.Module, conv: GatedConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(relu(norm(x))), with norm - relu - gate fused when it can be (see the module docstring)."""
    if not _fusable(norm, conv, x):
        return conv(F.relu(norm(x)))
    scale, shift = _folded_affine(norm, x)
    gated = ops.affine_relu_gate(x, scale, shift, conv.p_logit_per_channel().to(scale.dtype), seed=conv.gate_seed,
                                 stream=conv.gate_stream, tau=conv.tau, mode="relaxed",
                                 offset=conv.gate_row_offset * x.shape[1], backend=conv.backend)
    return conv._conv_forward(gated, conv.weight, conv.bias)


__all__ = ["norm_relu_conv"]
