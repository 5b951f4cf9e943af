"""Gate sampling and gated apply in Triton: gate_keep, gated_apply and their backward ops.

The gates are never materialised beyond [B, C]: every kernel regenerates keep[b, c] for the rows
of its tile from (seed, stream) and p_logit (a tile of BLOCK_Q rows (b, c) needs BLOCK_Q Philox draws
for BLOCK_Q x S data elements), the FlashAttention-dropout habit of design.md; no RNG launch. Gate
math runs in float32, or float64 when p_logit is float64 (the gradcheck path); the product with the
data in the promoted type of (data, gate), as the reference's torch.mul does.

Layout: x is read as [B, C, S] with S the flattened trailing dims and one stride per axis, which
covers NCHW, channels_last, channel slices and batch/channel permutations without a copy (the
long side of the tile follows whichever axis has stride 1). Trailing dims that do not merge into one stride (e.g. a
spatial transpose) are copied once to contiguous: such inputs do not come out of convolutions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import math_dtype
from .philox import EXACT, as_u32, gate_uniform, joined, split_f64, split_u64

MODES = {"relaxed": 0, "hard": 1, "full": 2}
# new values every step (offset: every rank): never specialise
RNG_ARGS = ["seed_lo", "seed_hi", "stream_lo", "stream_hi", "offset_lo", "offset_hi"]


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small x (tl.math has no log1p): log(y) x / (y - 1) with y = 1 + x."""
    y = 1.0 + x
    d = y - 1.0
    return tl.where(d == 0.0, x, tl.log(y) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def element_offset(offset_lo, offset_hi):
    """The gates' element offset (a `split_u64` pair, below 2^63) as an int64."""
    return (as_u32(offset_hi).to(tl.int64) << 32) | as_u32(offset_lo).to(tl.int64)


@triton.jit
def gate_keep_at(i, z, seed_lo, seed_hi, stream_lo, stream_hi, tau_hi, tau_lo,
                 MODE: tl.constexpr, GATE_F64: tl.constexpr):
    """keep of gate element i (= offset + b * C + c) with drop logit z, in the gate dtype. In hard mode z
    is the drop probability sigmoid(logit) itself, computed by torch (`gate_source`)."""
    if MODE == 2:  # full
        keep = tl.full(z.shape, 1.0, z.dtype)
    else:
        u = gate_uniform(i, seed_lo, seed_hi, stream_lo, stream_hi)
        if GATE_F64:
            u = u.to(tl.float64)
            z = z.to(tl.float64)
        if MODE == 1:  # hard: the authors' 1 - floor(u + p), drop iff u + p >= 1 (z = p here)
            keep = tl.where(u + z < 1.0, 1.0, 0.0).to(z.dtype)  # (a NaN p drops, as the reference's u + p < 1)
        else:  # relaxed: 1 - sigmoid((z + L) / tau) = sigmoid(-(z + L) / tau), L logistic noise
            tau = joined(tau_hi, tau_lo, z.dtype)
            logistic = tl.log(u) - log1p(-u)
            keep = 1.0 / (1.0 + tl.exp((z + logistic) / tau))
    return keep


@triton.jit(do_not_specialize=RNG_ARGS)
def _gate_keep_kernel(p_ptr, keep_ptr, n, C, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi,
                      tau_hi, tau_lo, MODE: tl.constexpr, GATE_F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    z = tl.load(p_ptr + i % C, mask=mask, other=0.0)
    keep = gate_keep_at(i + element_offset(offset_lo, offset_hi), z, seed_lo, seed_hi, stream_lo, stream_hi, tau_hi, tau_lo, MODE, GATE_F64)
    tl.store(keep_ptr + i, keep, mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _candidate_keep_kernel(drop_ptr, ids_ptr, keep_ptr, n, C, seed_lo, seed_hi, layer, domain,
                           BLOCK: tl.constexpr):
    """keep[k, c] = 0 iff u + p >= 1, u of element c of stream domain << 56 | ids[k] << 16 | layer."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    c = j % C
    candidate = tl.load(ids_ptr + j // C, mask=mask, other=0)
    stream_lo = ((candidate << 16) | layer).to(tl.int32)  # the low word (int64 -> int32 keeps the low bits)
    stream_hi = ((candidate >> 16) | (domain << 24)).to(tl.int32)
    u = gate_uniform(c, seed_lo, seed_hi, stream_lo, stream_hi)
    p = tl.load(drop_ptr + c, mask=mask, other=0.0)
    tl.store(keep_ptr + j, tl.where(u.to(p.dtype) + p < 1.0, 1.0, 0.0).to(p.dtype), mask=mask)


@triton.jit
def _gate_grad_kernel(g_ptr, keep_ptr, out_ptr, B, C, tau_hi, tau_lo, TIMES_KEEP_DERIVATIVE: tl.constexpr,
                      GATE_F64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = -1/tau * sum_b g[b, c] (* keep (1 - keep)): d p_logit through the relaxation.

    One program per channel block walks the batch, so the sum is deterministic (no atomics)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float64 if GATE_F64 else tl.float32)
    tau = joined(tau_hi, tau_lo, acc.dtype)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        m = (b < B)[:, None] & cmask[None, :]
        at = b.to(tl.int64)[:, None] * C + c[None, :]
        g = tl.load(g_ptr + at, mask=m, other=0.0).to(acc.dtype)
        if TIMES_KEEP_DERIVATIVE:
            keep = tl.load(keep_ptr + at, mask=m, other=0.0).to(acc.dtype)
            g = g * keep * (1.0 - keep)
        acc += g
    tl.store(out_ptr + c, -tl.sum(acc, axis=0) / tau, mask=cmask)


@triton.jit
def _row_gates(q, qmask, C, p_ptr, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi, tau_lo,
               MODE: tl.constexpr, GATE_F64: tl.constexpr):
    """keep of rows q = b * C + c (the gate's element index is offset + the row index)."""
    z = tl.load(p_ptr + q % C, mask=qmask, other=0.0)
    return gate_keep_at(q + element_offset(offset_lo, offset_hi), z, seed_lo, seed_hi, stream_lo, stream_hi, tau_hi, tau_lo, MODE, GATE_F64)


@triton.jit
def _rows(n_rows, C, BLOCK_Q: tl.constexpr, SPLIT_ROWS: tl.constexpr):
    """The tile's rows q = b * C + c as (q, mask, b, c). SPLIT_ROWS (GPU): grid axis 1 is the example
    and axis 0 a channel block, so c is a plain range (vectorised channels_last access); otherwise
    (interpreter) rows run flat across examples, for fewer, larger programs."""
    if SPLIT_ROWS:
        b = tl.program_id(1).to(tl.int64)
        c = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q = b * C + c
        mask = c < C
    else:
        q = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask = q < n_rows
        b = q // C
        c = q % C
    return q, mask, b, c


@triton.jit(do_not_specialize=RNG_ARGS)
def _gated_apply_kernel(x_ptr, out_ptr, p_ptr, n_rows, C, S, sxb, sxc, sxs, sob, soc, sos,
                        seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi, tau_lo,
                        MODE: tl.constexpr, GATE_F64: tl.constexpr, COMPUTE_F64: tl.constexpr,
                        SPLIT_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """A tile is BLOCK_Q rows (b, c) x BLOCK_S trailing positions; one gate per row."""
    q, qmask, b, c = _rows(n_rows, C, BLOCK_Q, SPLIT_ROWS)
    keep = _row_gates(q, qmask, C, p_ptr, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi, tau_lo,
                      MODE, GATE_F64)
    keep = keep.to(tl.float64 if COMPUTE_F64 else tl.float32)[:, None]
    x_row = x_ptr + (b * sxb + c * sxc)[:, None]
    out_row = out_ptr + (b * sob + c * soc)[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = qmask[:, None] & (s < S)[None, :]
        x = tl.load(x_row + s.to(tl.int64)[None, :] * sxs, mask=m, other=0.0)
        tl.store(out_row + s.to(tl.int64)[None, :] * sos, (x.to(keep.dtype) * keep).to(out_ptr.dtype.element_ty),
                 mask=m)


@triton.jit(do_not_specialize=RNG_ARGS)
def _gated_apply_backward_kernel(dy_ptr, x_ptr, dx_ptr, p_ptr, partial_ptr, n_rows, C, S,
                                 sdb, sdc, sds, sxb, sxc, sxs, sgb, sgc, sgs,
                                 seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi, tau_lo,
                                 MODE: tl.constexpr, GATE_F64: tl.constexpr, COMPUTE_F64: tl.constexpr,
                                 SPLIT_ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """dx = dy * keep, and (relaxed) partial[b, c] = sum_s dy x * keep (1 - keep), in one pass."""
    q, qmask, b, c = _rows(n_rows, C, BLOCK_Q, SPLIT_ROWS)
    gate = _row_gates(q, qmask, C, p_ptr, seed_lo, seed_hi, stream_lo, stream_hi, offset_lo, offset_hi, tau_hi, tau_lo,
                      MODE, GATE_F64)
    keep = gate.to(tl.float64 if COMPUTE_F64 else tl.float32)[:, None]
    dy_row = dy_ptr + (b * sdb + c * sdc)[:, None]
    x_row = x_ptr + (b * sxb + c * sxc)[:, None]
    dx_row = dx_ptr + (b * sgb + c * sgc)[:, None]
    acc = tl.zeros([BLOCK_Q, BLOCK_S], gate.dtype)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sl = s.to(tl.int64)[None, :]
        m = qmask[:, None] & (s < S)[None, :]
        dy = tl.load(dy_row + sl * sds, mask=m, other=0.0)
        tl.store(dx_row + sl * sgs, (dy.to(keep.dtype) * keep).to(dx_ptr.dtype.element_ty), mask=m)
        if MODE == 0:
            x = tl.load(x_row + sl * sxs, mask=m, other=0.0)
            acc += dy.to(gate.dtype) * x.to(gate.dtype)
    if MODE == 0:
        grad_keep = tl.sum(acc, axis=1)
        tl.store(partial_ptr + q, grad_keep * gate * (1.0 - gate), mask=qmask)


# ---- wrappers (inputs are validated by pgnas_fast.ops) --------------------------------------------
def _elements_per_tile(device: torch.device) -> int:
    # GPU: a few thousand elements per program; the CPU interpreter pays per program, so big tiles
    return 4096 if device.type == "cuda" else 1 << 15


def _as_bcs(t: torch.Tensor) -> torch.Tensor:
    """t [B, C, ...] as a [B, C, S] view, or a contiguous copy when the trailing dims do not merge."""
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return t.contiguous().view(t.shape[0], t.shape[1], -1)


def _out_bcs(out: torch.Tensor) -> torch.Tensor:
    """Where the kernel writes `out` (from empty_like): `out` itself as [B, C, S], or a contiguous
    buffer copied into it afterwards when its trailing dims do not merge (a dense permutation)."""
    try:
        return out.view(out.shape[0], out.shape[1], -1)
    except RuntimeError:
        return torch.empty(out.shape[0], out.shape[1], out[0, 0].numel(), dtype=out.dtype, device=out.device)


def _written(out: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    if buffer.data_ptr() != out.data_ptr():
        out.copy_(buffer.view(out.shape))
    return out


def _tiles(n_rows: int, S: int, s_stride: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_S): the stride-1 axis (S for NCHW, the channel rows for channels_last) gets
    the long side of the tile. On a GPU (benchmarks/bench_tiles.py on an H200): rows whose length is
    no multiple of 16 (7x7, 14x14: no 16-byte loads) go 32 positions at a time, 128 rows a tile
    (7x7 forward 13% -> 64% of copy, 14x14 39% -> 58%); channels_last tiles take 64 channels (C = 160:
    67% -> 74%, none of the five shapes timed slower than with 128)."""
    budget = _elements_per_tile(device)
    gpu = device.type == "cuda"
    if s_stride == 1 or S == 1:
        block_s = 32 if gpu and S > 32 and S % 16 else min(triton.next_power_of_2(S), budget)
        return max(1, min(triton.next_power_of_2(n_rows), budget // block_s)), block_s
    block_q = min(triton.next_power_of_2(n_rows), 64 if gpu else budget)
    return block_q, max(1, min(triton.next_power_of_2(S), budget // block_q))


def _grid(B: int, C: int, block_q: int, device: torch.device):
    """(grid, SPLIT_ROWS): see `_rows`."""
    if device.type == "cuda" and B <= 65535:
        return (triton.cdiv(C, block_q), B), True
    return (triton.cdiv(B * C, block_q),), False


def _rng(seed: int, stream: int, offset: int, tau: float):
    return (*split_u64(seed), *split_u64(stream), *split_u64(offset), *split_f64(tau))


def _compute_f64(*tensors: torch.Tensor) -> bool:
    return math_dtype(*tensors) == torch.float64


def gate_source(p_logit, mode):
    """What the gate kernels read per channel: the drop logits, or in hard mode the drop probabilities
    from torch's own sigmoid, as the reference computes them (an in-kernel 1 / (1 + exp(-z)) differs in
    the last bit, and hard masks then differ near ties u + p == 1)."""
    return torch.sigmoid(p_logit) if mode == "hard" else p_logit


def gate_keep(p_logit, batch, seed, stream, tau, mode, offset):
    C = p_logit.shape[0]
    keep = torch.empty(batch, C, dtype=p_logit.dtype, device=p_logit.device)
    n = batch * C
    if n == 0:  # no channels: no launch (a block of next_power_of_2(0) = 0)
        return keep
    block = min(triton.next_power_of_2(n), 1024 if p_logit.device.type == "cuda" else 1 << 15)
    _gate_keep_kernel[(triton.cdiv(n, block),)](
        gate_source(p_logit, mode), keep, n, C, *_rng(seed, stream, offset, tau),
        MODE=MODES[mode], GATE_F64=p_logit.dtype == torch.float64, BLOCK=block, **EXACT)
    return keep


def candidate_keep(p_logit, candidates, seed, layer, domain):
    K, C = candidates.shape[0], p_logit.shape[0]
    keep = torch.empty(K, C, dtype=p_logit.dtype, device=p_logit.device)
    n = K * C
    if n == 0:
        return keep
    # torch's own sigmoid, as the reference: masks then agree even on exact ties u + p == 1
    drop_prob = torch.sigmoid(p_logit)
    block = min(triton.next_power_of_2(n), 1024 if p_logit.device.type == "cuda" else 1 << 15)
    _candidate_keep_kernel[(triton.cdiv(n, block),)](drop_prob, candidates, keep, n, C, *split_u64(seed), layer,
                                                     domain, BLOCK=block, **EXACT)
    return keep


def _reduce_gate_grad(g, keep, tau, times_keep_derivative, dtype):
    B, C = g.shape
    out = torch.empty(C, dtype=dtype, device=g.device)
    if C == 0:
        return out
    block_c = min(triton.next_power_of_2(C), 128)
    block_b = min(triton.next_power_of_2(B), 32)
    _gate_grad_kernel[(triton.cdiv(C, block_c),)](
        g, keep, out, B, C, *split_f64(tau), TIMES_KEEP_DERIVATIVE=times_keep_derivative,
        GATE_F64=dtype == torch.float64, BLOCK_B=block_b, BLOCK_C=block_c, **EXACT)
    return out


def gate_keep_backward(grad_keep, keep, tau, mode):
    if mode != "relaxed":  # hard and full gates do not depend on p_logit differentiably
        return torch.zeros(keep.shape[1], dtype=keep.dtype, device=keep.device)
    return _reduce_gate_grad(grad_keep.contiguous(), keep.contiguous(), tau, True, keep.dtype)


def gated_apply(x, p_logit, seed, stream, tau, mode, offset):
    out = torch.empty_like(x)
    B, C = x.shape[0], x.shape[1]
    if x.numel() == 0:
        return out
    xv, ov = _as_bcs(x), _out_bcs(out)
    S = xv.shape[2]
    block_q, block_s = _tiles(B * C if x.device.type != "cuda" else C, S, xv.stride(2), x.device)
    grid, split_rows = _grid(B, C, block_q, x.device)
    _gated_apply_kernel[grid](
        xv, ov, gate_source(p_logit, mode), B * C, C, S, *xv.stride(), *ov.stride(), *_rng(seed, stream, offset, tau),
        MODE=MODES[mode], GATE_F64=p_logit.dtype == torch.float64,
        COMPUTE_F64=_compute_f64(x, p_logit), SPLIT_ROWS=split_rows, BLOCK_Q=block_q,
        BLOCK_S=block_s, **EXACT)
    return _written(out, ov)


def gated_apply_backward(grad, x, p_logit, seed, stream, tau, mode, offset):
    grad_x = torch.empty_like(x)
    B, C = x.shape[0], x.shape[1]
    if x.numel() == 0:
        return grad_x, torch.zeros_like(p_logit)
    dyv, xv, gv = _as_bcs(grad), _as_bcs(x), _out_bcs(grad_x)
    S = xv.shape[2]
    relaxed = mode == "relaxed"
    # per-(b, c) partial sums of d keep, reduced over the batch by a second small deterministic
    # kernel ([B, C] floats, no atomics: the same gradient bits on every run)
    partial = torch.empty(B, C, dtype=p_logit.dtype, device=x.device) if relaxed else p_logit
    block_q, block_s = _tiles(B * C if x.device.type != "cuda" else C, S, xv.stride(2), x.device)
    grid, split_rows = _grid(B, C, block_q, x.device)
    _gated_apply_backward_kernel[grid](
        dyv, xv, gv, gate_source(p_logit, mode), partial, B * C, C, S, *dyv.stride(), *xv.stride(), *gv.stride(),
        *_rng(seed, stream, offset, tau), MODE=MODES[mode], GATE_F64=p_logit.dtype == torch.float64,
        COMPUTE_F64=_compute_f64(x, p_logit), SPLIT_ROWS=split_rows, BLOCK_Q=block_q,
        BLOCK_S=block_s, **EXACT)
    _written(grad_x, gv)
    if not relaxed:
        return grad_x, torch.zeros_like(p_logit)
    return grad_x, _reduce_gate_grad(partial, partial, tau, False, p_logit.dtype)
