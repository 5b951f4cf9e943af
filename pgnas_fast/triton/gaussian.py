"""The Gaussian posterior family in Triton (design.md "Gaussian family"): gaussian_noise, the
local-reparameterization epilogue, and gaussian_kl, the whole network's Molchanov KL, with their
backward ops.

- gaussian_noise: out = mu + sqrt(max(var, 0) + 1e-8) eps in one pass; the backward pass
  regenerates eps from (seed, stream, offset) (never stored) and writes d var in one pass. eps of an
  element is Box-Muller on the contract's uniforms of Philox words 0 and 1 of counter offset + i, i
  its flat row-major index in the tensor's logical shape, evaluated in float64 and rounded to float32
  (`pgnas_fast.reference.philox.normal`). Kernels walk memory in order and derive i from the
  position: dense row-major (i is the position) and dense channels_last (4-D) tensors are read in
  place. Any other strided view (a channel slice, a transpose) is copied to contiguous once: a strided
  kernel per view would cost more code than the copy costs time, and such views do not come out of
  convolutions, whose outputs this epilogue takes.
- gaussian_kl: multi-tensor, as `regularizer.py` (cached tables, `tables`): an int64 layer table (log
  alpha address, channel count, weights_per_channel / n_train as float64 bits, the layer's first
  channel in the flat gradient) and an int32 block table of (layer, first channel) items; however
  many layers, the value takes one kernel launch (the last program adds the blocks' partials) and the
  gradients one, written into one flat buffer (the op contract, pgnas_fast.ops._library).
"""
from __future__ import annotations

import itertools
import struct

import torch
import triton
import triton.language as tl

from ..reference import math_dtype
from . import tables
from .gates import log1p
from .philox import as_u32, philox4x32_10, split_u64, word_uniform

NOISE_ARGS = ["n", "offset_lo", "offset_hi", "seed_lo", "seed_hi", "stream_lo", "stream_hi"]  # never specialise
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)  # the reference's 2.0 * math.pi
VAR_EPS: tl.constexpr = tl.constexpr(1e-8)
KL_K1: tl.constexpr = tl.constexpr(0.63576)
KL_K2: tl.constexpr = tl.constexpr(1.87320)
KL_K3: tl.constexpr = tl.constexpr(1.48695)
KL_TABLE_COLUMNS: tl.constexpr = tl.constexpr(4)  # log alpha address, channels, scale, first gradient channel
KL_BLOCK_C = 256


@triton.jit
def _normal_at(e, C, S, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo, stream_hi, CHANNELS_LAST: tl.constexpr):
    """float32 eps of the elements at memory positions e (int64) of a dense tensor."""
    if CHANNELS_LAST:  # memory [B, S, C] of the logical [B, C, S]
        c = e % C
        rest = e // C
        i = ((rest // S) * C + c) * S + rest % S
    else:
        i = e
    # counter offset + i as two uint32 words; the low word may carry into the high one
    i_lo = as_u32(offset_lo) + (i & 0xFFFFFFFF).to(tl.uint32)
    carry = (i_lo < as_u32(offset_lo)).to(tl.uint32)
    i_hi = as_u32(offset_hi) + (i >> 32).to(tl.uint32) + carry
    zero = tl.zeros(i_lo.shape, tl.uint32)
    w0, w1, _, _ = philox4x32_10(i_lo, i_hi, as_u32(stream_lo) + zero, as_u32(stream_hi) + zero,
                                 as_u32(seed_lo) + zero, as_u32(seed_hi) + zero)
    u1 = word_uniform(w0).to(tl.float64)
    u2 = word_uniform(w1).to(tl.float64)
    # Box-Muller in float64, rounded once (2 pi built as a float64 constant: a bare Python float
    # would be a float32 one)
    two_pi = tl.full([], TWO_PI, tl.float64)
    return (tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(two_pi * u2)).to(tl.float32)  # float64 sqrt is exact


@triton.jit
def _std(v, COMPUTE_F64: tl.constexpr):
    """sqrt(max(var, 0) + 1e-8), rounded correctly (tl.sqrt is approximate in float32); a NaN var
    stays NaN, as with torch's clamp_min."""
    # one return at the end: Triton's compiler also visits what follows a constexpr branch's return
    if COMPUTE_F64:
        std = tl.sqrt(tl.where(v < 0.0, 0.0, v) + tl.full([], VAR_EPS, tl.float64))
    else:
        std = tl.sqrt_rn(tl.where(v < 0.0, 0.0, v) + tl.full([], VAR_EPS, tl.float32))
    return std


@triton.jit(do_not_specialize=NOISE_ARGS)
def _gaussian_noise_kernel(mu_ptr, var_ptr, out_ptr, n, C, S, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo,
                           stream_hi, CHANNELS_LAST: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    eps = _normal_at(e, C, S, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo, stream_hi, CHANNELS_LAST)
    mu = tl.load(mu_ptr + e, mask=mask, other=0.0).to(dtype)
    v = tl.load(var_ptr + e, mask=mask, other=0.0).to(dtype)
    out = mu + _std(v, COMPUTE_F64) * eps.to(dtype)
    tl.store(out_ptr + e, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=NOISE_ARGS)
def _gaussian_noise_backward_kernel(grad_ptr, var_ptr, grad_var_ptr, n, C, S, offset_lo, offset_hi, seed_lo, seed_hi,
                                    stream_lo, stream_hi, CHANNELS_LAST: tl.constexpr, COMPUTE_F64: tl.constexpr,
                                    BLOCK: tl.constexpr):
    """d var = grad eps / (2 sqrt(var + 1e-8)) where var > 0, else 0."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    eps = _normal_at(e, C, S, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo, stream_hi, CHANNELS_LAST)
    g = tl.load(grad_ptr + e, mask=mask, other=0.0).to(dtype)
    v = tl.load(var_ptr + e, mask=mask, other=0.0).to(dtype)
    d = g * eps.to(dtype) / (2.0 * _std(v, COMPUTE_F64))
    tl.store(grad_var_ptr + e, tl.where(v > 0.0, d, 0.0).to(grad_var_ptr.dtype.element_ty), mask=mask)


# ---- the KL -----------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _kl_layer_block(table_ptr, blocks_ptr, a_like, G_TYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (layer, log alpha pointer, channels c, mask, scale) from the tables."""
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    c = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BLOCK_C)
    row = table_ptr + layer * KL_TABLE_COLUMNS
    a_ptr = tl.load(row + 0).to(a_like.dtype)
    mask = c < tl.load(row + 1)
    scale = tl.load(row + 2).to(tl.float64, bitcast=True).to(G_TYPE)
    return layer, a_ptr, c, mask, scale


@triton.jit
def _gaussian_kl_kernel(table_ptr, blocks_ptr, partial_ptr, counter_ptr, out_ptr, n_programs, a_like,
                        G_TYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = sum over blocks of scale * sum_c (K1 - K1 sigmoid(K2 + K3 a) + 0.5 softplus(-a)), the first
    two terms as K1 sigmoid(-(K2 + K3 a)): no subtraction that cancels for large a."""
    _layer, a_ptr, c, mask, scale = _kl_layer_block(table_ptr, blocks_ptr, a_like, G_TYPE, BLOCK_C)
    a = tl.load(a_ptr + c, mask=mask, other=0.0).to(G_TYPE)
    k1 = tl.full([], KL_K1, G_TYPE)
    t = tl.full([], KL_K2, G_TYPE) + tl.full([], KL_K3, G_TYPE) * a
    softplus = tl.maximum(-a, 0.0) + log1p(tl.exp(-tl.abs(a)))  # softplus(-a), no overflow
    term = tl.where(mask, k1 * _sigmoid(-t) + 0.5 * softplus, 0.0)
    tables.sum_when_last(partial_ptr, scale * tl.sum(term, axis=0), counter_ptr, out_ptr, n_programs, G_TYPE)


@triton.jit
def _gaussian_kl_backward_kernel(table_ptr, blocks_ptr, grad_ptr, grad_flat, a_like, G_TYPE: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
    """d a = grad scale (-K1 K3 s (1 - s) - 0.5 sigmoid(-a)), s = sigmoid(t), t = K2 + K3 a, 1 - s = sigmoid(-t)."""
    layer, a_ptr, c, mask, scale = _kl_layer_block(table_ptr, blocks_ptr, a_like, G_TYPE, BLOCK_C)
    ga_ptr = grad_flat + tl.load(table_ptr + layer * KL_TABLE_COLUMNS + 3)
    a = tl.load(a_ptr + c, mask=mask, other=0.0).to(G_TYPE)
    t = tl.full([], KL_K2, G_TYPE) + tl.full([], KL_K3, G_TYPE) * a
    d = -tl.full([], KL_K1 * KL_K3, G_TYPE) * _sigmoid(t) * _sigmoid(-t) - 0.5 * _sigmoid(-a)
    tl.store(ga_ptr + c, tl.load(grad_ptr).to(G_TYPE) * scale * d, mask=mask)


# ---- wrappers (inputs are validated by pgnas_fast.ops) --------------------------------------------
def _kernel_view(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(t, channels_last?) when the kernels read t in place, else (a contiguous copy, False)."""
    if t.is_contiguous():
        return t, False
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t, True
    return t.contiguous(), False


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _block(n: int, device: torch.device) -> int:
    # GPU: 1024 elements per program; the CPU interpreter pays per program, so big blocks
    return min(triton.next_power_of_2(n), 1024 if device.type == "cuda" else 1 << 15)


def _noise_launch(kernel, first: torch.Tensor, second: torch.Tensor, like: torch.Tensor, seed, stream, offset):
    """Runs `kernel` on (first, second) in like's kernel layout; the output has empty_like(like)'s layout."""
    out = torch.empty_like(like)
    if like.numel() == 0:
        return out
    like_k, channels_last = _kernel_view(like)
    first_k, second_k = (like_k if t is like else _in_layout(t, channels_last) for t in (first, second))
    out_k = out if out.stride() == like_k.stride() else torch.empty_like(like_k)
    n = like.numel()
    C, S = (like.shape[1], like.shape[2] * like.shape[3]) if channels_last else (1, n)
    block = _block(n, like.device)
    kernel[(triton.cdiv(n, block),)](
        first_k, second_k, out_k, n, C, S, *split_u64(offset), *split_u64(seed), *split_u64(stream),
        CHANNELS_LAST=channels_last, COMPUTE_F64=like.dtype == torch.float64, BLOCK=block)
    if out_k is not out:
        out.copy_(out_k)
    return out


def gaussian_noise(mu, var, seed, stream, offset):
    return _noise_launch(_gaussian_noise_kernel, mu, var.to(mu.dtype), mu, seed, stream, offset)


def gaussian_noise_backward(grad, var, seed, stream, offset):
    return _noise_launch(_gaussian_noise_backward_kernel, grad.to(var.dtype), var, var, seed, stream, offset)


def _kl_tables(alphas, weights_per_channel, n_train):
    """(layer table, block table) of the log alphas, cached (`tables`)."""
    scales = [count / n_train for count in weights_per_channel]
    device = alphas[0].device

    def layers():
        starts = itertools.accumulate((a.shape[0] for a in alphas), initial=0)
        return [[a.data_ptr(), a.shape[0], struct.unpack("<q", struct.pack("<d", scale))[0], start]
                for a, scale, start in zip(alphas, scales, starts)]

    def blocks():
        return [[layer, c] for layer, a in enumerate(alphas) for c in range(0, a.shape[0], KL_BLOCK_C)]

    layer_key = ("kl layers", tuple(tables.tensor_key(a) for a in alphas), tuple(scales))
    block_key = ("kl blocks", tuple(a.shape[0] for a in alphas))
    return tables.cached(layer_key, layers, torch.int64, device), tables.cached(block_key, blocks, torch.int32, device)


_TL_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def gaussian_kl(log_alphas, weights_per_channel, n_train):
    dtype = math_dtype(*log_alphas)
    alphas = [a.to(dtype).contiguous() for a in log_alphas]
    device = alphas[0].device
    table, blocks = _kl_tables(alphas, weights_per_channel, n_train)
    n_blocks = blocks.shape[0]
    if n_blocks == 0:  # every layer empty: no launch (a grid of 0 programs)
        return torch.zeros((), dtype=dtype, device=device)
    out = torch.empty((), dtype=dtype, device=device)
    partial = torch.empty(n_blocks, dtype=dtype, device=device)
    _gaussian_kl_kernel[(n_blocks,)](table, blocks, partial, tables.ticket_counter(device), out, n_blocks, alphas[0],
                                     G_TYPE=_TL_TYPES[dtype], BLOCK_C=KL_BLOCK_C)
    return out


def gaussian_kl_backward(grad, log_alphas, weights_per_channel, n_train):
    dtype = math_dtype(*log_alphas)
    alphas = [a.to(dtype).contiguous() for a in log_alphas]
    grad_flat = torch.empty(sum(a.shape[0] for a in alphas), dtype=dtype, device=alphas[0].device)
    table, blocks = _kl_tables(alphas, weights_per_channel, n_train)
    if blocks.shape[0]:
        _gaussian_kl_backward_kernel[(blocks.shape[0],)](table, blocks, grad.to(dtype), grad_flat, alphas[0],
                                                         G_TYPE=_TL_TYPES[dtype], BLOCK_C=KL_BLOCK_C)
    return grad_flat
