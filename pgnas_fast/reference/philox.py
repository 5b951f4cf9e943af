"""Philox4x32-10 (Salmon et al., SC 2011; Random123) in vectorised torch integer ops.

The reference backend's half of the RNG contract in design.md: every backend must produce the same
32-bit words, hence the same uniforms, bit for bit. Words are held in int64 tensors with values in
[0, 2^32); the 32x32 -> 64-bit products are split in 16-bit halves so that no intermediate leaves
the signed 64-bit range (torch has no unsigned 64-bit arithmetic on every device).
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10
# u = ((w0 >> 8) + 0.5) * 2^-24: 24 random bits, centred. In float32 the top value 1 - 2^-25 is not
# representable and rounds (to nearest even) to 1.0, so u is clamped to the largest float32 below 1
# to keep 0 < u < 1 (otherwise log1p(-u) = -inf); every backend must clamp the same way.
U_SCALE = 2.0 ** -24
U_MAX = 1.0 - 2.0 ** -24


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for words a (int64 tensor) and a 32-bit constant m."""
    a_hi = a >> 16
    a_lo = a & 0xFFFF
    t = a_lo * m  # < 2^48
    s = a_hi * m + (t >> 16)  # < 2^49: the product is s * 2^16 + (t & 0xFFFF)
    hi = s >> 16
    lo = ((s & 0xFFFF) << 16) | (t & 0xFFFF)
    return hi, lo


def philox4x32(counter: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 counter words (c0, c1, c2, c3) and a key (k0, k1).

    Counter words may be tensors or Python ints, each in [0, 2^32). Returns the four output words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    ref = next(c for c in counter if isinstance(c, torch.Tensor))
    # a Python int becomes a filled tensor, not a host copy (which would synchronise a CUDA stream)
    c0, c1, c2, c3 = (c.to(ref.device, torch.int64) if isinstance(c, torch.Tensor)
                      else ref.new_full((), c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform(n: int, seed: int, stream: int, offset: int, device) -> torch.Tensor:
    """float32 [n]: u of elements offset .. offset + n - 1 of stream `stream` under key `seed`."""
    # arange(n) + offset, not arange(offset, offset + n): the end may be 2^63, outside int64
    i = torch.arange(n, dtype=torch.int64, device=device) + offset
    key = (seed & MASK32, seed >> 32)
    w0 = philox4x32((i & MASK32, i >> 32, stream & MASK32, stream >> 32), key)[0]
    return (((w0 >> 8).to(torch.float32) + 0.5) * U_SCALE).clamp_(max=U_MAX)


def uniform_streams(n: int, seed: int, streams: torch.Tensor) -> torch.Tensor:
    """float32 [K, n]: u of elements 0 .. n - 1 of each stream in `streams` (int64 [K]), one call."""
    i = torch.arange(n, dtype=torch.int64, device=streams.device).view(1, n)
    s = streams.view(-1, 1)
    key = (seed & MASK32, seed >> 32)
    w0 = philox4x32((i & MASK32, i >> 32, s & MASK32, s >> 32), key)[0]
    return (((w0 >> 8).to(torch.float32) + 0.5) * U_SCALE).clamp_(max=U_MAX)


def normal(n: int, seed: int, stream: int, offset: int, device) -> torch.Tensor:
    """float32 [n]: standard normals eps of elements offset .. offset + n - 1 (the Gaussian family).

    Element i is Box-Muller on the contract's uniforms of words 0 and 1 of counter i:
    eps = sqrt(-2 log u1) cos(2 pi u2), evaluated in float64 and rounded once to float32, so that the
    backends' different float32 log/cos cannot make eps differ (a float64 result differs between
    libraries only in its last bits, which the rounding to float32 removes but for one case in ~2^29).
    """
    i = torch.arange(n, dtype=torch.int64, device=device) + offset
    key = (seed & MASK32, seed >> 32)
    w0, w1, _, _ = philox4x32((i & MASK32, i >> 32, stream & MASK32, stream >> 32), key)
    u1, u2 = ((((w >> 8).to(torch.float32) + 0.5) * U_SCALE).clamp_(max=U_MAX).double() for w in (w0, w1))
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).float()
