"""Gated modules (design.md layer 4): gated conv/linear, branch combination, the regulariser."""
from .combine import ShakeShake
from .gated import (
    POSTERIORS,
    GatedConv2d,
    GatedInput,
    GatedLinear,
    StochasticModule,
    candidate_masks,
    gated_layers,
    network_regularizer,
    posterior_of,
    set_gates,
    set_posterior,
    stacked_candidate_masks,
)

__all__ = [
    "POSTERIORS",
    "GatedConv2d",
    "GatedInput",
    "GatedLinear",
    "ShakeShake",
    "StochasticModule",
    "candidate_masks",
    "gated_layers",
    "network_regularizer",
    "posterior_of",
    "set_gates",
    "set_posterior",
    "stacked_candidate_masks",
]
