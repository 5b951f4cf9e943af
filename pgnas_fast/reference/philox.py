"""Philox4x32-10 (Salmon et al., SC 2011; Random123) in vectorised torch integer ops.

The reference backend's half of the RNG contract in design.md: every backend must produce the same
32-bit words, hence the same uniforms, bit for bit. Words are held in int64 tensors with values in
[0, 2^32); the 32x32 -> 64-bit products are split in 16-bit halves so that no intermediate leaves
the signed 64-bit range (torch has no unsigned 64-bit arithmetic on every device).
"""
from __future__ import annotations

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

    The words are stacked into one tensor halfway (an eager copy of 4 words per element, a few percent
    of the rounds' work) for torch.compile: it inlines every elementwise op into its consumers, and
    each round uses each word twice, so without a stored tensor between rounds it expands the rounds'
    shared subexpressions exponentially (a compile of the 10 rounds did not finish in 5 minutes on
    the 2-core machine; split in two halves it takes about 14 s).
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
        if r == ROUNDS // 2 - 1:
            c0, c1, c2, c3 = torch.stack(torch.broadcast_tensors(c0, c1, c2, c3)).unbind(0)
    return c0, c1, c2, c3


def _word_uniform(word: torch.Tensor) -> torch.Tensor:
    """The contract's float32 u of Philox words (int64 values)."""
    return (((word >> 8).to(torch.float32) + 0.5) * U_SCALE).clamp_(max=U_MAX)


def uniform(n: int, seed: int, stream: int, offset: int, device) -> torch.Tensor:
    """float32 [n]: u of elements offset .. offset + n - 1 of stream `stream` under key `seed`."""
    # arange(n) + offset, not arange(offset, offset + n): the end may be 2^63, outside int64
    i = torch.arange(n, dtype=torch.int64, device=device) + offset
    key = (seed & MASK32, seed >> 32)
    return _word_uniform(philox4x32((i & MASK32, i >> 32, stream & MASK32, stream >> 32), key)[0])


def uniform_streams(n: int, seed: int, streams: torch.Tensor) -> torch.Tensor:
    """float32 [K, n]: u of elements 0 .. n - 1 of each stream in `streams` (int64 [K]), one call."""
    i = torch.arange(n, dtype=torch.int64, device=streams.device).view(1, n)
    s = streams.view(-1, 1)
    key = (seed & MASK32, seed >> 32)
    return _word_uniform(philox4x32((i & MASK32, i >> 32, s & MASK32, s >> 32), key)[0])


# The Gaussian family's normal (see `normal`): float32 constants, each exactly representable.
LN2 = float.fromhex("0x1.62e430p-1")  # log 2 rounded to float32
SQRT2 = float.fromhex("0x1.6a09e6p+0")  # sqrt 2 rounded to float32: mantissas above it are halved
LOG_SERIES = tuple(float.fromhex(h) for h in ("0x1.555556p-1", "0x1.99999ap-2", "0x1.24924ap-2", "0x1.c71c72p-3"))
# 2/3, 2/5, 2/7, 2/9: log m = 2 atanh(s) = 2 s + s^3 (2/3 + s^2 (2/5 + ...)), s = (m - 1) / (m + 1)
COS_SERIES = tuple(float.fromhex(h) for h in ("-0x1.3bd3ccp+4", "0x1.03c1f0p+6", "-0x1.55d3c8p+6", "0x1.e1f506p+5",
                                               "-0x1.a6d1f2p+4"))  # (-1)^k (2 pi)^2k / (2k)!, k = 1..5
SIN_SERIES = tuple(float.fromhex(h) for h in ("0x1.921fb6p+2", "-0x1.4abbcep+5", "0x1.466bc6p+6", "-0x1.32d2ccp+6",
                                               "0x1.507834p+5"))  # (-1)^k (2 pi)^(2k+1) / (2k+1)!, k = 0..4


def _horner(coefficients, y: torch.Tensor) -> torch.Tensor:
    """c[0] + y (c[1] + y (...)) with every product and sum rounded to float32 (no fused multiply-add)."""
    acc = y * coefficients[-1] + coefficients[-2]
    for c in reversed(coefficients[:-2]):
        acc = acc * y + c
    return acc


def log_f32(u: torch.Tensor) -> torch.Tensor:
    """log u for float32 u in (0, 1), from float32 adds, multiplies and one divide only (each rounded
    to nearest), so that every backend gets the same bits: u = m 2^e with m in [sqrt(1/2), sqrt 2),
    log u = e log 2 + 2 atanh((m - 1) / (m + 1)), the series to s^9 (error below 2^-23 relative)."""
    bits = u.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # in [1, 2)
    high = m > SQRT2
    m = torch.where(high, m * 0.5, m)
    e = (e + high.to(torch.int32)).to(torch.float32)
    s = (m - 1.0) / (m + 1.0)  # m - 1 is exact (Sterbenz)
    z = s * s
    series = _horner(LOG_SERIES, z)
    return e * LN2 + ((s + s) + (s * z) * series)


def turn_cos_sin(word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos 2 pi v, sin 2 pi v) in float32 for v = ((word >> 8) + 0.5) 2^-24, words as int64 values.

    The quarter turn q = round(4 v) and the rest x = v - q / 4 in [-1/8, 1/8] come from the word's 24
    bits in integer arithmetic (exact); cos and sin of 2 pi x are their Taylor series to x^10 and x^9
    (error below 1e-9) in float32 adds and multiplies; q mod 4 picks signs and roles."""
    k = word >> 8
    q = (k + (1 << 21)) >> 22
    x = ((k - (q << 22)).to(torch.float32) + 0.5) * 2.0 ** -24
    y = x * x
    c = _horner(COS_SERIES, y) * y + 1.0
    s = _horner(SIN_SERIES, y) * x
    quarter = q & 3
    cos = torch.where(quarter == 0, c, torch.where(quarter == 1, -s, torch.where(quarter == 2, -c, s)))
    sin = torch.where(quarter == 0, s, torch.where(quarter == 1, c, torch.where(quarter == 2, -s, -c)))
    return cos, sin


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt of x >= 0 (torch's CPU float32 sqrt is not: ~0.7 % of results
    are an ulp off): the float64 root rounded, then moved to the neighbour whose rounding interval
    holds sqrt x, decided exactly (a midpoint of two floats squares exactly in float64)."""
    root = torch.sqrt(x.double()).float()
    up = torch.nextafter(root, torch.full_like(root, float("inf")))
    down = torch.nextafter(root, torch.zeros_like(root))
    x64, root64 = x.double(), root.double()
    above = (root64 + up.double()) * 0.5
    below = (root64 + down.double()) * 0.5
    return torch.where(above * above < x64, up, torch.where(below * below > x64, down, root))


def normal_quads(quads: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """float32 [len(quads), 4]: the standard normals of elements 4 q .. 4 q + 3 of the Gaussian family.

    Counter q gives Philox words w0..w3; Box-Muller on two pairs: r = sqrt(-2 log u(w0)), turn t =
    v(w1): eps(4q) = r cos 2 pi t, eps(4q + 1) = r sin 2 pi t; likewise w2, w3 for 4q + 2 and 4q + 3.
    u is the contract's uniform; log, cos and sin are `log_f32` and `turn_cos_sin`, float32 adds,
    multiplies, one divide and sqrt, each rounded to nearest, so every backend gets the same bits.
    """
    key = (seed & MASK32, seed >> 32)
    words = philox4x32((quads & MASK32, quads >> 32, stream & MASK32, stream >> 32), key)
    out = []
    for radius_word, turn_word in (words[0:2], words[2:4]):
        radius = sqrt_rn(-2.0 * log_f32(_word_uniform(radius_word)))
        cos, sin = turn_cos_sin(turn_word)
        out += [radius * cos, radius * sin]
    return torch.stack(out, dim=1)


def normal(n: int, seed: int, stream: int, offset: int, device) -> torch.Tensor:
    """float32 [n]: standard normals eps of elements offset .. offset + n - 1 (the Gaussian family):
    element j is lane j mod 4 of `normal_quads` of counter j div 4."""
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    first, last = offset >> 2, (offset + n - 1) >> 2
    quads = torch.arange(last - first + 1, dtype=torch.int64, device=device) + first
    lead = offset & 3
    return normal_quads(quads, seed, stream).view(-1)[lead:lead + n]
