"""Property-based fuzzing (hypothesis) of every endpoint: at least 1,000 generated requests,
from random bytes to structurally valid frames with one field wrong. No request may produce a
5xx or an exception, and the model bytes and version must stay as they were."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_inputs import Harness

from asyncfl import wire

EXAMPLES = 1100
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def test_fuzz_no_5xx_and_model_unchanged(tmp_path):
    h = Harness(tmp_path, rate_per_s=1e6, rate_burst=1e6)
    lease = h.checkin("a")  # a real lease: frames can get past the lease check into every deeper one
    m = h.server.model
    frame = h.frame(lease)  # one frame: each call draws a new idempotency key, so header lengths differ
    template = json.loads(frame[8 : 8 + int.from_bytes(frame[4:8], "little")])
    before = h.snapshot()
    auths = st.sampled_from(
        [
            {},
            h.auth("a"),
            {"Authorization": f"Bearer {h.foreign}"},
            {"Authorization": "Bearer afl_x"},
            {"Authorization": "Basic Zm9v"},
            {"Authorization": ""},
        ]
    )
    sent = []

    @st.composite
    def header_mutation(draw):
        header = dict(template)
        header["base_version"] = draw(st.integers(1, 2**40))  # never the lease's: nothing can be folded in
        for key in draw(st.lists(st.sampled_from(sorted(template) + ["extra"]), max_size=3)):
            if draw(st.booleans()):
                header.pop(key, None)
            else:
                header[key] = draw(json_values)
        if draw(st.booleans()):
            header["tensors"] = draw(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "name": st.sampled_from(m.names + ["x"]),
                            "shape": st.lists(st.integers(-2, 70), max_size=3),
                            "dtype": st.sampled_from(["float32", "float64", "float16", "int8", "bool", ""]),
                        }
                    ),
                    max_size=6,
                )
            )
        raw = json.dumps(header).encode()
        payload = draw(st.sampled_from(["good", "random", "nan", "huge"]))
        n = m.numel
        if payload == "good":
            body = np.random.default_rng(draw(st.integers(0, 99))).normal(0, 0.01, n).astype("<f4").tobytes()
        elif payload == "nan":
            body = np.full(n, np.nan, "<f4").tobytes()
        elif payload == "huge":
            body = np.full(n, 1e30, "<f4").tobytes()
        else:
            body = draw(st.binary(max_size=256))
        return ("POST", "/v1/update", h.auth("a"), wire.MAGIC + len(raw).to_bytes(4, "little") + raw + body)

    @st.composite
    def byte_mutation(draw):
        body = bytearray(h.frame(lease, base_version=draw(st.integers(1, 99))))
        for _ in range(draw(st.integers(1, 8))):
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(body)))
        return ("POST", "/v1/update", draw(auths), bytes(body[:cut] if draw(st.booleans()) else body))

    raw_request = st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        st.sampled_from(
            [
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
                "/nope",
                "/v1/model/",
                "/v1/history?since=99999999999999999999999",
            ]
        ),
        auths,
        st.binary(max_size=300),
    )
    checkin = st.tuples(
        st.just("POST"), st.just("/v1/checkin"), auths, json_values.map(lambda v: json.dumps(v).encode())
    )

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(st.one_of(header_mutation(), byte_mutation(), raw_request, checkin))
    def one(request):
        method, path, headers, body = request
        r = h.http.request(method, path, headers=headers, content=body)
        sent.append(r.status_code)
        assert r.status_code < 500, (request, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/json") and "error" in r.json()

    try:
        one()
        after = h.snapshot()
    finally:
        h.close()
    assert len(sent) >= 1000
    version, model, updates, _, fill = after
    assert (version, model, updates, fill) == (before[0], before[1], before[2], before[4])
    codes = sorted(set(sent))
    print(f"fuzz: {len(sent)} requests, status codes {codes}")
