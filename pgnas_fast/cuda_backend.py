"""The `cuda` backend: raw-pointer CUDA kernels (kernels/*.cu) behind `pgnas_fast._C.cuda`, design.md layer 6.

The same thin layer as the `cpu` backend (pgnas_fast.cpu_backend.NativeOps: layouts, output
strides) over the CUDA bindings (csrc/cuda/ops.cpp). Available when `_C` was built with CUDA (torch
with CUDA and nvcc at install time) and a CUDA device is visible.
"""
from __future__ import annotations

import torch

from .cpu_backend import NativeOps, _C, extension_unavailable_reason


def unavailable_reason() -> str | None:
    reason = extension_unavailable_reason()
    if reason is not None:
        return reason
    if not getattr(_C, "with_cuda", False):
        return (
            "pgnas_fast._C was built without CUDA (it needs a torch with CUDA and nvcc at install time; "
            "rebuild with pip install --no-deps --no-build-isolation -e .)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


_impl = NativeOps(getattr(_C, "cuda", None))
philox_uniform = _impl.philox_uniform
gate_keep = _impl.gate_keep
gate_keep_backward = _impl.gate_keep_backward
candidate_keep = _impl.candidate_keep
gated_apply = _impl.gated_apply
gated_apply_backward = _impl.gated_apply_backward
gated_copies = _impl.gated_copies
gated_copies_backward = _impl.gated_copies_backward
affine_relu_gate = _impl.affine_relu_gate
affine_relu_gate_backward = _impl.affine_relu_gate_backward
branch_combine = _impl.branch_combine
branch_combine_backward = _impl.branch_combine_backward
regularizer = _impl.regularizer
regularizer_backward = _impl.regularizer_backward
gaussian_noise = _impl.gaussian_noise
gaussian_noise_backward = _impl.gaussian_noise_backward
gaussian_kl = _impl.gaussian_kl
gaussian_kl_backward = _impl.gaussian_kl_backward
