"""The RNG contract of design.md: Philox4x32-10 known answers, the u mapping, element layout, streams.

The expected words come from a scalar pure-Python Philox4x32-10 written here from the Random123
description (plain ints), independent of the vectorised torch version under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pgnas_fast as pf
from pgnas_fast.ops import streams
from pgnas_fast.reference import philox

MASK32 = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
U_MAX = np.float32(1.0 - 2.0**-24)  # largest float32 below 1


def scalar_philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        hi0, lo0 = p0 >> 32, p0 & MASK32
        hi1, lo1 = p1 >> 32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def scalar_word0(seed: int, stream: int, i: int) -> int:
    counter = (i & MASK32, i >> 32, stream & MASK32, stream >> 32)
    return scalar_philox4x32_10(counter, (seed & MASK32, seed >> 32))[0]


def scalar_u(seed: int, stream: int, i: int) -> np.float32:
    """u = ((w0 >> 8) + 0.5) * 2^-24 rounded to float32 (nearest even), kept below 1."""
    exact = ((scalar_word0(seed, stream, i) >> 8) + 0.5) * 2.0**-24  # exact in float64
    return min(np.float32(exact), U_MAX)


KNOWN_ANSWERS = [  # design.md "RNG contract" (Random123 kat_vectors): counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers_torch(counter, key, expected):
    words = philox.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w.item()) for w in words) == expected


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers_scalar_oracle(counter, key, expected):
    # the oracle the rest of this file trusts must itself reproduce Random123
    assert scalar_philox4x32_10(counter, key) == expected


def test_known_answers_vectorised_batch():
    """All three vectors in one broadcast call (rows are independent): no cross-talk between lanes."""
    for key in {kat[1] for kat in KNOWN_ANSWERS}:
        rows = [kat for kat in KNOWN_ANSWERS if kat[1] == key]
        counter = tuple(torch.tensor([kat[0][j] for kat in rows], dtype=torch.int64) for j in range(4))
        words = philox.philox4x32(counter, key)
        for r, kat in enumerate(rows):
            assert tuple(int(w[r]) for w in words) == kat[2]


RNG_CASES = [  # (seed, stream, offset, n)
    (0, 0, 0, 16),
    (1, 2, 3, 9),
    (12345, streams.stream_id(streams.Domain.TRAIN, 7, 3), 100, 17),
    ((1 << 32) + 5, (1 << 40) + 7, 0, 8),  # seed and stream use their high words
    (0xDEADBEEF, 11, (1 << 32) - 3, 7),  # offsets cross into the counter's high word
    ((1 << 63) - 1, (1 << 63) - 1, (1 << 63) - 5, 5),  # everything at its top
    (3 << 40, streams.stream_id(streams.Domain.COMPAT, (1 << 40) - 1, (1 << 16) - 1), 1 << 45, 6),
]


@pytest.mark.parametrize("seed, stream, offset, n", RNG_CASES)
def test_uniform_matches_scalar_philox(backend, seed, stream, offset, n):
    u = pf.ops.philox_uniform(n, seed=seed, stream=stream, offset=offset, backend=backend)
    assert u.dtype == torch.float32 and u.shape == (n,)
    expected = np.array([scalar_u(seed, stream, offset + j) for j in range(n)], dtype=np.float32)
    np.testing.assert_array_equal(u.numpy(), expected)  # bit for bit


def test_seed_and_stream_words_are_not_interchangeable():
    a = pf.ops.philox_uniform(8, seed=5, stream=9)
    assert not torch.equal(a, pf.ops.philox_uniform(8, seed=9, stream=5))
    assert not torch.equal(a, pf.ops.philox_uniform(8, seed=5 + (1 << 32), stream=9))
    assert not torch.equal(a, pf.ops.philox_uniform(8, seed=5, stream=9 + (1 << 32)))
    assert not torch.equal(a, pf.ops.philox_uniform(8, seed=5, stream=9, offset=1 << 32))


def test_uniform_strictly_inside_unit_interval(backend):
    u = pf.ops.philox_uniform(1 << 20, seed=2024, stream=1, backend=backend)
    assert (u > 0).all() and (u < 1).all()
    assert u.min().item() >= 2.0**-25 and u.max().item() <= 1.0 - 2.0**-24
    assert abs(u.double().mean().item() - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5


# Elements whose word 0 has its top 24 bits all one / all zero: u = 1 - 2^-25 rounds to 1.0 in
# float32 and must be clamped; the bottom end 2^-25 is exact. Found by exhaustive search.
EXTREME_ELEMENTS = [(1, 0, 8418514, 0xFFFFFF), (1, 0, 27392119, 0xFFFFFF), (0, 0, 14883995, 0)]


@pytest.mark.parametrize("seed, stream, i, top_bits", EXTREME_ELEMENTS)
def test_extreme_words_stay_inside_unit_interval(backend, seed, stream, i, top_bits):
    assert scalar_word0(seed, stream, i) >> 8 == top_bits
    u = pf.ops.philox_uniform(3, seed=seed, stream=stream, offset=i - 1, backend=backend)
    assert 0.0 < u[1].item() < 1.0
    assert u[1].item() == (1.0 - 2.0**-24 if top_bits else 2.0**-25)
    assert torch.isfinite(torch.log(u) - torch.log1p(-u)).all()  # the logistic noise of the contract


@pytest.mark.parametrize("seed, stream", [(0, 0), (77, (1 << 50) + 3)])
def test_offset_draw_is_a_slice_of_a_longer_draw(backend, seed, stream):
    full = pf.ops.philox_uniform(1000, seed=seed, stream=stream, backend=backend)
    for offset, n in [(0, 1), (1, 10), (333, 667), (999, 1), (500, 0)]:
        part = pf.ops.philox_uniform(n, seed=seed, stream=stream, offset=offset, backend=backend)
        assert torch.equal(part, full[offset : offset + n])


def test_gate_keep_uses_element_b_times_c_plus_c(backend):
    """keep[b, c] of a relaxed gate is a function of u of element b*C + c (checked by scalar Philox)."""
    batch, channels, seed, stream, tau = 3, 7, (1 << 33) + 1, streams.stream_id(streams.Domain.TRAIN, 12, 4), 0.2
    p_logit = torch.linspace(-2.0, 2.0, channels, dtype=torch.float64)
    keep = pf.ops.gate_keep(p_logit, batch, seed=seed, stream=stream, tau=tau, backend=backend)
    for b in range(batch):
        for c in range(channels):
            u = float(scalar_u(seed, stream, b * channels + c))
            logistic = np.log(u) - np.log1p(-u)
            expected = 1.0 / (1.0 + np.exp((p_logit[c].item() + logistic) / tau))
            assert keep[b, c].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_hard_gate_uses_element_b_times_c_plus_c(backend):
    batch, channels, seed, stream = 4, 5, 99, streams.stream_id(streams.Domain.CANDIDATE, 31, 2)
    p_logit = torch.tensor([-1.0, -0.2, 0.0, 0.4, 1.5])
    keep = pf.ops.gate_keep(p_logit, batch, seed=seed, stream=stream, mode="hard", backend=backend)
    p = torch.sigmoid(p_logit)
    for b in range(batch):
        for c in range(channels):
            drop = scalar_u(seed, stream, b * channels + c) + p[c].numpy() >= np.float32(1.0)
            assert keep[b, c].item() == (0.0 if drop else 1.0)


# ---- stream ids ---------------------------------------------------------------------------------
def test_stream_id_layout():
    assert streams.stream_id(streams.Domain.TRAIN, 0, 0) == 1 << 56
    assert streams.stream_id(streams.Domain.CANDIDATE, 5, 3) == (2 << 56) | (5 << 16) | 3
    assert streams.stream_id(streams.Domain.SHAKE, 123456, 789) == (4 << 56) + 123456 * 65536 + 789
    top = streams.stream_id(streams.Domain.COMPAT, (1 << 40) - 1, (1 << 16) - 1)
    assert top == (5 << 56) | ((1 << 56) - 1)
    assert top < streams.SEED_LIMIT  # usable as a stream argument
    assert pf.ops.stream_id is streams.stream_id


def test_stream_ids_never_collide_across_domains_majors_layers():
    ids = {
        streams.stream_id(domain, major, layer)
        for domain in streams.Domain
        for major in (0, 1, 2, (1 << 40) - 1)
        for layer in (0, 1, (1 << 16) - 1)
    }
    assert len(ids) == len(streams.Domain) * 4 * 3
    assert all(0 <= s < streams.SEED_LIMIT for s in ids)


def test_domains_are_distinct_small_ints():
    values = [int(d) for d in streams.Domain]
    assert len(set(values)) == len(values)
    assert all(0 < v < 128 for v in values)  # domain << 56 stays below 2^63


@pytest.mark.parametrize(
    "major, layer, match",
    [(-1, 0, "major"), (1 << 40, 0, "major"), (0, -1, "gate-layer"), (0, 1 << 16, "gate-layer")],
)
def test_stream_id_range_errors(major, layer, match):
    with pytest.raises(ValueError, match=match):
        streams.stream_id(streams.Domain.TRAIN, major, layer)
