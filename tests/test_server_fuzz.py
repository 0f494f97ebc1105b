"""Property-based fuzzing (hypothesis) of every endpoint, on three servers: plain FedBuff, a
compressed upload codec (top-k + int8) and SCAFFOLD (an upload field besides the delta). The
requests range from random bytes to structurally valid frames with one field wrong, and JSON
written by hand to hold what `json.dumps` never writes: nesting thousands deep, integers of
thousands of digits, duplicate keys, NaN, lone surrogates, shapes whose product wraps in int64.
No request may produce a 5xx or an exception, and after every rejected request the model, the
version, the aggregator's state and the counts must be as they were.

`make test` runs 1,700 requests, `make test-slow` 14,000 (the counts are printed)."""

from __future__ import annotations

import copy
import json
from urllib.parse import quote

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_server_compression import CHarness
from test_server_inputs import Harness

from asyncfl import wire
from asyncfl.algorithms.scaffold import CONTROL_DELTA
from asyncfl.compression import parse_codec

FAST = {"fedbuff": 1100, "topk+int8": 300, "scaffold": 300}
SLOW = {"fedbuff": 10_000, "topk+int8": 2_000, "scaffold": 2_000}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
# JSON text json.dumps never writes (each was an HTTP 500 somewhere before it was bounded)
hostile_json = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(1, 5000).map(lambda d: "[" * d + "]" * d),
    st.integers(1, 3000).map(lambda d: '{"a":' * d + "1" + "}" * d),
    st.sampled_from(["NaN", "-Infinity", "1e999", "-0", "1" + "0" * 400 + ".5", '"\\ud800"', '"\\u0000"', "[]", "{}"]),
)
dims = st.sampled_from([0, 1, 2, 16, -1, -(2**31), 2**31, 2**32, 274177, 67280421310721, 10**17, 10**18 - 1, 10**18])
AUTH_VALUES = ["Bearer afl_x", "Basic Zm9v", ""]
PATHS = [
    "/v1/update",
    "/v1/checkin",
    "/v1/task",
    "/v1/model/0",
    "/v1/model/-1",
    "/v1/model/abc",
    "/v1/model/99999999999999999999",
    "/v1/history?since=x",
    "/v1/history?since=-5",
    "/status",
    "/metrics",
    "/",
    "/docs",
    "/openapi.json",
    "/nope",
    "/v1/model/",
    "/v1/history?since=99999999999999999999999",
]


class Target:
    """A server in process, a real lease on it, and a good upload frame for that lease."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        if kind == "topk+int8":
            self.h = CHarness(tmp_path, {"compression": {"upload": "topk:0.1+int8"}})
            self.codec = parse_codec("topk:0.1+int8")
        elif kind == "scaffold":
            self.h = Harness(tmp_path, {"name": "scaffold"}, {"mode": "sync", "concurrency": 2})
        else:
            self.h = Harness(tmp_path)
        self.h.foreign = getattr(self.h, "foreign", None) or self.h.mint("z", "other-task")
        self.lease = self.h.checkin("a")

    def frame(self, base_version: int, key: str) -> bytes:
        h, n = self.h, self.h.server.model.numel
        delta = torch.full((n,), 0.01)
        fields = dict(base_version=base_version, key=key)
        if self.kind == "topk+int8":
            payload = self.codec.encode(delta, 0)
            return h.cframe(self.lease, payload, self.codec.spec, base_version=base_version, idempotency_key=key)
        if self.kind == "scaffold":
            return h.frame(self.lease, delta, extras={CONTROL_DELTA: delta}, **fields)
        return h.frame(self.lease, delta, **fields)

    def state(self):
        """What no rejected request may change (in process: cheap enough to take every time)."""
        srv = self.h.server
        agg = srv.aggregation
        return (
            agg.state.version,
            agg.state.w.clone(),
            copy.deepcopy(agg.aggregator.state_dict()),
            dict(agg.counts),
            list(agg.pending_seqs),
            srv.uploads.next_seq,
            srv.coordinator.issued,
            sorted(srv.coordinator.leases),
        )


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def header_of(frame: bytes) -> tuple[str, bytes]:
    n = int.from_bytes(frame[4:8], "little")
    return frame[8 : 8 + n].decode(), frame[8 + n :]


def claimed_base(body: bytes):
    """The base_version a frame's header claims, if it can be read at all."""
    try:
        return json.loads(body[8 : 8 + int.from_bytes(body[4:8], "little")]).get("base_version")
    except Exception:
        return None


def framed(text: str | bytes, payload: bytes) -> bytes:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return wire.MAGIC + len(raw).to_bytes(4, "little") + raw + payload


def requests(t: Target):
    """The strategy of (method, path, headers, body) against target `t`."""
    h, lease = t.h, t.lease
    m = h.server.model
    template_text, good_payload = header_of(t.frame(lease["base_version"] + 1, "k-template"))
    template = json.loads(template_text)
    auths = st.sampled_from(
        [{}, h.auth("a"), {"Authorization": f"Bearer {h.foreign}"}] + [{"Authorization": v} for v in AUTH_VALUES]
    )

    def payload_of(draw) -> bytes:
        kind = draw(st.sampled_from(["good", "float32", "random", "nan", "huge", "cut"]))
        n = m.numel
        if kind == "good":
            return good_payload
        if kind == "float32":
            return np.random.default_rng(draw(st.integers(0, 99))).normal(0, 0.01, n).astype("<f4").tobytes()
        if kind == "nan":
            return np.full(n, np.nan, "<f4").tobytes()
        if kind == "huge":
            return np.full(n, 1e30, "<f4").tobytes()
        if kind == "cut":
            return good_payload[: draw(st.integers(0, len(good_payload)))]
        return draw(st.binary(max_size=256))

    @st.composite
    def header_mutation(draw):
        header = dict(template)
        header["base_version"] = draw(st.integers(1, 2**40))  # never the lease's: nothing can be folded in
        for key in draw(st.lists(st.sampled_from(sorted(template) + ["extra"]), max_size=3)):
            if draw(st.booleans()):
                header.pop(key, None)
            else:
                header[key] = draw(json_values)
        assume(header.get("base_version") != lease["base_version"])
        if draw(st.booleans()):
            header["tensors"] = draw(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "name": st.sampled_from(m.names + ["x", f"{CONTROL_DELTA}:{m.names[0]}"]),
                            "shape": st.lists(st.integers(-2, 70) | dims, max_size=3),
                            "dtype": st.sampled_from(["float32", "float64", "float16", "int8", "bool", ""]),
                        }
                    ),
                    max_size=6,
                )
            )
        return ("POST", "/v1/update", h.auth("a"), framed(json.dumps(header), payload_of(draw)))

    @st.composite
    def hostile_header(draw):
        """The template's header as text, with hostile JSON spliced in: a value replaced, a key
        repeated, a new key, or a tensor's shape with dimensions that overflow."""
        items = [(k, json.dumps(v, separators=(",", ":"))) for k, v in template.items()]
        items = [(k, v) if k != "base_version" else (k, str(draw(st.integers(1, 99)))) for k, v in items]
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["replace", "repeat", "add", "shape"]))
            i = draw(st.integers(0, len(items) - 1))
            if op == "replace" and items[i][0] != "base_version":
                items[i] = (items[i][0], draw(hostile_json))
            elif op == "repeat":
                items.append((items[i][0], items[i][1] if draw(st.booleans()) else draw(hostile_json)))
            elif op == "add":
                items.insert(i, (draw(st.text(max_size=5)), draw(hostile_json)))
            elif op == "shape":
                tensors = [dict(x) for x in template["tensors"]]
                tensors[draw(st.integers(0, len(tensors) - 1))]["shape"] = draw(st.lists(dims, max_size=3))
                items = [(k, json.dumps(tensors) if k == "tensors" else v) for k, v in items]
        sep = draw(st.sampled_from([",", " , ", ",\n"]))
        text = "{" + sep.join(f"{json.dumps(k)}:{v}" for k, v in items) + "}"
        return ("POST", "/v1/update", h.auth("a"), framed(text, payload_of(draw)))

    @st.composite
    def byte_mutation(draw):
        body = bytearray(t.frame(draw(st.integers(1, 99)), f"k-{draw(st.integers(0, 2**62))}"))
        for _ in range(draw(st.integers(1, 8))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        body = bytes(body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body)
        assume(claimed_base(body) != lease["base_version"])  # else a valid upload, not a rejection test
        return ("POST", "/v1/update", draw(auths), body)

    raw_request = st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        st.sampled_from(PATHS),
        auths,
        st.binary(max_size=300),
    )
    number_paths = st.tuples(
        st.just("GET"),
        st.builds(
            lambda path, v: path + quote(v[:200]),
            st.sampled_from(["/v1/model/", "/v1/history?since="]),
            hostile_json | st.integers().map(str),
        ),
        st.just(h.auth("b")),
        st.just(b""),
    )
    checkin = st.tuples(
        st.just("POST"), st.just("/v1/checkin"), auths, json_values.map(lambda v: json.dumps(v).encode())
    )
    hostile_checkin = st.tuples(
        st.just("POST"),
        st.just("/v1/checkin"),
        st.just(h.auth("b")),
        (hostile_json | hostile_json.map(lambda v: '{"eligible":true,"x":' + v + "}")).map(
            lambda v: v.encode("utf-8", "surrogatepass")
        ),
    )
    content_length = st.tuples(
        st.sampled_from(["POST"]),
        st.sampled_from(["/v1/update", "/v1/checkin"]),
        st.sampled_from(["9" * 5000, "\u00b2".encode("latin-1"), "-1", "1e3", "0x10", " 12", "00000"]).map(
            lambda v: h.auth("a") | {"Content-Length": v}
        ),
        st.binary(max_size=20),
    )
    return st.one_of(
        header_mutation(),
        hostile_header(),
        byte_mutation(),
        raw_request,
        number_paths,
        checkin,
        hostile_checkin,
        content_length,
    )


def fuzz(tmp_path, kind: str, examples: int) -> None:
    t = Target(kind, tmp_path)
    sent = []

    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(requests(t))
    def one(request):
        method, path, headers, body = request
        before = t.state()
        r = t.h.http.request(method, path, headers=headers, content=body)
        sent.append(r.status_code)
        assert r.status_code < 500, (request, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/json") and "error" in r.json()
            assert same(t.state(), before), (request, r.status_code, r.text)

    try:
        before = t.h.snapshot()
        one()
        after = t.h.snapshot()
    finally:
        t.h.close()
    assert len(sent) >= examples
    version, model, updates, _, fill = after
    assert (version, model, updates, fill) == (before[0], before[1], before[2], before[4])
    print(f"fuzz {kind}: {len(sent)} requests, status codes {sorted(set(sent))}")


@pytest.mark.parametrize("kind", FAST)
def test_fuzz_no_5xx_and_model_unchanged(tmp_path, kind):
    fuzz(tmp_path, kind, FAST[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind", SLOW)
def test_fuzz_many_no_5xx_and_model_unchanged(tmp_path, kind):
    fuzz(tmp_path, kind, SLOW[kind])
