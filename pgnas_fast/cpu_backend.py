"""The `cpu` backend: the op set in C++ with OpenMP (`pgnas_fast._C.cpu`, csrc/cpu/), design.md layer 6.

The fast path when there is no GPU. Inputs arrive validated (pgnas_fast.ops); the bindings check
again and name the argument. This module is the thin layer between the backend interface (the
functions of `pgnas_fast.reference`) and the bindings: it brings tensors to a layout the kernels read
and gives every output the layout of `torch.empty_like(input)`, as the custom ops' fake kernels say.

Layouts: the kernels read dense NCHW and dense channels_last (NHWC) directly. Any other strided view
(a channel slice, a transpose, an expanded tensor) is copied to contiguous once, because a strided
kernel for every view would cost more code than the one copy costs time; such views are rare on the
training path (convolutions produce dense outputs). The `cuda` backend (pgnas_fast.cuda_backend)
reuses this layer over `_C.cuda`.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from . import reference
from .reference import common_dtype, math_dtype, stacked_empty_like

_NOTE = Path(__file__).with_name("_C.unavailable.txt")  # written by setup.py when _C did not build

try:
    from . import _C
except ImportError as _err:  # not built here: unavailable_reason() says why
    _C = None
    _IMPORT_ERROR = str(_err)
else:
    _IMPORT_ERROR = None


def extension_unavailable_reason() -> str | None:
    """Why `pgnas_fast._C` cannot be used, or None when it imported."""
    if _C is not None:
        return None
    if _NOTE.exists():
        return _NOTE.read_text().strip()
    return (
        f"the C++ extension pgnas_fast._C is not built ({_IMPORT_ERROR}); install with a C++ compiler "
        "(pip install -e .) to enable it"
    )


def unavailable_reason() -> str | None:
    return extension_unavailable_reason()


def _kernel_format(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format the kernels can read `t` in without a copy, or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _in_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format)  # a no-op when t already is


def _like(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`result` (in a kernel format) with the layout of torch.empty_like(like): a copy only if they differ."""
    memory_format = _kernel_format(like)
    if memory_format is not None and result.is_contiguous(memory_format=memory_format):
        return result  # empty_like keeps a dense tensor's strides
    target = torch.empty_like(like)
    if target.stride() == result.stride():
        return result
    return target.copy_(result)


class NativeOps:
    """The backend interface over one `_C` submodule (`_C.cpu` or `_C.cuda`)."""

    def __init__(self, ops: ModuleType | None):
        self._ops = ops

    def philox_uniform(self, n: int, seed: int, stream: int, offset: int, device: torch.device) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.float32, device=device)
        if n:
            self._ops.philox_uniform_out(out, seed, stream, offset)
        return out

    def gate_keep(self, p_logit, batch, seed, stream, tau, mode, offset):
        return self._ops.gate_keep(p_logit.contiguous(), batch, seed, stream, tau, mode, offset)

    def candidate_keep(self, p_logit, candidates, seed, layer, domain):
        return self._ops.candidate_keep(p_logit.contiguous(), candidates.contiguous(), seed, layer, domain)

    def gate_keep_backward(self, grad_keep, keep, tau, mode):
        keep = keep.contiguous()
        return self._ops.gate_keep_backward(grad_keep.to(keep.dtype).contiguous(), keep, tau, mode)

    def gated_apply(self, x, p_logit, seed, stream, tau, mode, offset):
        memory_format = _kernel_format(x) or torch.contiguous_format
        out = self._ops.gated_apply(_in_format(x, memory_format), p_logit.contiguous(), seed, stream, tau, mode, offset)
        return _like(out, x)

    def gated_apply_backward(self, grad, x, p_logit, seed, stream, tau, mode, offset):
        memory_format = _kernel_format(x) or torch.contiguous_format
        x_k = _in_format(x, memory_format)
        grad_k = _in_format(grad.to(x.dtype), memory_format)
        grad_x, grad_p = self._ops.gated_apply_backward(grad_k, x_k, p_logit.contiguous(), seed, stream, tau, mode,
                                                        offset)
        return _like(grad_x, x), grad_p

    def gated_copies(self, x, p_logits, seed, streams, tau, mode, offset, relu):
        memory_format = _kernel_format(x) or torch.contiguous_format
        # a copied x (a strided view) is contiguous, and so are the stacked copies of such an x: the
        # kernels' output already has the layout the custom op promises
        return self._ops.gated_copies(_in_format(x, memory_format), p_logits.contiguous(), seed, list(streams), tau,
                                      mode, offset, relu)

    def gated_copies_backward(self, grad, x, p_logits, seed, streams, tau, mode, offset, relu):
        memory_format = _kernel_format(x) or torch.contiguous_format
        x_k = _in_format(x, memory_format)
        layout = stacked_empty_like(x_k, len(streams))  # the kernels read the copies' layout
        grad_k = grad if grad.dtype == x.dtype and grad.stride() == layout.stride() else layout.copy_(grad)
        grad_x, grad_p = self._ops.gated_copies_backward(grad_k, x_k, p_logits.contiguous(), seed, list(streams), tau,
                                                         mode, offset, relu)
        return _like(grad_x, x), grad_p

    @staticmethod
    def _affine_gate_inputs(scale, shift, p_logit):
        """scale, shift, p_logit in one gate dtype (the kernels take one): float64 if any is."""
        dtype = math_dtype(scale, shift, p_logit)
        return [t.to(dtype).contiguous() for t in (scale, shift, p_logit)]

    @staticmethod
    def _gates_narrower(scale, shift, p_logit) -> bool:
        """float32 p_logit with a float64 scale or shift: the gates are drawn in float32 and the affine map
        runs in float64 (the reference's rule), which the kernels, with one gate dtype, cannot do; they
        drew float64 gates, and hard masks then differed from the reference's near ties. This mix only
        occurs on gradcheck-like paths, so the reference runs it."""
        return p_logit.dtype != math_dtype(scale, shift, p_logit)

    def affine_relu_gate(self, x, scale, shift, p_logit, seed, stream, tau, mode, offset):
        if self._gates_narrower(scale, shift, p_logit):
            return reference.affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, mode, offset)
        memory_format = _kernel_format(x) or torch.contiguous_format
        out = self._ops.affine_relu_gate(_in_format(x, memory_format), *self._affine_gate_inputs(scale, shift, p_logit),
                                         seed, stream, tau, mode, offset)
        return _like(out, x)

    def affine_relu_gate_backward(self, grad, x, scale, shift, p_logit, seed, stream, tau, mode, offset):
        if self._gates_narrower(scale, shift, p_logit):
            return reference.affine_relu_gate_backward(grad, x, scale, shift, p_logit, seed, stream, tau, mode, offset)
        memory_format = _kernel_format(x) or torch.contiguous_format
        grad_x, grad_scale, grad_shift, grad_p = self._ops.affine_relu_gate_backward(
            _in_format(grad.to(x.dtype), memory_format), _in_format(x, memory_format),
            *self._affine_gate_inputs(scale, shift, p_logit), seed, stream, tau, mode, offset)
        return (_like(grad_x, x), grad_scale.to(scale.dtype), grad_shift.to(shift.dtype), grad_p.to(p_logit.dtype))

    @staticmethod
    def _branch_inputs(ys, *others):
        """ys and others (None allowed) in one kernel-readable format, that of ys[0] when possible."""
        memory_format = _kernel_format(ys[0]) or torch.contiguous_format
        dtype = ys[0].dtype
        ys_k = [_in_format(y, memory_format) for y in ys]
        others_k = [None if t is None else _in_format(t.to(dtype), memory_format) for t in others]
        return ys_k, others_k

    def branch_combine(self, ys, weights, skip):
        ys_k, (skip_k,) = self._branch_inputs(ys, skip)
        out = self._ops.branch_combine(ys_k, weights.contiguous(), skip_k)
        return _like(out, ys[0])

    def branch_combine_backward(self, grad, ys, weights, backward_weights):
        ys_k, (grad_k,) = self._branch_inputs(ys, grad)
        if backward_weights is not None:
            backward_weights = backward_weights.to(weights.dtype).contiguous()
        grad_ys, grad_w = self._ops.branch_combine_backward(grad_k, ys_k, weights.contiguous(), backward_weights)
        return [_like(g, y) for g, y in zip(grad_ys, ys)], grad_w

    def regularizer(self, weights, p_logits, weight_reg, drop_reg, n_train):
        return self._ops.regularizer([w.contiguous() for w in weights], [p.contiguous() for p in p_logits],
                                     weight_reg, drop_reg, n_train)

    def regularizer_backward(self, grad, weights, p_logits, weight_reg, drop_reg, n_train):
        return self._ops.regularizer_backward(grad, *_one_dtype_each(weights, p_logits), weight_reg, drop_reg,
                                              n_train)

    # ---- the Gaussian family: eps is indexed by the logical (row-major) position, so any layout
    # gives the same draw; the kernels read the dense ones in place and others after one copy
    @staticmethod
    def _strided_like(t, like):
        """t with exactly like's strides (the bindings compare them; dense tensors can differ in the
        strides of size-1 dims): a copy only when they differ."""
        return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)

    def gaussian_noise(self, mu, var, seed, stream, offset):
        memory_format = _kernel_format(mu) or torch.contiguous_format
        mu_k = _in_format(mu, memory_format)
        var_k = self._strided_like(_in_format(var, memory_format), mu_k)
        return _like(self._ops.gaussian_noise(mu_k, var_k, seed, stream, offset), mu)

    def gaussian_noise_backward(self, grad, var, seed, stream, offset):
        memory_format = _kernel_format(var) or torch.contiguous_format
        var_k = _in_format(var, memory_format)
        grad_k = self._strided_like(_in_format(grad.to(var.dtype), memory_format), var_k)
        return _like(self._ops.gaussian_noise_backward(grad_k, var_k, seed, stream, offset), var)

    def gaussian_kl(self, log_alphas, weights_per_channel, n_train):
        return self._ops.gaussian_kl([a.contiguous() for a in log_alphas], list(weights_per_channel), n_train)

    def gaussian_kl_backward(self, grad, log_alphas, weights_per_channel, n_train):
        dtype = math_dtype(*log_alphas)  # the flat gradient's, as regularizer_backward
        return self._ops.gaussian_kl_backward(grad, [a.to(dtype).contiguous() for a in log_alphas],
                                              list(weights_per_channel), n_train)


def _one_dtype_each(weights, p_logits):
    """The gradient ops' inputs: flat gradients have one dtype per kind (the op contract), so a mixed
    list is promoted (exactly, to its widest dtype) by a copy (rare)."""
    wdtype, gdtype = common_dtype(weights), math_dtype(*p_logits)
    return [w.to(wdtype).contiguous() for w in weights], [p.to(gdtype).contiguous() for p in p_logits]


def backend_functions(impl: NativeOps) -> dict:
    """The backend interface of `impl`: its public methods by op name. A backend module exports these
    (written once here, so an op added to NativeOps reaches both native backends)."""
    return {name: getattr(impl, name) for name in vars(NativeOps) if not name.startswith("_")}


_impl = NativeOps(None if _C is None else _C.cpu)
globals().update(backend_functions(_impl))


def regularizer_with_grad(weights, p_logits, weight_reg, drop_reg, n_train):
    """(R, the flat weight gradient, the flat p_logit gradient) for an upstream gradient of 1, from one
    read of the weights: the eager regulariser's fused path (ops/_library.py). CPU only, where
    checking that the upstream gradient is 1 costs no device sync."""
    return _C.cpu.regularizer_with_grad(*_one_dtype_each(weights, p_logits), weight_reg, drop_reg, n_train)
