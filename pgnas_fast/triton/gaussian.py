"""The Gaussian posterior family in Triton (design.md "Gaussian family"): gaussian_noise, the
local-reparameterization epilogue, and gaussian_kl, the whole network's Molchanov KL, with their
backward ops.

- gaussian_noise: out = mu + sqrt(max(var, 0) + 1e-8) eps in one pass; the backward pass
  regenerates eps from (seed, stream, offset) (never stored) and writes d var in one pass. eps of the
  element of logical index j (offset + its flat row-major index in the tensor's logical shape) is lane
  j mod 4 of the four normals of Philox counter j div 4 (`pgnas_fast.reference.philox.normal_quads`),
  so a program draws one counter per quad of elements. Dense row-major tensors are read as tiles of
  whole quads; dense channels_last (4-D) tensors as quads of four spatial rows when the quads line up
  with channels (H W and offset multiples of 4), else element by element. Any other strided view (a
  channel slice, a transpose) is copied to contiguous once: a strided kernel per view would cost more
  code than the copy costs time, and such views do not come out of convolutions, whose outputs this
  epilogue takes.
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

from ..reference import math_dtype, philox
from . import tables
from .gates import log1p
from .philox import EXACT, U_SCALE, as_u32, philox4x32_10, split_u64, word_uniform

# never specialised; but the dense kernel specialises n (n % 16: masks of whole vectors)
NOISE_ARGS = ["n", "offset_lo", "offset_hi", "seed_lo", "seed_hi", "stream_lo", "stream_hi"]
# float32 constants of the normal (reference philox: LN2, SQRT2, LOG_SERIES, COS_SERIES, SIN_SERIES)
LN2: tl.constexpr = tl.constexpr(philox.LN2)
SQRT2: tl.constexpr = tl.constexpr(philox.SQRT2)
LOG_S1, LOG_S2, LOG_S3, LOG_S4 = (tl.constexpr(c) for c in philox.LOG_SERIES)
COS_C1, COS_C2, COS_C3, COS_C4, COS_C5 = (tl.constexpr(c) for c in philox.COS_SERIES)
SIN_S0, SIN_S1, SIN_S2, SIN_S3, SIN_S4 = (tl.constexpr(c) for c in philox.SIN_SERIES)
VAR_EPS: tl.constexpr = tl.constexpr(1e-8)
KL_K1: tl.constexpr = tl.constexpr(0.63576)
KL_K2: tl.constexpr = tl.constexpr(1.87320)
KL_K3: tl.constexpr = tl.constexpr(1.48695)
KL_TABLE_COLUMNS: tl.constexpr = tl.constexpr(4)  # log alpha address, channels, scale, first gradient channel
KL_BLOCK_C = 256


# ---- eps: the Gaussian family's normal (pgnas_fast.reference.philox.normal_quads) -------------------
# Counter q gives the normals of elements 4q .. 4q + 3: Box-Muller on the word pairs (w0, w1) and (w2, w3)
# with log, cos and sin as float32 series. Every operation is rounded to nearest in the reference's
# order: float32 adds and multiplies (kernels launch with philox.EXACT: no fma contraction),
# div_rn and sqrt_rn (Triton's plain / and sqrt are approximate on the GPU).
@triton.jit
def _log_f32(u):
    """reference philox.log_f32: u = m 2^e, m in [sqrt(1/2), sqrt 2), e log 2 + 2 atanh((m - 1) / (m + 1))."""
    bits = u.to(tl.uint32, bitcast=True)
    raw = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # in [1, 2)
    high = raw > SQRT2
    m = tl.where(high, raw * 0.5, raw)
    e = (((bits >> 23) & 0xFF).to(tl.int32) - 127 + high.to(tl.int32)).to(tl.float32)
    s = tl.div_rn(m - 1.0, m + 1.0)
    z = s * s
    series = ((z * LOG_S4 + LOG_S3) * z + LOG_S2) * z + LOG_S1
    return e * LN2 + ((s + s) + (s * z) * series)


@triton.jit
def _turn_cos_sin(word):
    """reference philox.turn_cos_sin: (cos, sin) of 2 pi ((word >> 8) + 0.5) 2^-24."""
    k = (word >> 8).to(tl.int32)
    q = (k + (1 << 21)) >> 22  # the nearest quarter turn
    x = ((k - (q << 22)).to(tl.float32) + 0.5) * U_SCALE  # the rest, in [-1/8, 1/8]: exact
    y = x * x
    c = ((((y * COS_C5 + COS_C4) * y + COS_C3) * y + COS_C2) * y + COS_C1) * y + 1.0
    s = ((((y * SIN_S4 + SIN_S3) * y + SIN_S2) * y + SIN_S1) * y + SIN_S0) * x
    quarter = q & 3
    cos = tl.where(quarter == 0, c, tl.where(quarter == 1, -s, tl.where(quarter == 2, -c, s)))
    sin = tl.where(quarter == 0, s, tl.where(quarter == 1, c, tl.where(quarter == 2, -s, -c)))
    return cos, sin


@triton.jit
def _box_muller(radius_word, turn_word):
    radius = tl.sqrt_rn(-2.0 * _log_f32(word_uniform(radius_word)))
    cos, sin = _turn_cos_sin(turn_word)
    return radius * cos, radius * sin


@triton.jit
def _quad_words(quad, seed_lo, seed_hi, stream_lo, stream_hi):
    """Philox words of counters `quad` (int64, < 2^62)."""
    zero = tl.zeros(quad.shape, tl.uint32)
    return philox4x32_10((quad & 0xFFFFFFFF).to(tl.uint32), (quad >> 32).to(tl.uint32), as_u32(stream_lo) + zero,
                         as_u32(stream_hi) + zero, as_u32(seed_lo) + zero, as_u32(seed_hi) + zero)


@triton.jit
def _normal_quads(quad, seed_lo, seed_hi, stream_lo, stream_hi):
    """The four normals (lanes 0..3) of counters `quad`."""
    w0, w1, w2, w3 = _quad_words(quad, seed_lo, seed_hi, stream_lo, stream_hi)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    return n0, n1, n2, n3


@triton.jit
def _lane(lane, n0, n1, n2, n3):
    """The normal of lane `lane` (0..3, a tensor or constexpr broadcast against the n's)."""
    return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _u64(lo, hi):
    """An int64 from split_u64's halves (a value below 2^63)."""
    return as_u32(lo).to(tl.int64) | (hi.to(tl.int64) << 32)


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


@triton.jit
def _noise_at(first_ptr, var_ptr, out_ptr, e, mask, eps, BACKWARD: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """Forward (first = mu): out = mu + std eps. Backward (first = grad): out = d var = grad eps / (2 std)
    where var > 0, else 0. At memory positions e."""
    dtype = tl.float64 if COMPUTE_F64 else tl.float32
    a = tl.load(first_ptr + e, mask=mask, other=0.0).to(dtype)
    v = tl.load(var_ptr + e, mask=mask, other=0.0).to(dtype)
    if BACKWARD:
        numerator, denominator = a * eps.to(dtype), 2.0 * _std(v, COMPUTE_F64)
        if COMPUTE_F64:  # float64 `/` is correctly rounded; float32's is approximate on the GPU
            out = tl.where(v > 0.0, numerator / denominator, 0.0)
        else:
            out = tl.where(v > 0.0, tl.div_rn(numerator, denominator), 0.0)
    else:
        out = a + _std(v, COMPUTE_F64) * eps.to(dtype)
    tl.store(out_ptr + e, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=NOISE_ARGS[1:])
def _noise_dense_kernel(first_ptr, var_ptr, out_ptr, n, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo, stream_hi,
                        LEAD: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Dense row-major data (the memory position is the logical index): BLOCK_Q whole quads, one Philox
    counter each, their normals interleaved into one run of 4 BLOCK_Q elements (contiguous: vector
    loads). LEAD = offset mod 4: element e is lane (e + LEAD) mod 4."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # quads from the first one
    n0, n1, n2, n3 = _normal_quads((_u64(offset_lo, offset_hi) >> 2) + k, seed_lo, seed_hi, stream_lo, stream_hi)
    # [q, pair, lane in pair] -> element 4 q + 2 pair + lane
    eps = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [4 * BLOCK_Q])
    e = tl.program_id(0).to(tl.int64) * (4 * BLOCK_Q) + tl.arange(0, 4 * BLOCK_Q) - LEAD
    mask = e < n  # specialised on n % 16: a mask the compiler can see is whole vectors
    if LEAD != 0:
        mask = mask & (e >= 0)
    _noise_at(first_ptr, var_ptr, out_ptr, e, mask, eps, BACKWARD, COMPUTE_F64)


@triton.jit(do_not_specialize=NOISE_ARGS)
def _noise_channels_last_kernel(first_ptr, var_ptr, out_ptr, n, C, S, offset_lo, offset_hi, seed_lo, seed_hi,
                                stream_lo, stream_hi, BACKWARD: tl.constexpr, COMPUTE_F64: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """channels_last [B, S, C] with S and offset multiples of 4: the quad of logical (b, c, s) is
    positions s .. s + 3 (s a multiple of 4) of one channel. A [BLOCK_P, BLOCK_C] tile of (b, quarter
    row) pairs x channels draws its quads once and reads them as four channel rows (coalesced)."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # (b, s // 4) pairs
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    quarters = S // 4
    b = p // quarters
    s0 = (p % quarters) * 4
    quad = (_u64(offset_lo, offset_hi) >> 2) + ((b[:, None] * C + c[None, :]) * quarters + (p % quarters)[:, None])
    n0, n1, n2, n3 = _normal_quads(quad, seed_lo, seed_hi, stream_lo, stream_hi)
    mask = (p[:, None] < n // (4 * C)) & (c[None, :] < C)
    for lane in tl.static_range(4):
        e = (b * S + s0 + lane)[:, None] * C + c[None, :]
        _noise_at(first_ptr, var_ptr, out_ptr, e, mask, _lane(lane, n0, n1, n2, n3), BACKWARD, COMPUTE_F64)


@triton.jit(do_not_specialize=NOISE_ARGS)
def _noise_elements_kernel(first_ptr, var_ptr, out_ptr, n, C, S, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo,
                           stream_hi, BACKWARD: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    """Any other channels_last tensor (quads that straddle channels): every element draws its own pair."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = e % C  # memory [B, S, C] of the logical [B, C, S]
    rest = e // C
    j = _u64(offset_lo, offset_hi) + ((rest // S) * C + c) * S + rest % S
    w0, w1, w2, w3 = _quad_words(j >> 2, seed_lo, seed_hi, stream_lo, stream_hi)
    second_pair = (j & 2) != 0
    cos, sin = _box_muller(tl.where(second_pair, w2, w0), tl.where(second_pair, w3, w1))
    _noise_at(first_ptr, var_ptr, out_ptr, e, e < n, tl.where((j & 1) != 0, sin, cos), BACKWARD, COMPUTE_F64)


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


def _noise_launch(first: torch.Tensor, second: torch.Tensor, like: torch.Tensor, seed, stream, offset, backward):
    """Runs the noise pass on (first, second) in like's kernel layout; the output has empty_like(like)'s layout."""
    out = torch.empty_like(like)
    if like.numel() == 0:
        return out
    like_k, channels_last = _kernel_view(like)
    first_k, second_k = (like_k if t is like else _in_layout(t, channels_last) for t in (first, second))
    out_k = out if out.stride() == like_k.stride() else torch.empty_like(like_k)
    n = like.numel()
    gpu = like.device.type == "cuda"  # the CPU interpreter pays per program: big blocks there
    args = (first_k, second_k, out_k, n)
    rng = (*split_u64(offset), *split_u64(seed), *split_u64(stream))
    flags = dict(BACKWARD=backward, COMPUTE_F64=like.dtype == torch.float64, **EXACT)
    C, S = (like.shape[1], like.shape[2] * like.shape[3]) if channels_last else (1, n)
    if not channels_last:
        block_q = min(triton.next_power_of_2(triton.cdiv(n + 3, 4)), 256 if gpu else 1 << 13)
        grid = (triton.cdiv((offset & 3) + n, 4 * block_q),)
        _noise_dense_kernel[grid](*args, *rng, LEAD=offset & 3, BLOCK_Q=block_q, **flags)
    elif S % 4 == 0 and offset % 4 == 0:
        block_c = min(triton.next_power_of_2(C), 64 if gpu else 1024)
        rows = n // C // 4  # (b, s // 4) pairs
        block_p = min(triton.next_power_of_2(rows), 16 if gpu else max(1, (1 << 13) // block_c))
        grid = (triton.cdiv(rows, block_p), triton.cdiv(C, block_c))
        _noise_channels_last_kernel[grid](*args, C, S, *rng, BLOCK_P=block_p, BLOCK_C=block_c, **flags)
    else:
        block = min(triton.next_power_of_2(n), 1024 if gpu else 1 << 15)
        _noise_elements_kernel[(triton.cdiv(n, block),)](*args, C, S, *rng, BLOCK=block, **flags)
    if out_k is not out:
        out.copy_(out_k)
    return out


def gaussian_noise(mu, var, seed, stream, offset):
    return _noise_launch(mu, var.to(mu.dtype), mu, seed, stream, offset, backward=False)


def gaussian_noise_backward(grad, var, seed, stream, offset):
    return _noise_launch(grad.to(var.dtype), var, var, seed, stream, offset, backward=True)


def _kl_tables(alphas, weights_per_channel, n_train):
    """(layer table, block table) of the log alphas, cached (`tables`; keys as the regulariser's)."""
    scales = [count / n_train for count in weights_per_channel]
    device = alphas[0].device
    shapes = tuple([a.shape for a in alphas])

    def layers():
        starts = itertools.accumulate((a.shape[0] for a in alphas), initial=0)
        return [[a.data_ptr(), a.shape[0], struct.unpack("<q", struct.pack("<d", scale))[0], start]
                for a, scale, start in zip(alphas, scales, starts)]

    def blocks():
        return [[layer, c] for layer, a in enumerate(alphas) for c in range(0, a.shape[0], KL_BLOCK_C)]

    layer_key = ("kl layers", tuple([a.data_ptr() for a in alphas]), shapes, tuple(scales))
    return tables.cached(layer_key, layers, torch.int64, device), tables.cached(("kl blocks", shapes), blocks, torch.int32,
                                                                                  device)


_TL_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def gaussian_kl(log_alphas, weights_per_channel, n_train):
    dtype = math_dtype(*log_alphas)
    alphas = tables.dense(log_alphas, dtype)
    device = alphas[0].device
    table, blocks = _kl_tables(alphas, weights_per_channel, n_train)
    n_blocks = blocks.shape[0]
    if n_blocks == 0:  # every layer empty: no launch (a grid of 0 programs)
        return torch.zeros((), dtype=dtype, device=device)
    out = torch.empty((), dtype=dtype, device=device)
    partial = torch.empty(n_blocks, dtype=dtype, device=device)
    _gaussian_kl_kernel[(n_blocks,)](table, blocks, partial, tables.ticket_counter(device), out, n_blocks, alphas[0],
                                     G_TYPE=_TL_TYPES[dtype], BLOCK_C=KL_BLOCK_C, **EXACT)
    return out


def gaussian_kl_backward(grad, log_alphas, weights_per_channel, n_train):
    dtype = math_dtype(*log_alphas)
    alphas = tables.dense(log_alphas, dtype)
    grad_flat = torch.empty(sum(a.shape[0] for a in alphas), dtype=dtype, device=alphas[0].device)
    table, blocks = _kl_tables(alphas, weights_per_channel, n_train)
    if blocks.shape[0]:
        _gaussian_kl_backward_kernel[(blocks.shape[0],)](table, blocks, grad.to(dtype), grad_flat, alphas[0],
                                                         G_TYPE=_TL_TYPES[dtype], BLOCK_C=KL_BLOCK_C, **EXACT)
    return grad_flat
