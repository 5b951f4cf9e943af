"""Gated modules (design.md layer 4): gated conv/linear, branch combination, the regulariser."""
from .combine import ShakeShake
from .conv import Conv2d
from .fused import norm_relu_conv, relu_gated_convs
from .gated import (
    POSTERIORS,
    GatedConv2d,
    GatedInput,
    GatedLinear,
    StochasticModule,
    candidate_masks,
    check_masks,
    clip_log_alpha_,
    dynamic_streams,
    gated_layers,
    kept_fraction,
    network_regularizer,
    posterior_of,
    set_gates,
    set_step_streams,
    set_posterior,
    stacked_candidate_masks,
    training_modes_kept,
)

__all__ = [
    "POSTERIORS",
    "Conv2d",
    "GatedConv2d",
    "GatedInput",
    "GatedLinear",
    "ShakeShake",
    "StochasticModule",
    "candidate_masks",
    "check_masks",
    "clip_log_alpha_",
    "dynamic_streams",
    "gated_layers",
    "kept_fraction",
    "network_regularizer",
    "norm_relu_conv",
    "posterior_of",
    "relu_gated_convs",
    "set_gates",
    "set_step_streams",
    "set_posterior",
    "stacked_candidate_masks",
    "training_modes_kept",
]
