"""What one request may cost the server: malformed JSON and frames are answered 400/422 (each
of these was an HTTP 500 before), the upload body limit derives from the task's largest valid
frame, and slow bodies are cut off with 408. Slow senders on a real server: test_server_slow.py."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
import torch
from test_server_compression import CHarness
from test_server_inputs import Harness, assert_rejected, unchanged

from asyncfl import strict_json, wire
from asyncfl.compression import parse_codec
from asyncfl.config import ConfigError
from asyncfl.server.app import read_limited
from asyncfl.server.errors import ApiError
from asyncfl.server.limits import BODY_MARGIN, SPARE_DESCRIPTORS, make_room_for


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def header_text(frame: bytes) -> str:
    return frame[8 : 8 + int.from_bytes(frame[4:8], "little")].decode()


def framed(text: str, payload: bytes) -> bytes:
    raw = text.encode()
    return wire.MAGIC + len(raw).to_bytes(4, "little") + raw + payload


def with_tensors(text: str, tensors: list[dict]) -> str:
    return json.dumps(json.loads(text) | {"tensors": tensors})


# 2**64 + 1 = 274177 * 67280421310721: in int64 this shape has 1 element, so before the product
# was taken in Python integers a 4-byte payload passed the length check and reshape raised
WRAPS_TO_ONE = [274177, 67280421310721]

MALFORMED_FRAMES = {
    "nested 5000 deep": (lambda t, p: framed(t[:-1] + ',"x":' + "[" * 5000 + "]" * 5000 + "}", p), 400, "nested"),
    "integer of 5000 digits": (lambda t, p: framed(t[:-1] + ',"x":' + "9" * 5000 + "}", p), 400, "digits"),
    "base_version of 19 digits": (
        lambda t, p: framed(t.replace('"base_version":0', '"base_version":' + "1" * 19), p),
        400,
        "digits",
    ),
    "shape product wraps to 1 in int64": (
        lambda t, p: framed(with_tensors(t, [{"name": "w", "shape": WRAPS_TO_ONE, "dtype": "float32"}]), p[:4]),
        422,
        "exceeds",
    ),
    "shape product wraps to 0 in int64": (
        lambda t, p: framed(with_tensors(t, [{"name": "w", "shape": [2**32, 2**32], "dtype": "float32"}]), b""),
        422,
        "exceeds",
    ),
    "dimension over the element bound": (
        lambda t, p: framed(with_tensors(t, [{"name": "w", "shape": [10**17], "dtype": "float32"}]), b""),
        422,
        "exceeds",
    ),
    "zero and huge dimensions": (
        lambda t, p: framed(with_tensors(t, [{"name": "w", "shape": [0, 10**17, 10**17], "dtype": "float32"}]), b""),
        422,
        "exceeds",
    ),
    "negative dimension": (
        lambda t, p: framed(with_tensors(t, [{"name": "w", "shape": [-4, -1], "dtype": "float32"}]), p[:16]),
        422,
        "negative",
    ),
    "duplicate key": (lambda t, p: framed(t[:-1] + ',"kind":"update"}', p), 400, "duplicate key 'kind'"),
    "duplicate key in a tensor": (
        lambda t, p: framed(t.replace('"dtype":"float32"', '"dtype":"float32","dtype":"float64"', 1), p),
        400,
        "duplicate key 'dtype'",
    ),
    "invalid UTF-8": (lambda t, p: wire.MAGIC + (3).to_bytes(4, "little") + b'"\xff"' + p, 400, "UTF-8"),
}


@pytest.mark.parametrize("case", MALFORMED_FRAMES, ids=list(MALFORMED_FRAMES))
def test_malformed_frame_is_4xx_and_changes_nothing(h, case):
    make, status, words = MALFORMED_FRAMES[case]
    lease = h.checkin("a")
    frame = h.frame(lease)
    text = header_text(frame)
    before = h.snapshot()
    r = h.upload("a", make(text, frame[8 + len(text.encode()) :]))
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["detail"].lower(), r.text
    unchanged(h, before)
    assert h.upload("a", frame).status_code == 200  # the lease still takes its good frame


def test_compressed_frame_shapes_are_bounded_before_decoding():
    """The client decodes model frames without knowing the shapes: a tiny payload claiming a
    huge tensor must not be decoded into it."""
    codec = parse_codec("topk:0.01")
    payload = codec.encode(torch.ones(100))
    for tensors, words in (
        ([("a", (2**32, 2**32))], "exceeds"),
        ([("a", tuple(WRAPS_TO_ONE))], "exceeds"),
        ([("a", (2**30,)), ("b", (2**30,)), ("c", (1,))], "more than"),
    ):
        frame = wire.compressed_frame({"kind": "model", "version": 0}, tensors, payload, codec.spec)
        with pytest.raises(wire.WireError, match=words) as err:
            wire.decode(frame, wire.ModelHeader, {codec.spec: wire.compressed_decoder(codec)})
        assert err.value.status == 422


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"eligible":' + b"[" * 3000 + b"]" * 3000 + b"}", "nested 3001 levels"),
        (b"[" * 40 + b"]" * 40, "nested 40 levels"),
        (b'{"eligible": ' + b"1" * 5000 + b"}", "5000 digits"),
        (b'{"eligible": true, "eligible": false}', "duplicate key 'eligible'"),
        (b'{"eligible": "\xc3"}', "not UTF-8"),
    ],
)
def test_malformed_checkin_body_is_400(h, body, words):
    before = h.snapshot()
    assert_rejected(h, h.http.post("/v1/checkin", headers=h.auth("b"), content=body), 400, "malformed", words)
    unchanged(h, before)


def test_strict_json_keeps_what_plain_json_reads():
    text = b'{"a": [1, -2.5e3, "[{\\"", null, true], "b": {"c": -999999999999999999}, "d": "\\u00e9"}'
    assert strict_json.loads(text) == json.loads(text)
    assert strict_json.loads(b"[" * 32 + b"]" * 32) == json.loads(b"[" * 32 + b"]" * 32)


class Body:
    """A request whose body arrives in `chunks`, `delay` seconds apart; records what was read."""

    def __init__(self, headers: dict, chunks: int = 1, delay: float = 0.0):
        self.headers, self.chunks, self.delay, self.read = headers, chunks, delay, 0

    async def stream(self):
        for _ in range(self.chunks):
            await asyncio.sleep(self.delay)
            self.read += 1
            yield b"\0" * 10


def limited(request, limit=1000, timeout=None) -> ApiError:
    with pytest.raises(ApiError) as err:
        asyncio.run(read_limited(request, limit, timeout))
    return err.value


@pytest.mark.parametrize(
    "declared, status", [("\u00b2", 400), ("\u0663", 400), ("1 0", 400), ("-5", 400), ("9" * 5000, 413), ("1001", 413)]
)
def test_content_length_that_is_no_byte_count_or_too_large_is_refused_unread(declared, status):
    request = Body({"content-length": declared})
    assert limited(request).status == status and request.read == 0


def test_leading_zeros_in_content_length_are_a_byte_count():
    assert asyncio.run(read_limited(Body({"content-length": "0000000010"}), 10)) == b"\0" * 10


def test_a_body_sent_too_slowly_is_408_and_closes_the_connection():
    request = Body({}, chunks=100, delay=0.05)
    t0 = time.monotonic()
    err = limited(request, limit=10**6, timeout=0.3)
    assert err.status == 408 and err.code == "body_timeout" and err.headers == {"Connection": "close"}
    assert time.monotonic() - t0 < 1.0 and 3 <= request.read <= 8
    assert asyncio.run(read_limited(Body({}, chunks=3, delay=0.01), 100, timeout=5)) == b"\0" * 30


def largest_frame(h, tensors, payload_bytes):
    """The longest update frame a client can send: every header field at its bound, built
    field by field (not with the function under test)."""
    header = {
        "kind": "update",
        "lease_id": "L" * 128,
        "base_version": 10**18 - 1,
        "idempotency_key": "k" * 128,
        "n_examples": 10**9,
        "steps": 10**9,
        "planned_steps": 10**9,
        "loss": -2.2250738585072014e-308,
        "start_loss": -2.2250738585072014e-308,
    }
    frame = wire.compressed_frame(header, tensors, b"\0" * payload_bytes, "c" * 64)
    wire.UpdateHeader.model_validate_json(header_text(frame))  # a valid header
    return frame


def test_default_body_limit_is_the_largest_valid_frame_with_a_margin(tmp_path):
    with Harness(tmp_path, max_body_bytes=None) as h:
        m = h.server.model
        frame = largest_frame(h, list(zip(m.names, m.shapes)), 4 * m.numel)
        limit = math.ceil(BODY_MARGIN * len(frame))
        assert wire.largest_update_frame(list(zip(m.names, m.shapes)), 4 * m.numel) == len(frame)
        assert h.http.get("/v1/task", headers=h.auth("a")).json()["max_body_bytes"] == limit == h.server.max_body_bytes
        assert 4 * m.numel < limit < 2 * 4 * m.numel  # 1210 weights: 7049 bytes, where it was 64 MiB
        lease = h.checkin("a")
        before = h.snapshot()
        good = h.frame(lease)
        over = good + b"\0" * (limit + 1 - len(good))
        assert len(over) == limit + 1
        assert_rejected(h, h.upload("a", over), 413, "too_large", f"exceeds the limit of {limit} bytes")
        unread = Body({"content-length": str(limit + 1)})
        assert limited(unread, h.server.max_body_bytes).status == 413 and unread.read == 0
        unchanged(h, before)
        assert h.upload("a", good).status_code == 200


def test_body_limit_counts_an_algorithms_upload_fields(tmp_path):
    from test_scaffold import scaffold_frame

    with Harness(tmp_path, {"name": "scaffold"}, {"mode": "sync", "concurrency": 2}, max_body_bytes=None) as h:
        m = h.server.model
        tensors = list(zip(m.names, m.shapes)) + list(zip(wire.field_names("control_delta", m.names), m.shapes))
        limit = math.ceil(BODY_MARGIN * len(largest_frame(h, tensors, 8 * m.numel)))
        assert h.server.max_body_bytes == limit and limit > 8 * m.numel
        lease = h.checkin("a")
        frame = scaffold_frame(h, lease, torch.full((m.numel,), 0.01), torch.full((m.numel,), 0.01))
        assert len(frame) > 8 * m.numel
        assert h.upload("a", frame).status_code == 200


def test_body_limit_follows_the_upload_codec(tmp_path):
    with CHarness(tmp_path, {"compression": {"upload": "int8"}}, max_body_bytes=None) as h:
        m = h.server.model
        codec = parse_codec("int8")
        limit = math.ceil(BODY_MARGIN * len(largest_frame(h, list(zip(m.names, m.shapes)), codec.bytes_for(m.numel))))
        assert h.server.max_body_bytes == limit and limit < 4 * m.numel  # int8: a quarter of float32, plus scales
        lease = h.checkin("a")
        delta = torch.randn(m.numel, generator=torch.Generator().manual_seed(0)) * 0.01
        assert h.upload("a", h.cframe(lease, codec.encode(delta, 0), "int8")).status_code == 200


def test_an_explicit_body_limit_wins(tmp_path):
    with Harness(tmp_path, max_body_bytes=123_456) as h:
        assert h.server.max_body_bytes == 123_456
        assert h.http.get("/v1/task", headers=h.auth("a")).json()["max_body_bytes"] == 123_456


class Limits:
    """resource's open-files limit, as a test sets it."""

    def __init__(self, soft, hard):
        self.value = (soft, hard)

    def getrlimit(self, which):
        return self.value

    def setrlimit(self, which, value):
        self.value = value


@pytest.mark.parametrize(
    "soft, hard, after",
    [
        (1024, 4096, (1024 + SPARE_DESCRIPTORS, 4096)),  # raised to fit, hard limit kept
        (65536, 65536, (65536, 65536)),  # room already
    ],
)
def test_the_open_files_limit_is_raised_to_fit_the_connection_cap(monkeypatch, soft, hard, after):
    import resource

    limits = Limits(soft, hard)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    assert make_room_for(1024) == 1024
    assert limits.value == after


def test_a_connection_cap_above_the_hard_limit_is_refused_by_name(monkeypatch):
    import resource

    limits = Limits(256, 512)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    with pytest.raises(ConfigError, match="max_connections 1024 needs 1152 open files.*hard limit 512"):
        make_room_for(1024, chosen=True)
    assert limits.value == (256, 512)


def test_the_default_cap_shrinks_to_a_small_hard_limit_rather_than_refuse_to_start(monkeypatch, caplog):
    import resource

    limits = Limits(256, 512)
    monkeypatch.setattr(resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", limits.setrlimit)
    assert make_room_for(1024, chosen=False) == 512 - SPARE_DESCRIPTORS
    assert limits.value == (512, 512)
    assert "serving at most 384 connections" in caplog.text
