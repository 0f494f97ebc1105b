"""The cluster's selector over PostgreSQL, in process (FastAPI TestClient): check-ins answered
from memory or by a slot claim, never more leases than slots with two selectors racing, uploads
logged once whichever selectors receive them, refusals with the single process's codes that
leave the partial sums untouched, and the partial sum a group commit writes."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest
import torch
from cluster_helpers import experiment, fetch
from fastapi.testclient import TestClient

from asyncfl import wire
from asyncfl.algorithms.seeds import trip_seed
from asyncfl.cluster import upload_commit
from asyncfl.cluster.members import session
from asyncfl.cluster.partials import decode_partial
from asyncfl.cluster.selector import Selector
from asyncfl.cluster.selector_app import create_selector_app
from asyncfl.cluster.tasks import add_task, create_token
from asyncfl.config import ServerConfig
from asyncfl.server.errors import ApiError

RUN = {
    "name": "fb",
    "algorithm": {
        "name": "fedbuff",
        "buffer_size": 100,
        "max_staleness": 2,
        "staleness": {"kind": "polynomial", "a": 0.5},
        "example_weight": "n",
    },
    "scheduler": {"concurrency": 6},
}
SETTINGS = ServerConfig(rate_per_s=1000, rate_burst=1000, anonymous_rate_per_s=1000, anonymous_burst=1000)


class Node:
    """One selector in process, with an HTTP client."""

    def __init__(self, url: str, name: str, tokens: dict[str, str]):
        self.selector = Selector(url, SETTINGS, member_id=name)
        self.http = TestClient(create_selector_app(self.selector))
        self.http.__enter__()
        self.tokens = tokens

    def auth(self, client: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[client]}"}

    def checkin(self, client: str) -> dict:
        r = self.http.post("/v1/checkin", headers=self.auth(client), json={"eligible": True})
        assert r.status_code == 200, r.text
        return r.json()

    def upload(self, client: str, body: bytes):
        return self.http.post("/v1/update", headers=self.auth(client), content=body)

    def close(self) -> None:
        self.http.__exit__(None, None, None)


@pytest.fixture
def cluster(pg_url):
    cfg = experiment(RUN, server={"lease_timeout": 60, "retry_after": 0.5, "norm_guard": None})
    with session(pg_url) as conn:
        add_task(conn, cfg)
        tokens = {c: create_token(conn, c, "fb") for c in "abcdefghijkl"}
    nodes: list[Node] = []

    def node(name: str) -> Node:
        nodes.append(Node(pg_url, name, tokens))
        return nodes[-1]

    yield pg_url, node
    for n in nodes:
        n.close()


def grant(url: str, selector: str, slots: list[int]) -> None:
    """What the coordinator does: free slots dealt to a selector; then it refreshes."""
    with session(url) as conn:
        conn.execute("UPDATE slots SET selector=%s WHERE task='fb' AND slot = ANY(%s)", (selector, slots))


def frame(
    node: Node, lease: dict, delta: torch.Tensor | None = None, key: str | None = None, task: str = "fb", **header
) -> bytes:
    m = node.selector.served(task).model
    delta = torch.full((m.numel,), 0.01) if delta is None else delta
    fields = dict(
        lease_id=lease["lease_id"],
        base_version=lease["base_version"],
        idempotency_key=key or f"k-{np.random.randint(1 << 62)}",
        n_examples=20,
        steps=2,
        loss=1.0,
    )
    return wire.encode_update(delta=delta, names=m.names, shapes=m.shapes, **(fields | header))


def partials(url: str) -> list[tuple]:
    return fetch(url, "SELECT id, count, weight_sum, body FROM partials ORDER BY id")


def test_no_slot_means_retry_answered_from_memory(cluster, monkeypatch):
    url, node = cluster
    a = node("sel-a")
    assert a.checkin("a")["action"] == "retry"  # no slot granted to this selector

    def down(*args, **kw):
        raise AssertionError("a retry answer must not touch the database")

    monkeypatch.setattr(a.selector.pool, "connection", down)  # the token is cached, the task's state in memory
    answer = a.checkin("a")
    assert answer["action"] == "retry" and answer["reason"] == "concurrency limit reached; no slot is open"
    assert 0.5 * 0.75 <= answer["retry_after"] <= 0.5 * 1.25


def test_only_as_many_checkins_as_free_slots_go_to_the_database(cluster):
    """A refresh showing one free slot sends one check-in to claim it; the others in flight
    meanwhile are answered "retry" from memory, until the reservation ends (once)."""
    url, node = cluster
    a = node("sel-a")
    a.checkin("a")  # the task's view and its judge, built on first use
    grant(url, "sel-a", [0])
    a.selector.refresh()
    first, reserved = a.selector.checkin_from_memory("b", "fb")
    assert first is None and reserved is not None
    second, none = a.selector.checkin_from_memory("c", "fb")
    assert second["action"] == "retry" and none is None
    a.selector.release(reserved)
    a.selector.release(reserved)  # ends once: a second release changes nothing
    assert a.selector.views["fb"].claiming == 0
    assert a.checkin("c")["action"] == "train"  # the slot, free again, claimed over HTTP
    assert a.selector.views["fb"].claiming == 0
    assert fetch(url, "SELECT count(*) FROM leases WHERE state='active'") == [(1,)]


def test_granted_slot_gives_a_lease_and_a_recheckin_the_same_one(cluster):
    url, node = cluster
    a, b = node("sel-a"), node("sel-b")
    grant(url, "sel-a", [0])
    a.selector.refresh()
    lease = a.checkin("a")
    assert lease["action"] == "train" and lease["base_version"] == 0 and lease["model_url"] == "/v1/model/0"
    assert 59 <= lease["lease_expires_in"] <= 60
    assert fetch(url, "SELECT lease_id FROM slots WHERE task='fb' AND slot=0") == [(lease["lease_id"],)]
    assert a.checkin("a")["lease_id"] == lease["lease_id"]
    b.selector.refresh()
    again = b.checkin("a")  # another selector, with no slot of its own
    assert (again["lease_id"], again["base_version"]) == (lease["lease_id"], 0)
    # the first trip's seed, as the simulator numbers trips, whichever selector answers
    assert again["seed"] == lease["seed"] == int(trip_seed(a.selector.served("fb").cfg.seed, 0)[0])
    assert a.checkin("b")["action"] == "retry"  # the only slot is taken
    r = a.http.get("/v1/model/0", headers=a.auth("a"))
    assert r.status_code == 200 and wire.decode(r.content, wire.ModelHeader).header.version == 0
    again = a.http.get("/v1/model/0", headers=a.auth("b"))  # from memory this time, counted all the same
    assert again.content == r.content
    counts = a.selector.views["fb"].counts
    assert (counts["downloads"], counts["download_bytes"]) == (2, 2 * len(r.content))
    assert a.http.get("/v1/model/7", headers=a.auth("a")).json()["error"] == "version_unavailable"
    assert a.http.get("/v1/task", headers=a.auth("a")).json()["task"] == "fb"
    b.selector._stop.set()  # b's lease feed lags: it still sees the lease active
    b.selector._thread.join()
    assert a.upload("a", frame(a, lease)).status_code == 200
    assert ("fb", "a") in b.selector.leases
    for n in (a, b):  # the used lease is never handed out again
        again = n.checkin("a")
        assert again.get("lease_id") != lease["lease_id"], again


def test_two_selectors_racing_never_lease_more_than_the_slots(cluster):
    url, node = cluster
    a, b = node("sel-a"), node("sel-b")
    grant(url, "sel-a", [0, 1])
    grant(url, "sel-b", [2, 3])
    for n in (a, b):
        n.selector.refresh()
    answers: list[dict] = []

    def go(n: Node, client: str) -> None:
        answers.append({"client": client} | n.checkin(client))

    threads = [threading.Thread(target=go, args=(n, c)) for c in "abcdefghij" for n in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # a check-in that finds its client leased by the other selector frees the slot it set aside
    # only when it ends, and the check-ins racing it meanwhile heard "retry": they come back
    for n in (a, b):
        n.selector.refresh()
    for c in "abcdefghij":
        for n in (a, b):
            go(n, c)
    leased = {}
    for ans in answers:
        if ans["action"] == "train":
            assert leased.setdefault(ans["client"], ans["lease_id"]) == ans["lease_id"]  # one lease per client
    assert len(leased) == 4  # four slots granted, four clients in flight: never more, and all used
    active = fetch(url, "SELECT lease_id FROM leases WHERE state='active'")
    assert sorted(x for (x,) in active) == sorted(leased.values())
    held = fetch(url, "SELECT lease_id FROM slots WHERE lease_id IS NOT NULL")
    assert sorted(x for (x,) in held) == sorted(leased.values())


def test_accepted_upload_writes_the_hand_computed_weighted_sum_and_frees_the_slot(cluster):
    url, node = cluster
    a = node("sel-a")
    grant(url, "sel-a", [0, 1])
    a.selector.refresh()
    la, lb = a.checkin("a"), a.checkin("b")
    with session(url) as conn:
        conn.execute("UPDATE tasks SET version=2 WHERE task='fb'")  # both arrive two versions late
    numel = a.selector.served("fb").model.numel
    da, db = torch.linspace(-1, 1, numel) * 0.01, torch.full((numel,), 0.02)
    results = {}

    def send(client, lease, delta, n):
        results[client] = a.upload(client, frame(a, lease, delta, n_examples=n))

    threads = [
        threading.Thread(target=send, args=("a", la, da, 10)),
        threading.Thread(target=send, args=("b", lb, db, 30)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results.values():
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "accepted" and r.json()["staleness"] == 2 and r.json()["version"] == 2
    wa, wb = 10 * 3**-0.5, 30 * 3**-0.5  # n x (1 + staleness)^-0.5
    rows = partials(url)
    assert sum(c for _, c, _, _ in rows) == 2
    assert sum(w for _, _, w, _ in rows) == pytest.approx(wa + wb)
    total = sum(decode_partial(body).total for *_, body in rows)
    assert torch.allclose(total, wa * da + wb * db, atol=1e-6)
    assert fetch(url, "SELECT count(*) FROM slots WHERE lease_id IS NULL AND selector='sel-a'") == [(2,)]
    assert fetch(url, "SELECT state FROM leases ORDER BY lease_id") == [("done",), ("done",)]
    seqs = fetch(url, "SELECT seq, verdict, partial_id IS NOT NULL FROM updates ORDER BY seq")
    assert [s for s, _, _ in seqs] == sorted(r.json()["seq"] for r in results.values())
    assert all(v == "buffered" and p for _, v, p in seqs)


@pytest.mark.parametrize("concurrent", [False, True])
def test_same_upload_to_two_selectors_counts_once(cluster, concurrent):
    url, node = cluster
    a, b = node("sel-a"), node("sel-b")
    grant(url, "sel-a", [0])
    a.selector.refresh()
    lease = a.checkin("a")
    body = frame(a, lease, key="same-key")
    if concurrent:
        got = {}
        threads = [threading.Thread(target=lambda n=n: got.__setitem__(n, n.upload("a", body))) for n in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first, second = sorted(got.values(), key=lambda r: r.json().get("replayed", False))
    else:
        first, second = a.upload("a", body), b.upload("a", body)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert "replayed" not in first.json() and second.json()["replayed"] is True
    assert second.json()["seq"] == first.json()["seq"]
    assert fetch(url, "SELECT count(*) FROM updates") == [(1,)]
    assert sum(c for _, c, _, _ in partials(url)) == 1


def test_refusals_use_the_single_process_codes_and_leave_the_partials_unchanged(cluster):
    url, node = cluster
    a = node("sel-a")
    grant(url, "sel-a", [0, 1, 2])
    a.selector.refresh()
    la, lb = a.checkin("a"), a.checkin("b")

    def refused(r, status, code):
        assert r.status_code == status, r.text
        assert r.json()["error"] == code, r.json()

    refused(a.upload("a", b"not a frame"), 400, "malformed")
    m = a.selector.served("fb").model
    arrays = wire.split_flat(torch.zeros(m.numel), m.names, m.shapes)
    head = {"kind": "update", "lease_id": la["lease_id"], "base_version": 0, "idempotency_key": "k-12345678"}
    short = wire.encode(head | {"n_examples": 5, "steps": 1, "names": m.names[:-1]}, arrays[:-1])
    refused(a.upload("a", short), 422, "bad_tensor_count")
    refused(a.upload("a", frame(a, la, delta=torch.full((m.numel,), float("nan")))), 422, "non_finite")
    refused(a.upload("a", frame(a, lb)), 409, "no_lease")  # b's lease, a's token
    refused(a.upload("a", frame(a, la, base_version=1)), 409, "base_mismatch")
    refused(a.upload("a", frame(a, la, n_examples=10**6)), 422, "n_examples_too_large")
    refused(a.upload("a", frame(a, la)), 409, "lease_used")  # the refusal above ended the lease
    with session(url) as conn:
        conn.execute("UPDATE tasks SET version=3 WHERE task='fb'")  # b's update is 3 versions late
    r = a.upload("b", frame(a, lb))
    refused(r, 409, "stale")
    assert "exceeds max_staleness 2" in r.json()["detail"]
    assert partials(url) == []
    assert fetch(url, "SELECT verdict, status FROM updates ORDER BY seq") == [("rejected", 422), ("discarded", 409)]
    status = a.http.get("/status", headers=a.auth("a"))
    assert status.status_code == 403 and status.json()["error"] == "forbidden"  # a client token is no operator's
    rejected = a.selector.rejected
    codes = ["malformed", "bad_tensor_count", "non_finite", "no_lease", "base_mismatch", "n_examples_too_large"]
    assert all(rejected[("fb", code)] == 1 for code in [*codes, "lease_used", "stale"]), rejected


def test_database_down_answers_503_and_acknowledges_nothing(cluster):
    url, node = cluster
    a = node("sel-a")
    grant(url, "sel-a", [0])
    a.selector.refresh()
    lease = a.checkin("a")
    body = frame(a, lease, key="key-00001")
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s", (name,))
    try:
        r = a.upload("a", body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"] == "unavailable"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    assert fetch(url, "SELECT count(*) FROM updates") == [(0,)]
    r = a.upload("a", body)  # the client's retry: counted once
    assert r.status_code == 200 and "replayed" not in r.json(), r.text
    assert fetch(url, "SELECT count(*) FROM updates") == [(1,)]


def test_status_and_metrics_per_task(cluster):
    url, node = cluster
    a = node("sel-a")
    grant(url, "sel-a", [0])
    a.selector.refresh()
    lease = a.checkin("a")
    a.checkin("b")
    assert a.upload("a", frame(a, lease)).status_code == 200
    with session(url) as conn:
        op = create_token(conn, "ops", "*", "operator")
    s = a.http.get("/status", headers={"Authorization": f"Bearer {op}"}).json()
    fb = s["tasks"]["fb"]
    assert fb["counts"]["checkin_train"] == 1 and fb["counts"]["checkin_retry"] == 1
    assert fb["counts"]["uploads_buffered"] == 1
    text = a.http.get("/metrics", headers={"Authorization": f"Bearer {op}"}).text
    assert 'asyncfl_checkins_total{task="fb",answer="train"} 1.0' in text
    assert 'asyncfl_updates_total{task="fb",verdict="buffered"} 1.0' in text
    assert "asyncfl_upload_seconds_count 1" in text


def test_unknown_token_is_401_and_overload_is_503(cluster, monkeypatch):
    url, node = cluster
    a = node("sel-a")
    r = a.http.post("/v1/checkin", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    with pytest.raises(ApiError):
        a.selector.view("no-such-task")
    grant(url, "sel-a", [0])
    a.selector.refresh()
    lease = a.checkin("a")
    monkeypatch.setattr(upload_commit, "QUEUE_MAX", 0)  # every commit slot taken
    r = a.upload("a", frame(a, lease))
    assert r.status_code == 503 and r.json()["error"] == "overloaded" and r.headers["retry-after"] == "1"
    assert fetch(url, "SELECT state FROM leases") == [("active",)]  # nothing happened to the lease


def test_fedasync_updates_reach_the_aggregator_one_partial_each(pg_url):
    run = {"name": "fa", "algorithm": {"name": "fedasync", "alpha": 0.5}, "scheduler": {"concurrency": 2}}
    with session(pg_url) as conn:
        add_task(conn, experiment(run, server={"norm_guard": None}))
        tokens = {c: create_token(conn, c, "fa") for c in "ab"}
        conn.execute("UPDATE slots SET selector='sel-a' WHERE task='fa'")
    a = Node(pg_url, "sel-a", tokens)
    try:
        a.selector.refresh()
        leases = {c: a.checkin(c) for c in "ab"}
        with session(pg_url) as conn:
            conn.execute("UPDATE tasks SET version=1 WHERE task='fa'")
        m = a.selector.served("fa").model
        deltas = {"a": torch.full((m.numel,), 0.01), "b": torch.full((m.numel,), -0.02)}
        for c in "ab":
            body = wire.encode_update(
                delta=deltas[c],
                names=m.names,
                shapes=m.shapes,
                lease_id=leases[c]["lease_id"],
                base_version=0,
                idempotency_key=f"key-{c}-0001",
                n_examples=7,
                steps=2,
                loss=0.5,
            )
            assert a.upload(c, body).status_code == 200
        rows = partials(pg_url)
        assert [(count, weight) for _, count, weight, _ in rows] == [(1, 0.0), (1, 0.0)]
        got = [decode_partial(body) for *_, body in rows]
        assert all(not p.merged and p.staleness == 1 and p.update.n_examples == 7 for p in got)
        assert sorted(float(p.update.delta[0]) for p in got) == pytest.approx([-0.02, 0.01])
    finally:
        a.close()


def test_a_private_task_reports_the_epsilon_its_aggregator_spent(pg_url):
    """DP-FedBuff through a selector and the aggregator role: the buffer of 2 steps with noise,
    and every selector serves the epsilon and clip norm the aggregator reported at that step."""
    from asyncfl.cluster.aggregator import AggregatorRole

    run = {
        "name": "dp",
        "algorithm": {"name": "fedbuff", "buffer_size": 2},
        "privacy": {"clip_norm": 0.5, "noise_multiplier": 1.0, "sample_rate": 0.05},
        "scheduler": {"concurrency": 2},
    }
    with session(pg_url) as conn:
        add_task(conn, experiment(run, server={"norm_guard": None}))
        tokens = {c: create_token(conn, c, "dp") for c in "ab"}
        op = create_token(conn, "ops", "*", "operator")
        conn.execute("UPDATE slots SET selector='sel-a' WHERE task='dp'")
    a = Node(pg_url, "sel-a", tokens)
    try:
        a.selector.refresh()
        for c in "ab":
            assert a.upload(c, frame(a, a.checkin(c), task="dp")).status_code == 200
        role = AggregatorRole(pg_url)
        with session(pg_url) as conn:
            conn.execute("UPDATE tasks SET owner = %s, owner_epoch = 1 WHERE task = 'dp'", (role.member,))
        role.round()
        assert fetch(pg_url, "SELECT version FROM tasks") == [(1,)]
        a.selector.refresh()
        auth = {"Authorization": f"Bearer {op}"}
        privacy = a.http.get("/status", headers=auth).json()["tasks"]["dp"]["aggregator"]["privacy"]
        expected = role.tasks["dp"].aggregator.epsilon()
        assert privacy["privacy_steps"] == 1 and privacy["epsilon"] == pytest.approx(expected) and expected > 0
        assert privacy["clip_norm"] == 0.5
        text = a.http.get("/metrics", headers=auth).text
        assert f'asyncfl_privacy_epsilon{{task="dp"}} {float(expected)!r}' in text
        assert 'asyncfl_privacy_steps_total{task="dp"} 1.0' in text
    finally:
        a.close()


def test_checkin_refusals_are_answered_as_every_other_endpoints(cluster):
    """The check-in route, answered beneath FastAPI's router, refuses as the app does: JSON
    bodies with their codes, 405 with Allow for another method, malformed bodies counted, and
    an unexpected failure a 500 that leaves the selector serving."""
    url, node = cluster
    a = node("sel-a")
    grant(url, "sel-a", [0])
    a.selector.refresh()
    r = a.http.get("/v1/checkin", headers=a.auth("a"))
    assert (r.status_code, r.json()["error"], r.headers["allow"]) == (405, "method_not_allowed", "POST")
    r = a.http.post("/v1/checkin", headers=a.auth("a"), content=b"[1, 2")
    assert r.status_code == 400 and r.json()["error"] == "malformed"
    r = a.http.post("/v1/checkin", headers=a.auth("a"), content=b" " * 100_000)
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert a.selector.rejected[("fb", "malformed")] == 1
    assert a.checkin("a")["action"] == "train"  # the selector serves on, its slot given
    broken = TestClient(create_selector_app(a.selector, background=False), raise_server_exceptions=False)
    a.selector.checkin_from_memory = None  # any unexpected failure
    r = broken.post("/v1/checkin", headers=a.auth("b"), json={})
    assert r.status_code == 500
