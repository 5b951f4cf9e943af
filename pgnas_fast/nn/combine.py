"""Branch combination modules: the mixed-operation forward of multi-branch super-networks."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops.streams import Domain
from .gated import StochasticModule


class MeanCombine(nn.Module):
    """Shake-shake in evaluation mode in plain torch ops: the mean of the branches, plus the skip."""

    def forward(self, branches: list[torch.Tensor], skip: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.stack(branches).mean(0)
        return out if skip is None else out + skip


class ShakeShake(StochasticModule):
    """Combine S branch outputs with random convex weights per example (Gastaldi 2017).

    Training: forward weights w ~ Dirichlet(1, ..., 1) per example (for S = 2, alpha ~ U(0, 1) and
    1 - alpha) and independent backward weights of the same law, drawn from the RNG contract's shake
    stream of the current step (set by `set_gates`). Evaluation: 1/S each. Plus the skip connection.

    Example b (global row, see `StochasticModule.rng_row_offset`) uses elements 2 S b .. 2 S b + 2 S - 1
    of the stream: S for its forward weights, then S for its backward weights, so a data-parallel
    shard draws exactly its rows of the concatenated batch's weights.
    """

    rng_domain = Domain.SHAKE

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def evaluation_module(self) -> nn.Module:
        return MeanCombine()

    def forward(self, branches: list[torch.Tensor], skip: torch.Tensor | None = None) -> torch.Tensor:
        n_branches, batch = len(branches), branches[0].shape[0]
        device = branches[0].device
        if skip is not None and skip.dtype != branches[0].dtype:  # e.g. under autocast: combined in the branches'
            skip = skip.to(branches[0].dtype)
        if not self.training:
            # 1/S in float64 for float64 branches (float32 would round 1/3 at 1e-8), else float32
            weights = torch.full((n_branches,), 1.0 / n_branches, device=device,
                                 dtype=torch.float64 if branches[0].dtype == torch.float64 else torch.float32)
            return ops.branch_combine(branches, weights, skip=skip, backend=self.backend)
        if self.rng_stream is None:
            raise RuntimeError("ShakeShake in training mode needs set_gates(model, 'relaxed', seed=, step=) first")
        per_example = 2 * n_branches
        u = ops.philox_uniform(batch * per_example, seed=self.rng_seed, stream=self.rng_stream,
                               offset=self.rng_row_offset * per_example, device=device, backend=self.backend)
        exponential = -torch.log(u).view(batch, 2, n_branches)  # normalised exponentials are Dirichlet(1)
        weights = exponential / exponential.sum(-1, keepdim=True)
        return ops.branch_combine(branches, weights[:, 0], skip=skip, backward_weights=weights[:, 1],
                                  backend=self.backend)
