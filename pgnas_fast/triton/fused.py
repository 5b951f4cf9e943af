"""Fused variants in Triton (design.md op set): BN affine -> ReLU -> gate, forward and backward.

The kernels are those of `gates.py` (same tiles, layouts, in-kernel gates regenerated from (seed,
stream, offset)) with the affine map and the ReLU applied to x as it is read: one read of x and one
write, where BatchNorm, ReLU and gated_apply make three of each. The backward pass reads dy and x
once and writes dx, with per-(b, c) partial sums for d scale, d shift and (relaxed) d p_logit that a
second small deterministic pass reduces over the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.transfer import to_device
from ..reference import stacked_empty_like
from .gates import (
    MODES,
    RNG_ARGS,
    _as_bcs,
    _compute_f64,
    _grid,
    _out_bcs,
    _reduce_gate_grad,
    _rng,
    _row_gates,
    _rows,
    _tiles,
    _written,
    gate_source,
)
from .philox import EXACT, split_u64


@triton.jit
def _channel_affine(scale_ptr, shift_ptr, c, qmask, DTYPE: tl.constexpr):
    a = tl.load(scale_ptr + c, mask=qmask, other=0.0).to(DTYPE)[:, None]
    b = tl.load(shift_ptr + c, mask=qmask, other=0.0).to(DTYPE)[:, None]
    return a, b


@triton.jit(do_not_specialize=RNG_ARGS)
def _affine_relu_gate_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, p_ptr, n_rows, C, S, sxb, sxc, sxs, sob, soc, sos,
                             seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi, tau_lo,
                             MODE: tl.constexpr, GATE_F64: tl.constexpr, COMPUTE_F64: tl.constexpr,
                             SPLIT_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    q, qmask, b, c = _rows(n_rows, C, BLOCK_Q, SPLIT_ROWS)
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    keep = _row_gates(q, qmask, C, p_ptr, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi,
                      tau_lo, MODE, GATE_F64).to(dtype)[:, None]
    a, shift = _channel_affine(scale_ptr, shift_ptr, c, qmask, dtype)
    x_row = x_ptr + (b * sxb + c * sxc)[:, None]
    out_row = out_ptr + (b * sob + c * soc)[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sl = s.to(tl.int64)[None, :]
        m = qmask[:, None] & (s < S)[None, :]
        x = tl.load(x_row + sl * sxs, mask=m, other=0.0).to(dtype)
        y = tl.maximum(x * a + shift, 0.0, propagate_nan=tl.PropagateNan.ALL) * keep
        tl.store(out_row + sl * sos, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=RNG_ARGS)
def _affine_relu_gate_backward_kernel(dy_ptr, x_ptr, dx_ptr, scale_ptr, shift_ptr, p_ptr, row_scale_ptr,
                                      row_shift_ptr, partial_ptr, n_rows, C, S, sdb, sdc, sds, sxb, sxc, sxs,
                                      sgb, sgc, sgs, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi,
                                      tau_hi, tau_lo, MODE: tl.constexpr, GATE_F64: tl.constexpr,
                                      COMPUTE_F64: tl.constexpr, SPLIT_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr,
                                      BLOCK_S: tl.constexpr):
    """With pre = x a + shift and live = dy keep where pre > 0: dx = live a; per row (b, c) the sums of
    live x and live (d scale, d shift) and, relaxed, of dy relu(pre) times keep (1 - keep)."""
    q, qmask, b, c = _rows(n_rows, C, BLOCK_Q, SPLIT_ROWS)
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    gate = _row_gates(q, qmask, C, p_ptr, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi,
                      tau_lo, MODE, GATE_F64)
    keep = gate.to(dtype)[:, None]
    a, shift = _channel_affine(scale_ptr, shift_ptr, c, qmask, dtype)
    dy_row = dy_ptr + (b * sdb + c * sdc)[:, None]
    x_row = x_ptr + (b * sxb + c * sxc)[:, None]
    dx_row = dx_ptr + (b * sgb + c * sgc)[:, None]
    acc_scale = tl.zeros([BLOCK_Q, BLOCK_S], dtype)
    acc_shift = tl.zeros([BLOCK_Q, BLOCK_S], dtype)
    acc_keep = tl.zeros([BLOCK_Q, BLOCK_S], gate.dtype)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sl = s.to(tl.int64)[None, :]
        m = qmask[:, None] & (s < S)[None, :]
        dy = tl.load(dy_row + sl * sds, mask=m, other=0.0).to(dtype)
        x = tl.load(x_row + sl * sxs, mask=m, other=0.0).to(dtype)
        pre = x * a + shift
        live = tl.where(pre > 0.0, dy * keep, 0.0)
        tl.store(dx_row + sl * sgs, (live * a).to(dx_ptr.dtype.element_ty), mask=m)
        acc_scale += live * x
        acc_shift += live
        if MODE == 0:
            acc_keep += dy.to(gate.dtype) * tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL).to(gate.dtype)
    tl.store(row_scale_ptr + q, tl.sum(acc_scale, axis=1), mask=qmask)
    tl.store(row_shift_ptr + q, tl.sum(acc_shift, axis=1), mask=qmask)
    if MODE == 0:
        tl.store(partial_ptr + q, tl.sum(acc_keep, axis=1) * gate * (1.0 - gate), mask=qmask)


# ---- wrappers (inputs are validated by pgnas_fast.ops) --------------------------------------------
def _launch_shape(x: torch.Tensor, xv: torch.Tensor):
    B, C, S = xv.shape
    block_q, block_s = _tiles(B * C if x.device.type != "cuda" else C, S, xv.stride(2), x.device)
    grid, split_rows = _grid(B, C, block_q, x.device)
    # (EXACT: x * scale + shift rounded twice, as the reference does; a fused multiply-add can put
    # the ReLU on the other side of 0)
    return grid, dict(SPLIT_ROWS=split_rows, BLOCK_Q=block_q, BLOCK_S=block_s, **EXACT)


def affine_relu_gate(x, scale, shift, p_logit, seed, stream, tau, mode, offset):
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    xv, ov = _as_bcs(x), _out_bcs(out)
    B, C, S = xv.shape
    grid, launch = _launch_shape(x, xv)
    _affine_relu_gate_kernel[grid](
        xv, ov, scale, shift, gate_source(p_logit, mode), B * C, C, S, *xv.stride(), *ov.stride(),
        *_rng(seed, stream, offset, tau),
        MODE=MODES[mode], GATE_F64=p_logit.dtype == torch.float64,
        COMPUTE_F64=_compute_f64(x, scale, shift, p_logit), **launch)
    return _written(out, ov)


def affine_relu_gate_backward(grad, x, scale, shift, p_logit, seed, stream, tau, mode, offset):
    grad_x = torch.empty_like(x)
    B, C = x.shape[0], x.shape[1]
    if x.numel() == 0:
        return grad_x, torch.zeros_like(scale), torch.zeros_like(shift), torch.zeros_like(p_logit)
    dyv, xv, gv = _as_bcs(grad), _as_bcs(x), _out_bcs(grad_x)
    S = xv.shape[2]
    f64 = _compute_f64(x, scale, shift, p_logit)
    rows = torch.empty(2, B, C, dtype=torch.float64 if f64 else torch.float32, device=x.device)
    relaxed = mode == "relaxed"
    partial = torch.empty(B, C, dtype=p_logit.dtype, device=x.device) if relaxed else p_logit
    grid, launch = _launch_shape(x, xv)
    _affine_relu_gate_backward_kernel[grid](
        dyv, xv, gv, scale, shift, gate_source(p_logit, mode), rows[0], rows[1], partial, B * C, C, S, *dyv.stride(),
        *xv.stride(), *gv.stride(), *_rng(seed, stream, offset, tau), MODE=MODES[mode],
        GATE_F64=p_logit.dtype == torch.float64, COMPUTE_F64=f64, **launch)
    _written(grad_x, gv)
    grad_scale, grad_shift = rows[0].sum(0), rows[1].sum(0)  # over the batch (separate tensors: no aliasing outputs)
    grad_p = _reduce_gate_grad(partial, partial, tau, False, p_logit.dtype) if relaxed else torch.zeros_like(p_logit)
    return grad_x, grad_scale.to(scale.dtype), grad_shift.to(shift.dtype), grad_p


# ---- one input -> S gated copies ------------------------------------------------------------------
@triton.jit
def _copy_gates(q, qmask, C, p_ptr, streams_ptr, s, seed_lo, seed_hi, offset_lo, offset_hi, tau_hi, tau_lo,
                MODE: tl.constexpr, GATE_F64: tl.constexpr):
    """keep of rows q of copy s: the copy's drop logits are row s of p, its stream words row s of streams."""
    stream_lo = tl.load(streams_ptr + 2 * s)
    stream_hi = tl.load(streams_ptr + 2 * s + 1)
    return _row_gates(q, qmask, C, p_ptr + s * C, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi,
                      tau_lo, MODE, GATE_F64)


@triton.jit(do_not_specialize=RNG_ARGS)
def _gated_copies_kernel(x_ptr, out_ptr, p_ptr, streams_ptr, n_copies, n_rows, C, S, sxb, sxc, sxs, sok, sob, soc,
                         sos, seed_lo, seed_hi, offset_lo, offset_hi, tau_hi, tau_lo, MODE: tl.constexpr,
                         GATE_F64: tl.constexpr, COMPUTE_F64: tl.constexpr, RELU: tl.constexpr,
                         SPLIT_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """Each tile of x is read once and written n_copies times, once per copy's gates."""
    q, qmask, b, c = _rows(n_rows, C, BLOCK_Q, SPLIT_ROWS)
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    x_row = x_ptr + (b * sxb + c * sxc)[:, None]
    out_row = out_ptr + (b * sob + c * soc)[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sl = s.to(tl.int64)[None, :]
        m = qmask[:, None] & (s < S)[None, :]
        x = tl.load(x_row + sl * sxs, mask=m, other=0.0).to(dtype)
        if RELU:
            x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # torch.relu keeps NaN
        for k in range(n_copies):
            keep = _copy_gates(q, qmask, C, p_ptr, streams_ptr, k, seed_lo, seed_hi, offset_lo, offset_hi, tau_hi,
                               tau_lo, MODE, GATE_F64).to(dtype)[:, None]
            tl.store(out_row + tl.cast(k, tl.int64) * sok + sl * sos, (x * keep).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=RNG_ARGS)
def _gated_copies_backward_kernel(dy_ptr, x_ptr, dx_ptr, p_ptr, streams_ptr, partial_ptr, n_copies, n_rows, C, S,
                                  sdk, sdb, sdc, sds, sxb, sxc, sxs, sgb, sgc, sgs, seed_lo, seed_hi, offset_lo,
                                  offset_hi, tau_hi, tau_lo, MODE: tl.constexpr, GATE_F64: tl.constexpr,
                                  COMPUTE_F64: tl.constexpr, RELU: tl.constexpr, SPLIT_ROWS: tl.constexpr,
                                  BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = sum_k dy_k keep_k (times relu'(x)); relaxed: partial[b, k, c] = sum_s dy_k src keep_k (1 - keep_k)
    with src = relu(x) or x. x is read once, each dy_k once."""
    q, qmask, b, c = _rows(n_rows, C, BLOCK_Q, SPLIT_ROWS)
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    dy_row = dy_ptr + (b * sdb + c * sdc)[:, None]
    x_row = x_ptr + (b * sxb + c * sxc)[:, None]
    dx_row = dx_ptr + (b * sgb + c * sgc)[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sl = s.to(tl.int64)[None, :]
        m = qmask[:, None] & (s < S)[None, :]
        x = tl.load(x_row + sl * sxs, mask=m, other=0.0).to(dtype)
        src = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL) if RELU else x
        acc = tl.zeros([BLOCK_Q, BLOCK_S], dtype)
        for k in range(n_copies):
            gate = _copy_gates(q, qmask, C, p_ptr, streams_ptr, k, seed_lo, seed_hi, offset_lo, offset_hi, tau_hi,
                               tau_lo, MODE, GATE_F64)
            dy = tl.load(dy_row + tl.cast(k, tl.int64) * sdk + sl * sds, mask=m, other=0.0).to(dtype)
            acc += dy * gate.to(dtype)[:, None]
            if MODE == 0:  # the spatial blocks' sums meet in partial (zeroed by the wrapper): a program owns its rows
                contrib = tl.sum(dy.to(gate.dtype) * src.to(gate.dtype), axis=1) * gate * (1.0 - gate)
                at = partial_ptr + (b * n_copies + k) * C + c
                tl.store(at, tl.load(at, mask=qmask, other=0.0) + contrib, mask=qmask)
        if RELU:
            acc = tl.where(x > 0.0, acc, 0.0)
        tl.store(dx_row + sl * sgs, acc.to(dx_ptr.dtype.element_ty), mask=m)


def _stream_words(streams, device) -> torch.Tensor:
    """The copies' stream ids as int32 word pairs on `device` (they change every step: not cached)."""
    return to_device(torch.tensor([w for s in streams for w in split_u64(s)], dtype=torch.int32), device,
                     "the gated copies' stream words")


def gated_copies(x, p_logits, seed, streams, tau, mode, offset, relu):
    n_copies = len(streams)
    out = stacked_empty_like(x, n_copies)
    if x.numel() == 0:
        return out
    xv = _as_bcs(x)
    B, C, S = xv.shape
    ov = out.view(n_copies, B, C, S)  # NCHW and channels_last copies both merge their spatial dims
    grid, launch = _launch_shape(x, xv)
    seed_lo, seed_hi, _, _, offset_lo, offset_hi, tau_hi, tau_lo = _rng(seed, 0, offset, tau)
    _gated_copies_kernel[grid](
        xv, ov, gate_source(p_logits, mode), _stream_words(streams, x.device), n_copies, B * C, C, S, *xv.stride(),
        *ov.stride(),
        seed_lo, seed_hi, offset_lo, offset_hi, tau_hi, tau_lo, MODE=MODES[mode],
        GATE_F64=p_logits.dtype == torch.float64, COMPUTE_F64=_compute_f64(x, p_logits), RELU=relu,
        **launch)
    return out


def gated_copies_backward(grad, x, p_logits, seed, streams, tau, mode, offset, relu):
    n_copies = len(streams)
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(p_logits)
    xv, gv = _as_bcs(x), _out_bcs(grad_x)
    B, C, S = xv.shape
    dyv = grad.reshape(n_copies, B, C, S)  # a view for the layouts gated_copies returns
    relaxed = mode == "relaxed"
    partial = torch.zeros(B, n_copies, C, dtype=p_logits.dtype, device=x.device) if relaxed else p_logits
    grid, launch = _launch_shape(x, xv)
    seed_lo, seed_hi, _, _, offset_lo, offset_hi, tau_hi, tau_lo = _rng(seed, 0, offset, tau)
    _gated_copies_backward_kernel[grid](
        dyv, xv, gv, gate_source(p_logits, mode), _stream_words(streams, x.device), partial, n_copies, B * C, C, S,
        *dyv.stride(),
        *xv.stride(), *gv.stride(), seed_lo, seed_hi, offset_lo, offset_hi, tau_hi, tau_lo, MODE=MODES[mode],
        GATE_F64=p_logits.dtype == torch.float64, COMPUTE_F64=_compute_f64(x, p_logits), RELU=relu,
        **launch)
    _written(grad_x, gv)
    if not relaxed:
        return grad_x, torch.zeros_like(p_logits)
    grad_p = _reduce_gate_grad(partial.view(B, n_copies * C), partial, tau, False, p_logits.dtype)
    return grad_x, grad_p.view(n_copies, C)
