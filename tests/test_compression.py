import math
import struct
import time

import pytest
import torch

from asyncfl.compression import (
    HEADER_BYTES,
    ErrorFeedback,
    Float16,
    Raw,
    StochasticQuantizer,
    TopK,
    decode,
    encode_upload,
    frame,
    parse_codec,
    topk,
)

ALL_SPECS = [
    "none",
    "fp16",
    "int8",
    "int4",
    "int2",
    "int8:chunk=0",
    "int4:chunk=100",
    "int2:chunk=7",
    "topk:0.1",
    "topk:0.1+int8",
    "topk:0.3+int4:chunk=16",
    "topk:0.05+fp16",
    "topk:k=5+int2:chunk=0",
]
SIZES = [0, 1, 2, 7, 1000, 4097]


def vec(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # mixed scales, like a flat vector over layers
    x = torch.randn(n, generator=g) * scale
    if n > 10:
        x[: n // 3] *= 100.0
        x[n // 3 : n // 2] *= 0.01
    return x


def within(y, x, bound):
    slack = 1e-5 * bound + 1e-6 * (x.abs().max() if x.numel() else 0)
    return bool(((y - x).abs() <= bound + slack).all())


# ------------------------------------------------------------------ spec parsing


@pytest.mark.parametrize(
    "spec, cls, canonical",
    [
        ("none", Raw, "none"),
        ("fp32", Raw, "none"),
        ("fp16", Float16, "fp16"),
        (" FP16 ", Float16, "fp16"),
        ("int8", StochasticQuantizer, "int8:chunk=1024"),
        ("int4:chunk=1024", StochasticQuantizer, "int4:chunk=1024"),
        ("int2:chunk=0", StochasticQuantizer, "int2:chunk=0"),
        ("topk:0.1", TopK, "topk:0.1"),
        ("topk:frac=0.25", TopK, "topk:0.25"),
        ("topk:k=100", TopK, "topk:k=100"),
        ("topk:0.1+int8", TopK, "topk:0.1+int8:chunk=1024"),
        ("topk:0.1 + int4:chunk=64", TopK, "topk:0.1+int4:chunk=64"),
        ("topk:1+fp16", TopK, "topk:1.0+fp16"),
    ],
)
def test_parse_valid_specs(spec, cls, canonical):
    c = parse_codec(spec)
    assert isinstance(c, cls)
    assert c.spec == canonical
    assert parse_codec(c.spec) == c


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "non-empty"),
        ("gzip", "unknown codec 'gzip'"),
        ("int3", "unknown codec 'int3'"),
        ("int16", "unknown codec"),
        ("fp16:chunk=4", "takes no parameters"),
        ("int8:chunk=-1", "chunk must be"),
        ("int8:chunk=abc", "chunk must be an integer"),
        ("int8:chunk=1.5", "chunk must be an integer"),
        ("int8:blocks=4", "unknown parameter"),
        ("int8:4", "takes only chunk"),
        ("int8:chunk=4,chunk=8", "given twice"),
        ("int8:", "missing parameters"),
        ("topk", "exactly one of a fraction"),
        ("topk:0", r"\(0, 1\]"),
        ("topk:1.5", r"\(0, 1\]"),
        ("topk:-0.1", r"\(0, 1\]"),
        ("topk:nan", r"\(0, 1\]"),
        ("topk:abc", "must be a number"),
        ("topk:0.1,0.2", "exactly one"),
        ("topk:0.1,k=5", "exactly one"),
        ("topk:k=0", "k must be"),
        ("topk:depth=2", "unknown parameter"),
        ("int8+topk:0.1", "only top-k composes"),
        ("topk:0.1+topk:0.5", "top-k must come first"),
        ("topk:0.1+int8+fp16", "at most two parts"),
        ("topk:0.1+", "empty part"),
        ("topk:0.1+gzip", "unknown codec 'gzip'"),
    ],
)
def test_parse_invalid_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_codec(spec)


def test_constructor_validation():
    with pytest.raises(ValueError, match="bits"):
        StochasticQuantizer(3)
    with pytest.raises(ValueError, match="exactly one"):
        TopK()
    with pytest.raises(ValueError, match="cannot themselves be top-k"):
        TopK(0.1, values=TopK(0.5))


# ------------------------------------------------------------------ round trips, bounds, bytes


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_within_documented_bound_and_exact_byte_count(spec, n):
    c = parse_codec(spec)
    x = vec(n, seed=n)
    before = x.clone()
    payload = c.encode(x, generator=7)
    assert torch.equal(x, before)  # the input is never modified
    assert isinstance(payload, bytes)
    assert len(payload) == c.bytes_for(n)
    y = c.decode(payload, n)
    assert y.shape == (n,) and y.dtype == torch.float32
    assert within(y, x, c.error_bound(x))
    # the generic decoder reads the same payload without knowing the codec
    assert torch.equal(decode(payload, n), y)
    assert torch.equal(decode(payload), y)


def test_byte_formulas_by_hand():
    n = 1_000_000
    assert parse_codec("none").bytes_for(n) == 8 + 4 * n
    assert parse_codec("fp16").bytes_for(n) == 8 + 2 * n
    # 8 header + 5 params + 8 per chunk + packed codes
    assert parse_codec("int8").bytes_for(n) == 8 + 5 + 8 * 977 + n
    assert parse_codec("int4:chunk=1000").bytes_for(n) == 8 + 5 + 8 * 1000 + n // 2
    assert parse_codec("int2:chunk=0").bytes_for(n) == 8 + 5 + 8 + n // 4
    assert parse_codec("int4").bytes_for(3) == 8 + 5 + 8 + 2  # 12 bits -> 2 bytes
    # top-k 1%: 10^4 uint32 indices beat a 125000-byte bitmap; values raw with their own header
    assert parse_codec("topk:0.01").bytes_for(n) == 8 + 5 + 4 * 10_000 + (8 + 4 * 10_000)
    # top-k 10%: the bitmap (125000 bytes) beats 400000 bytes of indices
    assert parse_codec("topk:0.1+int8").bytes_for(n) == 8 + 5 + 125_000 + (8 + 5 + 8 * 98 + 100_000)
    # small vectors use uint16 indices
    assert parse_codec("topk:k=10").bytes_for(60_000) == 8 + 5 + 2 * 10 + (8 + 40)


def test_compression_ratio_drops_with_bit_width():
    n = 100_000
    sizes = [parse_codec(s).bytes_for(n) for s in ("none", "fp16", "int8", "int4", "int2")]
    assert sizes == sorted(sizes, reverse=True)
    assert parse_codec("int2").compression_ratio(n) > 15


@pytest.mark.parametrize(
    "n, k, mode",
    [
        (1000, 10, topk._IDX_U16),
        (100_000, 100, topk._IDX_U32),
        (100_000, 20_000, topk._IDX_BITMAP),
        (1000, 500, topk._IDX_BITMAP),
    ],
)
def test_topk_index_mode_is_the_smaller_one(n, k, mode):
    c = TopK(k=k)
    payload = c.encode(vec(n))
    assert payload[HEADER_BYTES + 4] == mode
    assert torch.equal(c.decode(payload, n), c.roundtrip(vec(n)))


def test_topk_keeps_largest_exactly_and_zeroes_rest():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 4.0, 0.0, -0.3])
    y = TopK(k=3).roundtrip(x)
    assert torch.equal(y, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 4.0, 0.0, 0.0]))
    x = vec(10_000, seed=3)
    c = parse_codec("topk:0.05")
    y = c.roundtrip(x)
    kept = y != 0
    assert int(kept.sum()) == 500
    assert torch.equal(y[kept], x[kept])
    assert x[~kept].abs().max() <= x[kept].abs().min()


def test_fp16_relative_error():
    x = torch.cat([torch.logspace(-4, 4, 1000), -torch.logspace(-4, 4, 1000), torch.tensor([0.0, 1e-7, -3e-6])])
    y = Float16().roundtrip(x)
    assert (((y - x).abs()) <= torch.maximum(x.abs() * 2.0**-11, torch.tensor(2.0**-25))).all()
    with pytest.raises(ValueError, match="fp16 overflow"):
        Float16().encode(torch.tensor([1.0, 70000.0]))


def test_quantization_error_is_below_one_step_per_chunk():
    x = torch.cat([torch.randn(512) * 1000.0, torch.randn(512) * 0.001])
    for bits in (8, 4, 2):
        c = StochasticQuantizer(bits, chunk=512)
        y = c.roundtrip(x, generator=1)
        step_big = (x[:512].max() - x[:512].min()) / (2**bits - 1)
        step_small = (x[512:].max() - x[512:].min()) / (2**bits - 1)
        assert (y[:512] - x[:512]).abs().max() <= step_big * (1 + 1e-5)
        # per-chunk scales: the small chunk is not swamped by the big one
        assert (y[512:] - x[512:]).abs().max() <= step_small * (1 + 1e-5)
        # decoded values stay on the chunk's grid within [min, max]
        assert y[512:].min() >= x[512:].min() - 1e-9 and y[512:].max() <= x[512:].max() + 1e-9


def test_constant_chunks_are_exact():
    x = torch.cat([torch.full((100,), 3.25), torch.zeros(100), torch.full((57,), -1e-3)])
    for spec in ("int8:chunk=100", "int4:chunk=100", "int2:chunk=100"):
        assert torch.equal(parse_codec(spec).roundtrip(x, generator=0), x)


def _tiled_errors(c, x, S, seed):
    """Errors of S independent encodings of x, from ONE encoding of x tiled S times.

    Tiles align with chunk boundaries (len(x) is a multiple of the chunk) and a per-tensor
    range is the same for x and its tiling, so every tile is quantized with x's own scales
    and fresh random numbers: S independent samples at the cost of one vectorised encode.
    """
    y = c.roundtrip(x.repeat(S), generator=seed).view(S, -1)
    return (y - x).double()


@pytest.mark.parametrize("spec", ["int8:chunk=64", "int4:chunk=64", "int2:chunk=64", "int2:chunk=0"])
def test_stochastic_quantization_is_unbiased(spec):
    c = parse_codec(spec)
    x = vec(512, seed=11)
    S = 4000
    e = _tiled_errors(c, x, S, seed=123)
    mean_err = e.mean(0)
    step = c.error_bound(x).double()
    # each error is a two-point variable on [-step, step] with variance <= step^2 / 4, so the
    # mean over S samples has std <= step / (2 sqrt S); 6 sigma over 512 elements: P(fail) < 1e-6
    assert (mean_err.abs() <= 6 * step / (2 * math.sqrt(S)) + 1e-6 * x.abs().max()).all()
    # and it is really random, with at most the variance of stochastic rounding
    var = e.var(0)
    assert var.sum() > 0
    assert (var <= step**2 / 4 * 1.2 + 1e-12).all()
    # nearest rounding would be biased by up to half a step: the tolerance (0.047 step) is far tighter
    assert 6 / (2 * math.sqrt(S)) < 0.05
    # same result through separate encodings (a few seeds): errors within one step
    for seed in range(3):
        assert within(c.roundtrip(x, generator=seed), x, c.error_bound(x))


def test_topk_with_quantized_values_is_unbiased_on_kept_coordinates():
    c = parse_codec("topk:0.25+int2:chunk=0")
    x = vec(64, seed=5)
    kept = c.select(x)
    S = 4000
    # tiling keeps the same 16 largest of every tile, and the same per-tensor range of values
    mean = _tiled_errors(c, x, S, seed=9).mean(0) + x.double()
    step = c.error_bound(x)[kept].double()
    assert ((mean[kept] - x[kept].double()).abs() <= 6 * step / (2 * math.sqrt(S)) + 1e-6).all()
    dropped = torch.ones(64, dtype=torch.bool)
    dropped[kept] = False
    assert (mean[dropped] == 0).all()


def test_determinism_and_generator_forms():
    x = vec(5000)
    c = parse_codec("int4:chunk=256")
    a = c.encode(x, generator=42)
    assert c.encode(x, generator=42) == a
    assert c.encode(x, generator=torch.Generator().manual_seed(42)) == a
    assert c.encode(x, generator=43) != a
    torch.manual_seed(5)
    b = c.encode(x)
    torch.manual_seed(5)
    assert c.encode(x) == b  # None: torch's global generator
    with pytest.raises(TypeError, match="generator"):
        c.encode(x, generator="seed")


def test_input_validation():
    with pytest.raises(ValueError, match="flat"):
        parse_codec("int8").encode(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating-point"):
        parse_codec("none").encode(torch.arange(3))
    with pytest.raises(ValueError, match="non-finite"):
        parse_codec("int8").encode(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        parse_codec("int4:chunk=0").encode(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="non-finite"):
        parse_codec("int8").encode(torch.tensor([-3e38, 3e38]))  # range overflows float32
    # float64 input is accepted and treated as float32
    x = torch.randn(10, dtype=torch.float64)
    assert torch.equal(Raw().roundtrip(x), x.float())


# ------------------------------------------------------------------ malformed payloads


def _raise(payload, n=None, match=None, codec=None):
    with pytest.raises(ValueError, match=match):
        (codec.decode(payload, n) if codec is not None else decode(payload, n))


@pytest.mark.parametrize(
    "spec", ["none", "fp16", "int8:chunk=3", "int4:chunk=3", "int2:chunk=0", "topk:0.3", "topk:0.5+int4:chunk=2"]
)
def test_every_truncation_and_trailing_byte_is_rejected(spec):
    c = parse_codec(spec)
    x = vec(11, seed=2)
    p = c.encode(x, generator=0)
    for cut in range(len(p)):
        _raise(p[:cut], 11, match="truncated|too short")
    _raise(p + b"\x00", 11, match="trailing")
    _raise(p, 12, match="numel mismatch")


def test_header_fields_are_validated():
    p = parse_codec("int8").encode(vec(10), generator=0)
    _raise(b"XX" + p[2:], match="bad magic")
    _raise(p[:2] + bytes([9]) + p[3:], match="format version")
    _raise(p[:3] + bytes([77]) + p[4:], match="unknown codec id 77")
    _raise(p[:8] + bytes([3]) + p[9:], match="invalid bit width 3")
    with pytest.raises(TypeError):
        decode("not bytes")
    # memoryview and bytearray are fine
    assert torch.equal(decode(bytearray(p), 10), decode(memoryview(p), 10))


def test_quantization_scales_and_padding_are_validated():
    x = vec(5)
    p = bytearray(parse_codec("int8:chunk=0").encode(x, generator=0))
    scales_at = HEADER_BYTES + 5
    for bad in (float("nan"), float("inf")):
        q = bytearray(p)
        q[scales_at : scales_at + 4] = struct.pack("<f", bad)
        _raise(bytes(q), 5, match="non-finite chunk scale")
        q = bytearray(p)
        q[scales_at + 4 : scales_at + 8] = struct.pack("<f", bad)
        _raise(bytes(q), 5, match="non-finite chunk scale")
    q = bytearray(p)
    q[scales_at + 4 : scales_at + 8] = struct.pack("<f", -1.0)
    _raise(bytes(q), 5, match="negative chunk step")
    q = bytearray(p)
    q[scales_at : scales_at + 8] = struct.pack("<ff", 3e38, 1e37)  # lo + 255 * step overflows
    _raise(bytes(q), 5, match="non-finite chunk scale")
    # 5 int4 codes use 3 bytes; the upper nibble of the last byte is padding
    p4 = bytearray(parse_codec("int4:chunk=0").encode(x, generator=0))
    p4[-1] |= 0xF0
    _raise(bytes(p4), 5, match="padding bits")
    p2 = bytearray(parse_codec("int2:chunk=0").encode(x, generator=0))
    p2[-1] |= 0xC0
    _raise(bytes(p2), 5, match="padding bits")


def _topk_payload(indices, numel, width="<H", mode=topk._IDX_U16, values=None):
    k = len(indices)
    values = torch.ones(k) if values is None else values
    return (
        struct.pack("<2sBBI", b"AF", 1, frame.TOPK, numel)
        + struct.pack("<IB", k, mode)
        + b"".join(struct.pack(width, i) for i in indices)
        + Raw().encode(values)
    )


def test_topk_indices_are_validated():
    ok = _topk_payload([1, 4, 7], 10)
    assert decode(ok, 10).tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    _raise(_topk_payload([1, 4, 10], 10), 10, match="index 10 out of range")
    _raise(_topk_payload([70000], 100, width="<I", mode=topk._IDX_U32), 100, match="out of range")
    _raise(_topk_payload([4, 1, 7], 10), 10, match="not strictly increasing")
    _raise(_topk_payload([1, 4, 4], 10), 10, match="not strictly increasing")
    _raise(_topk_payload(list(range(11)), 10), 10, match="k = 11 exceeds numel")
    bad_mode = bytearray(ok)
    bad_mode[HEADER_BYTES + 4] = 9
    _raise(bytes(bad_mode), 10, match="unknown index mode")
    # values payload must carry exactly k elements and must not itself be top-k
    wrong_k = ok[: HEADER_BYTES + 5 + 6] + Raw().encode(torch.ones(2))
    _raise(wrong_k, 10, match="expected k = 3")
    nested = ok[: HEADER_BYTES + 5 + 6] + TopK(k=1).encode(torch.ones(3))
    _raise(nested, 10, match="nested top-k")
    corrupt_inner = ok[:-20] + b"ZZ" + ok[-18:]  # inner payload: 8 + 12 bytes
    _raise(corrupt_inner, 10, match="bad magic")


def test_topk_bitmap_is_validated():
    c = TopK(k=6)
    x = vec(12)
    p = bytearray(c.encode(x))
    assert p[HEADER_BYTES + 4] == topk._IDX_BITMAP
    bitmap_at = HEADER_BYTES + 5  # 2 bytes for 12 elements
    q = bytearray(p)
    q[bitmap_at + 1] |= 0x80  # bit 15: padding beyond element 11
    _raise(bytes(q), 12, match="padding bits in the index bitmap")
    q = bytearray(p)
    q[bitmap_at] ^= 0xFF  # flips eight bits: the popcount no longer matches k
    if bin(q[bitmap_at]).count("1") + bin(q[bitmap_at + 1]).count("1") != 6:
        _raise(bytes(q), 12, match="set bits, header says k = 6")


def test_codec_decode_checks_the_codec_matches():
    x = vec(100)
    p = parse_codec("int8:chunk=10").encode(x)
    assert parse_codec("int8:chunk=10").decode(p, 100).shape == (100,)
    _raise(p, 100, match="does not match the expected int4", codec=parse_codec("int4:chunk=10"))
    _raise(p, 100, match="does not match", codec=parse_codec("int8:chunk=20"))
    _raise(p, 100, match="does not match", codec=parse_codec("fp16"))
    pk = parse_codec("topk:0.1+int8").encode(x)
    _raise(pk, 100, match="does not match", codec=parse_codec("topk:0.2+int8"))
    _raise(pk, 100, match="does not match", codec=parse_codec("topk:0.1+fp16"))


def test_chunk_larger_than_the_vector_costs_nothing_extra():
    c = parse_codec("int8:chunk=4294967295")
    x = vec(5)
    p = c.encode(x, generator=0)  # no padding to the chunk size, in either direction
    assert len(p) == c.bytes_for(5) == parse_codec("int8:chunk=0").bytes_for(5)
    assert within(c.decode(p, 5), x, c.error_bound(x))


def test_random_garbage_never_yields_a_wrong_tensor():
    g = torch.Generator().manual_seed(0)
    good = parse_codec("topk:0.3+int4:chunk=4").encode(vec(40), generator=0)
    for _ in range(300):
        p = bytearray(good)
        pos = torch.randint(0, len(p), (3,), generator=g)
        for i in pos.tolist():
            p[i] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            y = decode(bytes(p), 40)
        except ValueError:
            continue
        assert y.shape == (40,) and y.dtype == torch.float32


# ------------------------------------------------------------------ speed


def test_encoding_a_million_floats_is_fast():
    x = torch.randn(1_000_000)
    for spec in ("fp16", "int8", "int4", "int2", "topk:0.1+int8"):
        c = parse_codec(spec)
        c.encode(x, generator=0)  # warm up
        t = time.perf_counter()
        p = c.encode(x, generator=0)
        c.decode(p, x.numel())
        # a few tens of ms on a loaded 2-core box; a per-element Python loop would take seconds
        assert time.perf_counter() - t < 1.0, spec


# ------------------------------------------------------------------ error feedback


def test_error_feedback_delivers_the_sum_of_true_updates():
    ef = ErrorFeedback("topk:0.05")
    g = torch.Generator().manual_seed(0)
    n, rounds = 200, 400
    true_sum = torch.zeros(n, dtype=torch.float64)
    sent_sum = torch.zeros(n, dtype=torch.float64)
    for _ in range(rounds):
        u = torch.randn(n, generator=g) + 0.5
        _, dec = ef.encode("dev", u)
        true_sum += u.double()
        sent_sum += dec.double()
        # invariant: what was sent plus what is held equals what was produced
        assert torch.allclose(sent_sum + ef.residual("dev").double(), true_sum, atol=1e-3)
    # the residual stays bounded, so the average of sent updates converges to the true average
    assert ((sent_sum - true_sum).abs() / rounds).max() < 0.1
    without = sum(TopK(0.05).roundtrip(torch.randn(n, generator=g) + 0.5).double() for _ in range(rounds))
    assert ((sent_sum - true_sum).abs() / rounds).max() < ((without - true_sum).abs() / rounds).max() / 5


def test_a_coordinate_too_small_to_be_sent_eventually_is():
    ef = ErrorFeedback(TopK(k=1))
    u = torch.tensor([1.0, 0.3])  # top-1 always picks coordinate 0 without feedback
    first_sent = None
    total = torch.zeros(2)
    for r in range(10):
        _, dec = ef.encode(7, u)
        total += dec
        if dec[1] != 0 and first_sent is None:
            first_sent = r
    assert first_sent is not None and first_sent <= 4  # 0.3 accumulates past 1.0 by round 4
    assert torch.allclose(total + ef.residual(7), u * 10)


def test_error_feedback_with_quantization_and_many_devices():
    ef = ErrorFeedback("int2:chunk=0")
    g = torch.Generator().manual_seed(1)
    population = 10**6
    trained = torch.randint(0, population, (50,), generator=g).tolist()
    for d in trained:
        payload, dec = ef.encode(d, torch.randn(64, generator=g), generator=g)
        assert torch.equal(decode(payload, 64), dec)
    assert len(ef) == len(set(trained))  # only devices that trained hold a residual
    assert 123 not in ef or 123 in trained
    assert ef.nbytes == len(ef) * 64 * 4


def test_error_feedback_storage_options():
    u = torch.randn(1000)
    lossless = ErrorFeedback("none")
    lossless.encode(1, u)
    assert len(lossless) == 0 and lossless.residual(1) is None  # nothing dropped, nothing held
    half = ErrorFeedback("topk:0.1", storage_dtype=torch.float16)
    full = ErrorFeedback("topk:0.1")
    half.encode(1, u)
    full.encode(1, u)
    assert half.nbytes * 2 == full.nbytes
    assert torch.allclose(half.residual(1), full.residual(1), rtol=2**-10, atol=1e-7)
    with pytest.raises(ValueError, match="storage_dtype"):
        ErrorFeedback("fp16", storage_dtype=torch.bfloat16)


def test_error_feedback_eviction_and_state():
    ef = ErrorFeedback("topk:k=1", max_devices=2)
    for d in (1, 2, 3):
        ef.encode(d, torch.tensor([1.0, 0.5]))
    assert 1 not in ef and 2 in ef and 3 in ef and ef.evicted == 1
    ef.encode(2, torch.tensor([1.0, 0.5]))  # 2 becomes most recent; 3 is next out
    ef.encode(4, torch.tensor([1.0, 0.5]))
    assert set(ef._residuals) == {2, 4}
    ef.forget(4)
    assert 4 not in ef
    other = ErrorFeedback("topk:k=1", max_devices=2)
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residual(2), ef.residual(2)) and other.evicted == ef.evicted
    with pytest.raises(ValueError, match="codec"):
        ErrorFeedback("topk:k=2").load_state_dict(ef.state_dict())
    with pytest.raises(ValueError, match="shape"):
        ef.compensate(2, torch.zeros(3))
    u = torch.tensor([1.0, 0.5])
    v = ef.compensate(2, u)
    assert torch.equal(u, torch.tensor([1.0, 0.5])) and not torch.equal(v, u)


def test_encode_upload_leaves_the_residual_until_recorded():
    """The client's order: encode with the residual, advance it only once the update counted."""
    ef = ErrorFeedback("topk:k=1")
    u = torch.tensor([1.0, 0.75, -0.25])
    first = encode_upload(ef.codec, u, 7, ef, "dev")
    assert torch.equal(first.decoded, torch.tensor([1.0, 0.0, 0.0])) and torch.equal(first.compensated, u)
    assert ef.residual("dev") is None  # a rejected upload leaves nothing behind
    again = encode_upload(ef.codec, u, 7, ef, "dev")
    assert again.payload == first.payload
    ef.record("dev", again.compensated, again.decoded)  # accepted
    assert torch.equal(ef.residual("dev"), torch.tensor([0.0, 0.75, -0.25]))
    second = encode_upload(ef.codec, u, 7, ef, "dev")
    assert torch.equal(second.compensated, torch.tensor([1.0, 1.5, -0.5]))
    assert torch.equal(second.decoded, torch.tensor([0.0, 1.5, 0.0]))  # what was held is sent


def test_encode_upload_is_what_error_feedback_encodes():
    u, seed = vec(1000, seed=3), 11
    ef = ErrorFeedback("topk:0.1+int4")
    for _ in range(2):  # the second round carries a residual
        held = ErrorFeedback("topk:0.1+int4")
        held.load_state_dict(ef.state_dict())
        upload = encode_upload(held.codec, u, seed, held, 5)
        payload, decoded = ef.encode(5, u, seed)
        assert upload.payload == payload and torch.equal(upload.decoded, decoded)
    plain = encode_upload(parse_codec("int8"), u, seed)
    assert plain.payload == parse_codec("int8").encode(u, seed) and plain.compensated is u
    assert torch.equal(plain.decoded, decode(plain.payload, 1000))
    assert len(plain.payload) == parse_codec("int8").bytes_for(1000)


def test_encode_upload_refuses_a_payload_its_transfer_was_not_charged_for():
    class Short(Raw):
        def bytes_for(self, numel):
            return super().bytes_for(numel) - 4

    with pytest.raises(RuntimeError, match="payload of 48 bytes, charged 44"):
        encode_upload(Short(), torch.zeros(10), 0)
