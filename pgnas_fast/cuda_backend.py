"""The `cuda` backend: raw-pointer CUDA kernels (kernels/*.cu) behind `pgnas_fast._C.cuda`, design.md layer 6.

The same thin layer as the `cpu` backend (pgnas_fast.cpu_backend.NativeOps: layouts, output
strides) over the CUDA bindings (csrc/cuda/ops.cpp). Available when `_C` was built with CUDA (torch
with CUDA and nvcc at install time) and a CUDA device is visible.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .cpu_backend import NativeOps, _C, backend_functions, extension_unavailable_reason


_CUDA_NOTE = Path(__file__).with_name("_C.cuda_unavailable.txt")  # written by setup.py


def unavailable_reason() -> str | None:
    reason = extension_unavailable_reason()
    if reason is not None:
        return reason
    if not getattr(_C, "with_cuda", False):
        if _CUDA_NOTE.exists():  # setup.py: torch had CUDA, the toolkit was missing or its part failed
            return _CUDA_NOTE.read_text().strip()
        return (
            "pgnas_fast._C was built without CUDA (it needs a torch with CUDA and nvcc at install time; "
            "rebuild with pip install --no-deps --no-build-isolation -e .)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


_impl = NativeOps(getattr(_C, "cuda", None))
globals().update(backend_functions(_impl))
