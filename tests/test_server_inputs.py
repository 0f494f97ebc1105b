"""Server behaviour in process (FastAPI TestClient): bad input, the lease rule, idempotency,
sync rounds and restart durability. Every rejection must name the problem and leave the model
bytes, the version and the run state untouched."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from asyncfl import config, wire
from asyncfl.server.app import create_app, read_limited
from asyncfl.server.auth import CLIENT, OPERATOR, OPERATOR_COOKIE, new_token
from asyncfl.server.errors import ApiError
from asyncfl.server.service import FLServer
from asyncfl.server.settings import ServerConfig


def experiment(algorithm: dict, scheduler: dict, seed: int = 0) -> config.ExperimentConfig:
    return config.validate(
        {
            "name": "t",
            "seed": seed,
            "data": {"num_clients": 8, "partition": {"kind": "iid"}},
            "model": {"name": "mlp", "hidden": [16]},
            "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
            "runs": [{"name": "task1", "algorithm": algorithm, "scheduler": scheduler}],
        }
    )


class Harness:
    """A server in process plus helpers to make leases and (bad) uploads."""

    def __init__(self, tmp_path, algorithm=None, scheduler=None, background=False, **settings):
        algorithm = algorithm or {"name": "fedbuff", "buffer_size": 3, "max_staleness": 1}
        scheduler = scheduler or {"mode": "async", "concurrency": 4}
        self.tmp = tmp_path
        self.cfg = experiment(algorithm, scheduler)
        self.settings = ServerConfig(
            **(
                {"max_update_norm": 50.0, "max_body_bytes": 64 * 1024, "rate_per_s": 1000, "rate_burst": 1000}
                | settings
            )
        )
        self.open(background)
        self.tokens = {c: self.mint(c, "task1") for c in "abcdefg"}
        self.foreign = self.mint("z", "other-task")
        self.sign_in()

    operator = None  # an operator token, sent as the dashboard's cookie to the operator endpoints

    def open(self, background=False):
        self.server = FLServer(self.cfg, self.settings, self.tmp / "state")
        self.http = TestClient(create_app(self.server, background=background))
        self.http.__enter__()
        if self.operator:
            self.http.cookies.set(OPERATOR_COOKIE, self.operator)

    def sign_in(self):
        self.operator = self.mint("op", "task1", OPERATOR)
        self.http.cookies.set(OPERATOR_COOKIE, self.operator)

    def close(self):
        self.http.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def mint(self, client, task, role=CLIENT):
        tok = new_token()
        self.server.store.create_token(tok, client, task, role)
        return tok

    def auth(self, client):
        return {"Authorization": f"Bearer {self.tokens[client]}"}

    def checkin(self, client):
        r = self.http.post("/v1/checkin", headers=self.auth(client), json={"eligible": True})
        assert r.status_code == 200, r.text
        return r.json()

    def frame(self, lease, delta=None, key=None, **header):
        m = self.server.model
        delta = torch.full((m.numel,), 0.01) if delta is None else delta
        fields = dict(
            lease_id=lease["lease_id"],
            base_version=lease["base_version"],
            idempotency_key=key or f"k-{np.random.randint(1 << 62)}",
            n_examples=20,
            steps=2,
            loss=1.0,
        )
        fields.update(header)
        return wire.encode_update(delta=delta, names=m.names, shapes=m.shapes, **fields)

    def upload(self, client, body, **kw):
        return self.http.post("/v1/update", headers=self.auth(client) | kw.pop("headers", {}), content=body, **kw)

    def snapshot(self):
        s = self.http.get("/status").json()
        model = self.http.get(f"/v1/model/{s['version']}", headers=self.auth("g")).content
        return s["version"], model, s["updates"], s["leases"]["active"], s["buffer"]["fill"]


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def stream_of(chunks):
    for _ in range(chunks):
        yield b"\0" * 4096


def assert_rejected(h, resp, status, code, words):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    assert words.lower() in body["detail"].lower(), body


def unchanged(h, before):
    assert h.snapshot() == before


# ---- authentication -------------------------------------------------------------------------


def test_missing_and_invalid_token_are_401(h):
    lease = h.checkin("a")
    before = h.snapshot()
    r = h.http.post("/v1/update", content=h.frame(lease))
    assert_rejected(h, r, 401, "unauthorized", "missing bearer token")
    r = h.http.post("/v1/update", content=h.frame(lease), headers={"Authorization": "Bearer afl_nope"})
    assert_rejected(h, r, 401, "unauthorized", "invalid or revoked token")
    r = h.http.post("/v1/checkin", headers={"Authorization": "Basic abc"})
    assert_rejected(h, r, 401, "unauthorized", "Bearer <token>")
    unchanged(h, before)


def test_token_of_another_task_is_403(h):
    lease = h.checkin("a")
    before = h.snapshot()
    r = h.http.post("/v1/update", content=h.frame(lease), headers={"Authorization": f"Bearer {h.foreign}"})
    assert_rejected(h, r, 403, "forbidden", "task 'other-task'")
    unchanged(h, before)


def test_tokens_are_stored_hashed_and_revocable(h):
    rows = h.server.store.query("SELECT hash FROM tokens")
    assert rows and all(h.tokens["a"] not in r[0] for r in rows)
    assert h.tokens["a"] not in (h.server.store.path.read_bytes().decode("latin-1"))
    h.server.store.revoke_client("b")
    r = h.http.post("/v1/checkin", headers=h.auth("b"))
    assert_rejected(h, r, 401, "unauthorized", "revoked")


# ---- malformed and invalid bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "not an asyncfl frame"),
        (b"hello world, not a frame", "not an asyncfl frame"),
        (wire.MAGIC + (10**6).to_bytes(4, "little") + b"{}", "exceeds"),
        (wire.MAGIC + (50).to_bytes(4, "little") + b"{}", "runs past the end"),
        (wire.MAGIC + (5).to_bytes(4, "little") + b"{oops", "not valid UTF-8 JSON"),
        (wire.MAGIC + (2).to_bytes(4, "little") + b"[]", "must be a JSON object"),
    ],
)
def test_malformed_body_is_400(h, body, words):
    h.checkin("a")
    before = h.snapshot()
    assert_rejected(h, h.upload("a", body), 400, "malformed", words)
    unchanged(h, before)


def test_header_missing_or_bad_field_is_400_naming_it(h):
    lease = h.checkin("a")
    before = h.snapshot()
    good = h.frame(lease)
    hlen = int.from_bytes(good[4:8], "little")
    header = json.loads(good[8 : 8 + hlen])
    for field, value, named in (
        ("n_examples", None, "n_examples"),
        ("base_version", "3", "base_version"),
        ("n_examples", 0, "n_examples"),
        ("idempotency_key", "x", "idempotency_key"),
    ):
        broken = dict(header)
        if value is None:
            broken.pop(field)
        else:
            broken[field] = value
        raw = json.dumps(broken).encode()
        body = wire.MAGIC + len(raw).to_bytes(4, "little") + raw + good[8 + hlen :]
        assert_rejected(h, h.upload("a", body), 400, "malformed", named)
    cut = good[:-4]
    assert_rejected(h, h.upload("a", cut), 400, "malformed", "payload has")
    unchanged(h, before)


def test_wrong_tensor_count_shape_dtype_are_422(h):
    lease = h.checkin("a")
    before = h.snapshot()
    m = h.server.model
    arrays = wire.split_flat(torch.zeros(m.numel), m.names, m.shapes)
    key = {
        "kind": "update",
        "lease_id": lease["lease_id"],
        "base_version": 0,
        "idempotency_key": "key-12345678",
        "n_examples": 5,
        "steps": 1,
        "loss": 0.5,
    }
    body = wire.encode(dict(key, names=m.names[:-1]), arrays[:-1])
    assert_rejected(h, h.upload("a", body), 422, "bad_tensor_count", f"update has {len(arrays) - 1} tensors")
    bad_shape = [a for a in arrays]
    bad_shape[0] = np.zeros((bad_shape[0].shape[0], bad_shape[0].shape[1] + 1), np.float32)
    body = wire.encode(dict(key, names=m.names), bad_shape)
    assert_rejected(h, h.upload("a", body), 422, "bad_shape", "expected [16, 64]")
    body = wire.encode(dict(key, names=m.names), [a.astype(np.float64) for a in arrays])
    assert_rejected(h, h.upload("a", body), 422, "bad_dtype", "float64; expected float32")
    body = wire.encode(dict(key, names=["x"] + m.names[1:]), arrays)
    assert_rejected(h, h.upload("a", body), 422, "bad_tensor_name", f"expected {m.names[0]!r}")
    unchanged(h, before)


def test_unknown_codec_is_422(h):
    lease = h.checkin("a")
    before = h.snapshot()
    good = h.frame(lease)
    hlen = int.from_bytes(good[4:8], "little")
    header = json.loads(good[8 : 8 + hlen]) | {"codec": "zstd-9"}
    raw = json.dumps(header).encode()
    body = wire.MAGIC + len(raw).to_bytes(4, "little") + raw + good[8 + hlen :]
    assert_rejected(h, h.upload("a", body), 422, "unsupported_codec", "unsupported codec 'zstd-9'")
    unchanged(h, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_is_422(h, value):
    lease = h.checkin("a")
    before = h.snapshot()
    delta = torch.zeros(h.server.model.numel)
    delta[7] = value
    assert_rejected(h, h.upload("a", h.frame(lease, delta)), 422, "non_finite", "NaN or Inf")
    unchanged(h, before)


def test_update_norm_above_bound_is_422(h):
    lease = h.checkin("a")
    before = h.snapshot()
    delta = torch.full((h.server.model.numel,), 10.0)
    assert_rejected(h, h.upload("a", h.frame(lease, delta)), 422, "norm_too_large", "exceeds the bound 50")
    unchanged(h, before)


def test_body_above_limit_is_413_before_it_is_read(h):
    lease = h.checkin("a")
    before = h.snapshot()
    big = h.frame(lease) + b"\0" * (70 * 1024)
    assert_rejected(h, h.upload("a", big), 413, "too_large", "exceeds the limit of 65536 bytes")
    assert_rejected(h, h.upload("a", stream_of(20)), 413, "too_large", "exceeds the limit")  # chunked
    consumed = []

    class Chunked:  # no Content-Length: the limit must stop the read part-way through the stream
        headers = {}

        async def stream(self):
            for _ in range(1000):
                consumed.append(1)
                yield b"\0" * 4096

    with pytest.raises(ApiError) as err:
        asyncio.run(read_limited(Chunked(), 64 * 1024))
    assert err.value.status == 413 and len(consumed) == 17
    unchanged(h, before)


# ---- run-state rules ---------------------------------------------------------------------------


def test_staleness_above_max_is_409_and_counted_discarded(h):
    late = h.checkin("a")  # base 0, max_staleness 1, K = 3
    for _ in range(2):
        for c in "bcd":
            lease = h.checkin(c)
            r = h.upload(c, h.frame(lease))
            assert r.status_code == 200, r.text
    before = h.snapshot()
    assert before[0] == 2
    r = h.upload("a", h.frame(late))
    assert_rejected(h, r, 409, "stale", "staleness 2 exceeds max_staleness 1")
    version, model, updates, active, fill = h.snapshot()
    assert (version, model, fill) == before[:2] + (before[4],)
    assert updates["discarded"] == before[2]["discarded"] + 1
    assert h.http.get("/status").json()["rejected"]["stale"] == 1


def test_upload_without_lease_or_after_expiry_is_409(tmp_path):
    with Harness(tmp_path, lease_timeout=0.3) as h:
        lease = h.checkin("a")
        before = h.snapshot()
        r = h.upload("a", h.frame(lease, lease_id="L999-nothing"))
        assert_rejected(h, r, 409, "no_lease", "was not issued to client 'a'")
        r = h.upload("b", h.frame(lease))  # a's lease, b's token
        assert_rejected(h, r, 409, "no_lease", "was not issued to client 'b'")
        unchanged(h, before)
        time.sleep(0.4)
        h.server.tick()  # the background ticker's job: expires the lease, frees the slot
        s = h.http.get("/status").json()
        assert s["leases"]["ended"]["expired"] == 1 and s["leases"]["open_slots"] == 4
        before = h.snapshot()
        r = h.upload("a", h.frame(lease))
        assert_rejected(h, r, 409, "lease_expired", "lease expired")
        unchanged(h, before)


def test_base_version_must_match_the_lease(h):
    lease = h.checkin("a")
    before = h.snapshot()
    r = h.upload("a", h.frame(lease, base_version=5))
    assert_rejected(h, r, 409, "base_mismatch", "does not match lease")
    unchanged(h, before)


def test_resent_upload_is_answered_with_the_original_result_and_counted_once(h):
    lease = h.checkin("a")
    body = h.frame(lease, key="same-key-123")
    first = h.upload("a", body)
    assert first.status_code == 200 and first.json()["verdict"] == "buffered"
    before = h.snapshot()
    again = h.upload("a", body)
    assert again.status_code == 200
    assert again.json() == first.json() | {"replayed": True}
    unchanged(h, before)
    assert before[4] == 1  # buffer holds it once
    rows = h.server.store.query("SELECT count(*) FROM updates WHERE idem_key='same-key-123'")
    assert rows[0][0] == 1


def test_lease_is_single_use(h):
    lease = h.checkin("a")
    assert h.upload("a", h.frame(lease)).status_code == 200
    before = h.snapshot()
    assert_rejected(h, h.upload("a", h.frame(lease)), 409, "lease_used", "already delivered")
    unchanged(h, before)


def test_rate_limit_is_429_per_client(tmp_path):
    with Harness(tmp_path, rate_per_s=1.0, rate_burst=3) as h:
        codes = [h.http.post("/v1/checkin", headers=h.auth("a")).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = h.http.post("/v1/checkin", headers=h.auth("a"))
        assert_rejected(h, r, 429, "rate_limited", "exceeds 1 requests/s")
        assert int(r.headers["retry-after"]) >= 1
        assert h.http.post("/v1/checkin", headers=h.auth("b")).status_code == 200  # per client


def test_concurrency_limit_answers_retry(h):
    leases = [h.checkin(c) for c in "abcd"]
    assert all(lease["action"] == "train" for lease in leases)
    assert h.checkin("a")["lease_id"] == leases[0]["lease_id"]  # holding a lease: the same one back
    r = h.checkin("e")
    assert r["action"] == "retry" and r["retry_after"] > 0 and "concurrency limit" in r["reason"]
    assert h.upload("b", h.frame(leases[1])).status_code == 200
    assert h.checkin("e")["action"] == "train"  # the report freed a slot (AsyncPolicy.on_report)


def test_checkin_body_must_be_json_object(h):
    r = h.http.post("/v1/checkin", headers=h.auth("a"), content=b"{nope")
    assert_rejected(h, r, 400, "malformed", "not JSON")
    r = h.http.post("/v1/checkin", headers=h.auth("a"), json={"eligible": "yes"})
    assert_rejected(h, r, 400, "malformed", "eligible")
    assert h.http.post("/v1/checkin", headers=h.auth("a"), json={"eligible": False}).json()["action"] == "retry"


# ---- sync rounds over the same SyncPolicy ------------------------------------------------------


def test_sync_round_over_selection_closes_at_cohort_and_cancels_the_rest(tmp_path):
    with Harness(tmp_path, {"name": "fedavg"}, {"mode": "sync", "concurrency": 2, "over_selection": 0.5}) as h:
        leases = [h.checkin(c) for c in "abc"]
        assert [lease["action"] for lease in leases] == ["train"] * 3
        assert h.checkin("d")["action"] == "retry"
        assert h.upload("a", h.frame(leases[0])).json()["verdict"] == "buffered"
        r = h.upload("b", h.frame(leases[1]))
        assert r.status_code == 200 and r.json()["version"] == 1  # the round closed and FedAvg stepped
        s = h.http.get("/status").json()
        assert s["round"] == {"number": 2, "open": True, "arrived": 0} and s["leases"]["ended"]["cancelled"] == 1
        assert_rejected(h, h.upload("c", h.frame(leases[2])), 409, "lease_cancelled", "round")
        assert h.checkin("c")["base_version"] == 1


def test_sync_round_timeout_closes_the_round(tmp_path):
    with Harness(tmp_path, {"name": "fedavg"}, {"mode": "sync", "concurrency": 2, "round_timeout": 0.3}) as h:
        a = h.checkin("a")
        assert 0 < a["round_deadline_in"] <= 0.3
        joined = h.http.get("/status").json()["round"]["number"]  # 1, or later on a machine slow to check in
        assert h.upload("a", h.frame(a)).status_code == 200
        time.sleep(0.35)
        h.server.tick()
        s = h.http.get("/status").json()
        assert s["version"] == 1 and s["round"]["number"] == joined + 1  # partial cohort flushed at the deadline


def test_a_checkin_after_a_passed_deadline_joins_the_next_round_not_the_closed_one(tmp_path):
    """The background tick has not yet closed the round whose deadline passed: the check-in
    closes it first, so its lease is never one of a round already over."""
    with Harness(tmp_path, {"name": "fedavg"}, {"mode": "sync", "concurrency": 2, "round_timeout": 0.3}) as h:
        time.sleep(0.35)  # round 1's deadline passes, no tick
        a = h.checkin("a")
        assert 0.2 < a["round_deadline_in"] <= 0.3
        assert h.http.get("/status").json()["round"]["number"] == 2
        assert h.upload("a", h.frame(a)).status_code == 200


def test_fednova_round_normalizes_each_update_by_its_reported_steps(tmp_path):
    with Harness(tmp_path, {"name": "fednova"}, {"mode": "sync", "concurrency": 2}) as h:
        a, b = h.checkin("a"), h.checkin("b")
        w0 = h.server.aggregation.state.w.clone()
        da, db = torch.randn(w0.numel()) * 0.01, torch.randn(w0.numel()) * 0.01
        assert h.upload("a", h.frame(a, da, n_examples=10, steps=2)).json()["verdict"] == "buffered"
        assert h.upload("b", h.frame(b, db, n_examples=30, steps=6)).json()["version"] == 1
        # p = (1/4, 3/4), tau_eff = 2/4 + 6 3/4 = 5: w = w0 - 5 (da / 2 / 4 + db / 6 3/4)
        expected = w0 - 5 * (0.25 * da / 2 + 0.75 * db / 6)
        assert torch.allclose(h.server.aggregation.state.w, expected, atol=1e-6)
        c, w1 = h.checkin("c"), h.server.aggregation.state.w.clone()
        r = h.upload("c", h.frame(c, da, steps=0))  # no local work to normalize by
        assert 400 <= r.status_code < 500 and r.json()["version"] == 1
        assert torch.equal(h.server.aggregation.state.w, w1) and h.server.aggregation.aggregator.pending == 0


def test_fedasync_mixes_with_the_model_the_client_started_from(tmp_path):
    with Harness(
        tmp_path,
        {"name": "fedasync", "alpha": 0.5, "staleness": {"kind": "polynomial", "a": 1.0}},
        {"mode": "async", "concurrency": 2},
    ) as h:
        a, b = h.checkin("a"), h.checkin("b")
        w0 = h.server.aggregation.state.w.clone()
        da, db = torch.randn(w0.numel()) * 0.01, torch.randn(w0.numel()) * 0.01
        assert h.upload("a", h.frame(a, da)).json()["version"] == 1
        w1 = h.server.aggregation.state.w.clone()
        r = h.upload("b", h.frame(b, db)).json()
        assert r["version"] == 2 and r["staleness"] == 1
        alpha = 0.5 * (1 + 1) ** -1.0  # alpha s(d) with polynomial a = 1, d = 1
        expected = (1 - alpha) * w1 + alpha * (w0 - db)  # x_new is built on b's base model, version 0
        assert torch.allclose(h.server.aggregation.state.w, expected, atol=1e-6)


# ---- durability ---------------------------------------------------------------------------------


def test_restart_resumes_version_buffer_and_leases(tmp_path):
    with Harness(tmp_path) as h:
        for c in "abc":  # K = 3: one step
            lease = h.checkin(c)
            assert h.upload(c, h.frame(lease)).status_code == 200
        held = h.checkin("d")
        bodies = {}
        for c in "ef":
            lease = h.checkin(c)
            bodies[c] = h.frame(lease, delta=torch.randn(h.server.model.numel) * 0.01)
            assert h.upload(c, bodies[c]).status_code == 200
        agg = h.server.aggregation.aggregator.state_dict()
        answer_e = h.upload("e", bodies["e"]).json()
        before = h.snapshot()
    h.open()
    try:
        assert h.snapshot() == before  # version, model bytes, counts, leases, buffer fill
        assert before[0] == 1 and before[4] == 2
        restored = h.server.aggregation.aggregator.state_dict()
        assert torch.equal(restored["total"], agg["total"]) and restored["count"] == 2
        again = h.checkin("d")
        assert again == held | {"lease_expires_in": again["lease_expires_in"]}
        assert h.upload("e", bodies["e"]).json() == answer_e  # idempotent across restarts
        assert h.upload("d", h.frame(held)).json()["version"] == 2  # the restored lease still counts
    finally:
        h.close()


def test_restart_with_another_config_is_refused(tmp_path):
    h = Harness(tmp_path)
    h.close()
    other = experiment({"name": "fedbuff", "buffer_size": 5}, {"mode": "async", "concurrency": 4})
    with pytest.raises(config.ConfigError, match="another configuration"):
        FLServer(other, h.settings, tmp_path / "state")


def test_status_metrics_and_dashboard(h):
    lease = h.checkin("a")
    h.upload("a", h.frame(lease))
    h.upload("a", b"junk")
    h.server.tick()
    s = h.http.get("/status").json()
    assert s["version"] == 0 and s["buffer"] == {"fill": 1, "size": 3} and s["leases"]["active"] == 0
    assert s["rejected"] == {"malformed": 1} and s["last_eval"]["accuracy"] >= 0
    text = h.http.get("/metrics").text
    for line in (
        "asyncfl_model_version 0.0",
        "asyncfl_buffer_fill 1.0",
        'asyncfl_rejected_total{reason="malformed"} 1.0',
        "# TYPE asyncfl_updates_total counter",
        "asyncfl_test_accuracy ",
    ):
        assert line in text
    page = h.http.get("/").text
    assert "acc-chart" in page and "http" not in page.split("<body>")[1].replace("/v1/history", "")


def test_token_and_serve_commands(tmp_path, capsys):
    from asyncfl.cli import main
    from asyncfl.server.store import Store

    state = tmp_path / "state"
    assert main(["token", "create", "--state-dir", str(state), "--task", "task1", "--client", "phone-1"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("afl_") and len(token) > 40
    store = Store(state)
    assert store.lookup_token(token) == ("phone-1", "task1")
    store.close()
    assert main(["token", "list", "--state-dir", str(state)]) == 0
    listed = capsys.readouterr().out
    assert "phone-1\ttask1" in listed and token not in listed
    assert main(["token", "revoke", "--state-dir", str(state), "--client", "phone-1"]) == 0
    assert "revoked 1 token(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: [{name: x, algorithm: {name: fedbuff}}]\nserver: {lease_timeout: -1}\n")
    assert main(["serve", "--config", str(bad), "--state-dir", str(state)]) == 2
    assert "server.lease_timeout" in capsys.readouterr().err
