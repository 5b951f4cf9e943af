"""Integers from the RNG contract's uniforms, in exact integer arithmetic (the same on every device).

A contract uniform u in (0, 1) carries 24 random bits: u = (k + 0.5) 2^-24 with k = floor(u 2^24)
(design.md "RNG contract"). The data pipeline's integers (crop offsets, cutout centres, sub-policies,
epoch orders) are made from those bits, never from float arithmetic that could round differently on a
GPU and a CPU.
"""
from __future__ import annotations

import torch


def uniform_bits(u: torch.Tensor) -> torch.Tensor:
    """int64 k = floor(u * 2^24): the 24 random bits of each contract uniform."""
    return torch.floor(u * (1 << 24)).long()


def uniform_index(u: torch.Tensor, high: int | torch.Tensor) -> torch.Tensor:
    """int64 in [0, high) from uniforms u in (0, 1): floor(k * high / 2^24) with k = uniform_bits(u);
    `high` broadcasts against u."""
    return (uniform_bits(u) * high) >> 24
