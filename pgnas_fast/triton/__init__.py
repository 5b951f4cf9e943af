"""The `triton` backend (design.md layer 6): the whole op set as Triton kernels.

Runs on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter, for the
test suite). One file per op family, each holding its kernels and thin wrappers that pick the launch
grid (inputs arrive validated by pgnas_fast.ops): `philox` (the RNG contract), `gates` (gate_keep,
gated_apply), `fused` (affine_relu_gate, gated_copies), `combine` (branch_combine), `regularizer` (multi-tensor R),
`gaussian` (the Gaussian family's noise epilogue and multi-tensor KL).
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
except ImportError as err:  # keep the module importable so that the reason can be reported
    _IMPORT_ERROR: str | None = f"triton is not installed ({err})"
else:
    _IMPORT_ERROR = None

if _IMPORT_ERROR is None:
    from .combine import branch_combine, branch_combine_backward
    from .fused import affine_relu_gate, affine_relu_gate_backward, gated_copies, gated_copies_backward
    from .gates import candidate_keep, gate_keep, gate_keep_backward, gated_apply, gated_apply_backward
    from .gaussian import gaussian_kl, gaussian_kl_backward, gaussian_noise, gaussian_noise_backward
    from .philox import philox_uniform
    from .regularizer import regularizer, regularizer_backward

__all__ = [
    "affine_relu_gate",
    "affine_relu_gate_backward",
    "branch_combine",
    "branch_combine_backward",
    "candidate_keep",
    "gate_keep",
    "gate_keep_backward",
    "gated_apply",
    "gated_apply_backward",
    "gated_copies",
    "gated_copies_backward",
    "gaussian_kl",
    "gaussian_kl_backward",
    "gaussian_noise",
    "gaussian_noise_backward",
    "philox_uniform",
    "regularizer",
    "regularizer_backward",
    "unavailable_reason",
]


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU, slowly, for tests)"
