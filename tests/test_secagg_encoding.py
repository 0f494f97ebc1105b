"""Ring arithmetic, fixed-point encoding and PRG masks of secure aggregation."""

import time

import numpy as np
import pytest

from asyncfl.secagg import prg
from asyncfl.secagg.encoding import FixedPointCodec, RingOverflowError
from asyncfl.secagg.ring import Ring


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_ring_bytes_and_signed_round_trip(bits):
    ring = Ring(bits)
    rng = np.random.default_rng(0)
    half = 1 << (bits - 1)
    signed = rng.integers(-half, half - 1, 1000, dtype=np.int64, endpoint=True)
    values = ring.from_signed(signed)
    assert int(values.max()) < 1 << bits
    assert np.array_equal(ring.to_signed(values), signed)
    packed = ring.to_bytes(values)
    assert len(packed) == 1000 * bits // 8
    assert np.array_equal(ring.from_bytes(packed, 1000), values)
    with pytest.raises(ValueError):
        ring.from_bytes(packed, 999)


def test_ring_wraps_modulo_2_to_the_bits():
    ring = Ring(16)
    a = ring.from_signed(np.array([32767, -32768, 5]))
    assert ring.to_signed(ring.add(a, ring.from_signed(np.array([1, -1, -7])))).tolist() == [-32768, 32767, -2]
    assert ring.scale(np.array([40000], dtype=np.uint64), 3).tolist() == [(40000 * 3) % 65536]
    with pytest.raises(ValueError):
        Ring(12)


@pytest.mark.parametrize("bits", [8, 24, 32, 48, 64])
def test_ring_ops_match_python_integers_modulo_2_to_the_bits(bits):
    """Native widths (numpy's own wrap-around) and masked uint64 widths give the same arithmetic."""
    ring, modulus = Ring(bits), 1 << bits
    rng = np.random.default_rng(bits)
    a_int = [int(v) for v in rng.integers(0, 2**63, 200, dtype=np.uint64)]
    b_int = [int(v) for v in rng.integers(0, 2**63, 200, dtype=np.uint64)]
    a, b = ring.reduce(np.array(a_int, dtype=np.uint64)), ring.reduce(np.array(b_int, dtype=np.uint64))
    weight = 123_457
    for got, want in (
        (ring.add(a, b), [(x + y) % modulus for x, y in zip(a_int, b_int)]),
        (ring.sub(a, b), [(x - y) % modulus for x, y in zip(a_int, b_int)]),
        (ring.scale(a, weight), [(x * weight) % modulus for x in a_int]),
    ):
        assert [int(v) for v in got] == want and got.dtype == ring.dtype
    assert np.array_equal(ring.from_bytes(ring.to_bytes(a)), a)


def test_scale_keeps_the_largest_weighted_sum_inside_the_ring():
    codec = FixedPointCodec(clip_range=0.5, max_total_weight=1000)
    assert codec.max_level == (2**31 - 1) // 1000
    extreme = codec.encode(np.full(4, 0.5), np.random.default_rng(0))
    assert codec.ring.to_signed(extreme).tolist() == [codec.max_level] * 4
    total = codec.ring.scale(extreme, 1000)  # the largest sum the codec allows: must not wrap
    assert np.allclose(codec.decode(total, 1000), 500.0)
    negative = codec.ring.scale(codec.encode(np.full(4, -7.0), np.random.default_rng(0)), 1000)
    assert np.allclose(codec.decode(negative, 1000), -500.0)  # clipped to -r first


def test_overflow_is_refused_not_wrapped():
    codec = FixedPointCodec(clip_range=1.0, max_total_weight=10)
    encoded = codec.encode(np.ones(3), np.random.default_rng(0))
    wrapped = codec.ring.scale(encoded, 11)
    assert codec.ring.to_signed(wrapped)[0] < 0  # the ring really wrapped ...
    with pytest.raises(RingOverflowError, match="exceeds"):
        codec.decode(wrapped, 11)  # ... and decode refuses it instead of returning garbage
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(np.array([0.0, np.nan]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot hold"):
        FixedPointCodec(clip_range=1.0, max_total_weight=2**40)


def test_weighted_sum_error_within_the_stated_bound_and_unbiased():
    codec = FixedPointCodec(clip_range=2.0, max_total_weight=50)
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 1.5, 20_000) for _ in range(6)]
    weights = [1, 3, 7, 2, 9, 5]
    total = codec.ring.zeros(20_000)
    for update, weight in zip(updates, weights):
        total = codec.ring.add(total, codec.ring.scale(codec.encode(update, rng), weight))
    plaintext = sum(w * np.clip(u, -2.0, 2.0) for u, w in zip(updates, weights))
    error = codec.decode(total, sum(weights)) - plaintext
    bound = codec.error_bound(sum(weights))
    assert bound == pytest.approx(27 / codec.scale, rel=1e-9)
    assert np.abs(error).max() <= bound
    assert np.abs(error).max() > bound / 20  # the bound is not vacuous: errors reach its order
    std_bound = np.sqrt(sum(w * w for w in weights)) / (2 * codec.scale)
    assert abs(error.mean()) < 5 * std_bound / np.sqrt(error.size)
    assert error.std() <= std_bound


def test_encoding_a_million_parameters_is_fast():
    codec = FixedPointCodec(clip_range=1.0, max_total_weight=1000)
    values = np.random.default_rng(0).normal(0, 0.1, 1_000_000).astype(np.float32)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    encoded = codec.encode(values, rng)
    masked = codec.ring.add(encoded, prg.mask(bytes(range(32)), values.size, codec.ring))
    assert time.perf_counter() - start < 1.0
    assert masked.shape == (1_000_000,)


def test_prg_masks_are_deterministic_uniform_and_seed_dependent():
    ring = Ring(32)
    seed = bytes(range(32))
    first = prg.mask(seed, 100_000, ring)
    assert np.array_equal(first, prg.mask(seed, 100_000, ring))
    assert np.array_equal(first[:10], prg.mask(seed, 10, ring))
    other = prg.mask(bytes(31) + b"\1", 100_000, ring)
    assert np.mean(first == other) < 1e-3
    assert first.max() < 2**32
    assert abs(first.mean() / 2**32 - 0.5) < 0.01
    assert abs(np.mean(first >> np.uint64(31)) - 0.5) < 0.01  # top bit balanced
    with pytest.raises(ValueError):
        prg.mask(b"short", 3, ring)


def test_prg_gaussian_has_the_requested_spread():
    noise = prg.gaussian(bytes(32), 200_000, 3.0)
    assert abs(noise.mean()) < 0.05
    assert noise.std() == pytest.approx(3.0, rel=0.02)
    assert np.array_equal(noise, prg.gaussian(bytes(32), 200_000, 3.0))
