"""Philox4x32-10 and the contract's uniform u in Triton (design.md "RNG contract").

Written from the Random123 description in uint32 arithmetic: `tl.umulhi` gives the high word of the
32x32 product and the plain uint32 product wraps to the low word. Not `tl.rand`: its stream belongs to
Triton, ours must equal the reference bit for bit. Seeds, streams and offsets travel as signed
int32 halves (see `split_u64`) so that every value keeps one argument type (no int64 overflow, no
re-specialisation) and kernels reinterpret them as uint32.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
U_SCALE: tl.constexpr = tl.constexpr(2.0 ** -24)
U_MAX: tl.constexpr = tl.constexpr(1.0 - 2.0 ** -24)  # largest float32 below 1 (reference U_MAX)


# Launch option of every kernel: no product and sum fused into one rounding (Triton fuses by default on
# the GPU), so that float math rounds as the reference's torch ops do
EXACT = {"enable_fp_fusion": False}


def split_u64(value: int) -> tuple[int, int]:
    """(lo, hi) 32-bit words of a value in [0, 2^64), each as a signed int32 (same bits)."""
    lo, hi = value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


def split_f64(value: float) -> tuple[float, float]:
    """A float as a float32 pair hi + lo (~48 bits): Triton passes Python floats as float32, and
    the float64 gate path (gradcheck) needs tau and the regulariser's scales in full precision."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


@triton.jit
def joined(hi, lo, DTYPE: tl.constexpr):
    """hi + lo (a `split_f64` pair, float32 arguments) in DTYPE."""
    return (tl.zeros([], DTYPE) + hi) + lo


@triton.jit
def as_u32(word):
    return word.to(tl.uint32, bitcast=True)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """The four words of Philox4x32-10(counter (c0, c1, c2, c3), key (k0, k1)); all uint32."""
    m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, PHILOX_M1, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def philox_word0(c0, c1, c2, c3, k0, k1):
    """Word 0 of Philox4x32-10(counter (c0, c1, c2, c3), key (k0, k1)); all uint32."""
    return philox4x32_10(c0, c1, c2, c3, k0, k1)[0]


@triton.jit
def word_uniform(word):
    """The contract's float32 u of one Philox word."""
    u = ((word >> 8).to(tl.float32) + 0.5) * U_SCALE
    return tl.minimum(u, U_MAX)


@triton.jit
def uniform_at(i_lo, i_hi, seed_lo, seed_hi, stream_lo, stream_hi):
    """float32 u of element i = (i_lo, i_hi) of stream (stream_lo, stream_hi) under key seed (uint32 words)."""
    zero = tl.zeros(i_lo.shape, tl.uint32)
    w0 = philox_word0(i_lo, i_hi + zero, stream_lo + zero, stream_hi + zero, seed_lo + zero, seed_hi + zero)
    return word_uniform(w0)


@triton.jit
def gate_uniform(i, seed_lo, seed_hi, stream_lo, stream_hi):
    """u of gate element i (int32 or int64 flat index b * C + c, below 2^63)."""
    i64 = i.to(tl.int64)
    i_lo = (i64 & 0xFFFFFFFF).to(tl.uint32)
    i_hi = (i64 >> 32).to(tl.uint32)
    return uniform_at(i_lo, i_hi, as_u32(seed_lo), as_u32(seed_hi), as_u32(stream_lo), as_u32(stream_hi))


@triton.jit(do_not_specialize=["n", "offset_lo", "offset_hi", "seed_lo", "seed_hi", "stream_lo", "stream_hi"])
def _philox_uniform_kernel(out_ptr, n, offset_lo, offset_hi, seed_lo, seed_hi, stream_lo, stream_hi,
                           BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    # i = offset + j as two uint32 words; the low word may carry into the high one
    i_lo = as_u32(offset_lo) + (j & 0xFFFFFFFF).to(tl.uint32)
    carry = (i_lo < as_u32(offset_lo)).to(tl.uint32)
    i_hi = as_u32(offset_hi) + (j >> 32).to(tl.uint32) + carry
    u = uniform_at(i_lo, i_hi, as_u32(seed_lo), as_u32(seed_hi), as_u32(stream_lo), as_u32(stream_hi))
    tl.store(out_ptr + j, u, mask=mask)


def philox_uniform(n, seed, stream, offset, device):
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return out
    block = min(1024 if device.type == "cuda" else 1 << 16, triton.next_power_of_2(n))
    _philox_uniform_kernel[(triton.cdiv(n, block),)](
        out, n, *split_u64(offset), *split_u64(seed), *split_u64(stream), BLOCK=block, **EXACT)
    return out
