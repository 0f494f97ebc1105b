"""Secure aggregation with the TSA in the cluster, against a real PostgreSQL and an in-process
TSA: masked uploads vetted and summed in the ring by a selector step the aggregator's model by
the plaintext FedBuff step (within the fixed-point bound); a bad sealed seed is refused at the
selector and never reaches a partial; a TSA that cannot be asked means 503 and nothing
acknowledged; an aggregator taken over after closing a buffer has the new owner re-send the
identical request, and the model steps once."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch
from cluster_helpers import experiment, fetch
from fastapi.testclient import TestClient
from test_cluster_selector import SETTINGS

from asyncfl import wire
from asyncfl.client.masking import tsa_masking
from asyncfl.cluster import upload_commit
from asyncfl.cluster.aggregator import Fenced, OwnedTask
from asyncfl.cluster.members import session
from asyncfl.cluster.partials import decode_partial
from asyncfl.cluster.selector import Selector
from asyncfl.cluster.selector_app import create_selector_app
from asyncfl.cluster.tasks import add_task, build_objects, create_token
from asyncfl.config import ConfigError
from asyncfl.secagg import SqliteStore, TrustedAggregator
from asyncfl.secagg.crypto import to_base64
from asyncfl.server.store import tensor_load
from asyncfl.server.tsa_buffer import LEVELS
from asyncfl.tsa.app import create_tsa_app
from asyncfl.tsa.state import init_state, load_key_pair

K, CLIP = 3, 0.5
TOKEN = "t" * 32
RUN = {
    "name": "tsa",
    "algorithm": {"name": "fedbuff", "buffer_size": K},
    "scheduler": {"concurrency": 8},
    "secure_aggregation": {"protocol": "tsa", "clip_range": CLIP},
}


class Cluster:
    """One task with masked FedBuff (K = 3), one selector (every slot granted to it), an
    in-process TSA on a state dir, and aggregators made on demand."""

    def __init__(self, url: str, tmp_path):
        self.url, self.tsa_state = url, tmp_path / "tsa"
        init_state(self.tsa_state)
        (tmp_path / "token").write_text(TOKEN)
        key = to_base64(load_key_pair(self.tsa_state).public_bytes())
        settings = {"tsa_url": "http://tsa", "tsa_public_key": key, "tsa_token_file": str(tmp_path / "token")}
        self.cfg = experiment(RUN, server={"lease_timeout": 60, "norm_guard": None} | settings)
        with session(url) as conn:
            add_task(conn, self.cfg)
            self.tokens = {c: create_token(conn, c, "tsa") for c in "abcdefgh"}
            conn.execute("UPDATE slots SET selector = 'sel' WHERE task = 'tsa'")
        self.terms = build_objects(self.cfg).tsa.terms
        self.tsa = self.tsa_client()
        self.selector = Selector(url, SETTINGS, member_id="sel")
        self.selector.served("tsa").tsa_link.http = self.tsa
        self.http = TestClient(create_selector_app(self.selector))
        self.http.__enter__()
        self.info = self.http.get("/v1/task", headers=self.auth("a")).json()
        self.masking = tsa_masking(self.info, key)

    def tsa_client(self) -> TestClient:
        """The TSA app on this cluster's TSA state (a fresh one: a restarted TSA process)."""
        t = self.terms
        tsa = TrustedAggregator(
            load_key_pair(self.tsa_state), SqliteStore(self.tsa_state / "used.db"), "tsa", t.length, K, t.max_weight
        )
        return TestClient(create_tsa_app(tsa, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})

    def auth(self, client: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[client]}"}

    def checkin(self, client: str) -> dict:
        r = self.http.post("/v1/checkin", headers=self.auth(client), json={"eligible": True})
        assert r.status_code == 200 and r.json()["action"] == "train", r.text
        return r.json()

    def frame(self, lease: dict, delta: torch.Tensor, tamper: bool = False) -> bytes:
        payload = self.masking.payload(delta, lease["seed"], lease["lease_id"])
        if tamper:  # the sealed seed's last byte (its tag)
            payload = payload[:-1] + bytes([payload[-1] ^ 1])
        m = self.selector.served("tsa").model
        return wire.encode_update(
            delta=None,
            names=m.names,
            shapes=m.shapes,
            lease_id=lease["lease_id"],
            base_version=lease["base_version"],
            idempotency_key=f"k-{lease['lease_id']}",
            n_examples=20,
            steps=2,
            loss=1.0,
            codec=self.masking.spec,
            payload=payload,
        )

    def upload(self, client: str, delta: torch.Tensor, tamper: bool = False):
        lease = self.checkin(client)
        return self.http.post("/v1/update", headers=self.auth(client), content=self.frame(lease, delta, tamper))

    def aggregator(self, member: str, epoch: int, link=None) -> OwnedTask:
        with session(self.url) as conn:
            conn.execute("UPDATE tasks SET owner = %s, owner_epoch = %s WHERE task = 'tsa'", (member, epoch))
        owned = OwnedTask(session(self.url), member, "tsa", epoch)
        owned.tsa_link.http = self.tsa if link is None else link
        return owned

    def weights(self, version: int) -> torch.Tensor:
        rows = fetch(self.url, "SELECT weights FROM versions WHERE task = 'tsa' AND version = %s", version)
        return tensor_load(bytes(rows[0][0]))

    def bound(self, count: int) -> float:
        """The fixed-point error of a step's mean (as the single-process TSA tests bound it)."""
        return self.terms.codec.error_bound(count * LEVELS) / (count * LEVELS) + 1e-6

    def close(self) -> None:
        self.http.__exit__(None, None, None)


@pytest.fixture
def cluster(pg_url, tmp_path):
    c = Cluster(pg_url, tmp_path)
    yield c
    c.close()


def deltas(n: int, numel: int, scale: float = 0.3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [scale * torch.randn(numel, generator=g) for _ in range(n)]


def plain_mean_step(w0: torch.Tensor, ds: list[torch.Tensor]) -> torch.Tensor:
    """FedBuff's step at staleness 0, uniform weights, server SGD lr 1: minus the mean clipped delta."""
    return w0 - torch.stack([d.clamp(-CLIP, CLIP) for d in ds]).mean(0)


def test_sync_secure_aggregation_stays_refused_and_tsa_needs_its_settings():
    for protocol in ("secagg", "secagg_plus"):
        run = {
            "name": protocol,
            "algorithm": {"name": "fedavg"},
            "scheduler": {"mode": "sync", "concurrency": 4},
            "secure_aggregation": {"protocol": protocol, "clip_range": CLIP},
        }
        with pytest.raises(
            ConfigError, match=f"secure aggregation '{protocol}' runs in the single-process server only"
        ):
            build_objects(experiment(run))
    with pytest.raises(ConfigError, match="server.tsa_url"):
        build_objects(experiment(RUN))


def test_masked_uploads_step_by_the_plaintext_fedbuff_step(cluster):
    c = cluster
    assert c.info["secure_aggregation"]["max_total_weight"] == (2 * K - 1) * c.terms.max_weight
    w0, ds = c.weights(0), deltas(K, c.terms.length)
    for client, d in zip("abc", ds):
        r = c.upload(client, d)
        assert r.status_code == 200 and r.json()["verdict"] == "buffered", r.text
    rows = fetch(c.url, "SELECT count, weight_sum, body FROM partials ORDER BY id")
    assert [(n, w) for n, w, _ in rows] == [(1, float(LEVELS))] * K
    first = decode_partial(bytes(rows[0][2]))
    assert first.masked["contributions"][0][:2] == [fetch(c.url, "SELECT min(lease_id) FROM updates")[0][0], LEVELS]
    owned = c.aggregator("agg", 1)
    assert owned.poll() == K  # the K-th closes the buffer, durably
    body = tensor_load(bytes(fetch(c.url, "SELECT body FROM aggregator_state WHERE task = 'tsa'")[0][0]))
    assert len(body["closed"]) == 1 and len(body["closed"][0]["contributions"]) == K
    assert fetch(c.url, "SELECT count(*) FROM partials WHERE tsa_step = %s", body["closed"][0]["step"]) == [(K,)]
    assert fetch(c.url, "SELECT version FROM tasks") == [(0,)]
    owned.poll()  # unmask and step
    assert fetch(c.url, "SELECT version FROM tasks") == [(1,)]
    assert fetch(c.url, "SELECT count(*) FROM partials WHERE folded_version = 1") == [(K,)]
    assert (c.weights(1) - plain_mean_step(w0, ds)).abs().max() <= c.bound(K)
    # what the database held decodes to noise, nowhere near the weighted sum it hides
    plain = sum(LEVELS * d.double().clamp(-CLIP, CLIP) for d in ds).numpy()
    total = c.terms.codec.ring.from_bytes(body["closed"][0]["total"].numpy().tobytes(), c.terms.length)
    assert np.abs(c.terms.codec.decode(total, K * LEVELS) - plain).mean() > 10


def test_a_partial_crossing_k_is_folded_whole(cluster, monkeypatch):
    """Two commits of two uploads each (K = 3): one buffer of four, stepped by their mean."""
    c = cluster
    monkeypatch.setattr(upload_commit, "BATCH_WAIT_S", 1.0)
    monkeypatch.setattr(upload_commit, "BATCH_MAX", 2)
    w0, ds = c.weights(0), deltas(4, c.terms.length)
    got = {}

    def send(client, frame):
        got[client] = c.http.post("/v1/update", headers=c.auth(client), content=frame)

    frames = {client: c.frame(c.checkin(client), d) for client, d in zip("abcd", ds)}
    for pair in ("ab", "cd"):
        threads = [threading.Thread(target=send, args=(x, frames[x])) for x in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(r.status_code == 200 for r in got.values()), {k: r.text for k, r in got.items()}
    assert fetch(c.url, "SELECT count FROM partials ORDER BY id") == [(2,), (2,)]
    owned = c.aggregator("agg", 1)
    owned.poll()
    owned.poll()
    assert fetch(c.url, "SELECT version, (SELECT updates FROM versions WHERE version = 1) FROM tasks") == [(1, 4)]
    assert (c.weights(1) - plain_mean_step(w0, ds)).abs().max() <= c.bound(4)


def test_a_bad_sealed_seed_is_refused_at_the_selector(cluster):
    c = cluster
    r = c.upload("a", deltas(1, c.terms.length)[0], tamper=True)
    assert r.status_code == 422 and "TSA refused" in r.json()["detail"], r.text
    assert fetch(c.url, "SELECT verdict, status, partial_id FROM updates") == [("rejected", 422, None)]
    assert fetch(c.url, "SELECT count(*) FROM partials") == [(0,)]
    assert fetch(c.url, "SELECT state FROM leases") == [("done",)]  # the trip is over, as in the single process


def test_an_unreachable_tsa_means_503_and_nothing_acknowledged(cluster):
    c = cluster

    def down(request):
        raise httpx.ConnectError("refused")

    c.selector.served("tsa").tsa_link.http = httpx.Client(base_url="http://tsa", transport=httpx.MockTransport(down))
    lease = c.checkin("a")
    frame = c.frame(lease, deltas(1, c.terms.length)[0])
    r = c.http.post("/v1/update", headers=c.auth("a"), content=frame)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert fetch(c.url, "SELECT count(*) FROM updates") == [(0,)]
    assert fetch(c.url, "SELECT state FROM leases") == [("active",)]
    c.selector.served("tsa").tsa_link.http = c.tsa  # back: the re-send is accepted
    r = c.http.post("/v1/update", headers=c.auth("a"), content=frame)
    assert r.status_code == 200 and r.json()["verdict"] == "buffered", r.text


class LostReply:
    """The TSA answers, but the reply never reaches the aggregator (it dies meanwhile)."""

    def __init__(self, http):
        self.http, self.answered = http, 0

    def post(self, *args, **kw):
        self.http.post(*args, **kw)
        self.answered += 1
        raise httpx.ReadError("connection reset")


def test_a_takeover_after_closing_resends_and_steps_once(cluster):
    c = cluster
    w0, ds = c.weights(0), deltas(K, c.terms.length)
    for client, d in zip("abc", ds):
        assert c.upload(client, d).status_code == 200
    lost = LostReply(c.tsa)
    old = c.aggregator("agg-old", 1, link=lost)
    old.poll()  # closes the buffer
    old.poll()  # the TSA unmasks it, the reply is lost
    assert lost.answered == 1 and fetch(c.url, "SELECT version FROM tasks") == [(0,)]
    c.tsa = c.tsa_client()  # and the TSA restarts, from its own state
    new = c.aggregator("agg-new", 2)
    assert new.buffered and new.poll() == 0  # re-sends the identical request: the TSA's first answer
    assert fetch(c.url, "SELECT version FROM tasks") == [(1,)]
    assert fetch(c.url, "SELECT count(*), min(folded_version), max(folded_version) FROM partials") == [(K, 1, 1)]
    assert (c.weights(1) - plain_mean_step(w0, ds)).abs().max() <= c.bound(K)
    old.tsa_link.http, old._tsa_retry_at = c.tsa, 0.0  # the old owner wakes up: fenced, nothing changes
    with pytest.raises(Fenced):
        old.poll()
    assert fetch(c.url, "SELECT count(*) FROM versions") == [(2,)]
    body = tensor_load(bytes(fetch(c.url, "SELECT body FROM aggregator_state")[0][0]))
    assert body["closed"] == [] and body["open"]["contributions"] == [] and body["next_step"] == 2


def test_a_non_finite_step_drops_its_buffer_and_the_next_one_steps(cluster, monkeypatch):
    c = cluster
    ds = deltas(2 * K, c.terms.length)
    for client, d in zip("abc", ds):
        assert c.upload(client, d).status_code == 200
    owned = c.aggregator("agg", 1)
    opt = owned.aggregator.server_opt
    step = opt.step
    monkeypatch.setattr(opt, "step", lambda w, g: w + float("nan"))
    owned.poll()
    owned.poll()
    assert fetch(c.url, "SELECT version FROM tasks") == [(0,)]
    assert fetch(c.url, "SELECT sum(discarded), min(folded_version) FROM partials") == [(K, 0)]
    body = tensor_load(bytes(fetch(c.url, "SELECT body FROM aggregator_state")[0][0]))
    assert body["closed"] == [] and body["next_step"] == 2
    monkeypatch.setattr(opt, "step", step)
    w0 = c.weights(0)
    for client, d in zip("def", ds[K:]):
        assert c.upload(client, d).status_code == 200
    owned.poll()
    owned.poll()
    assert fetch(c.url, "SELECT version FROM tasks") == [(1,)]
    assert (c.weights(1) - plain_mean_step(w0, ds[K:])).abs().max() <= c.bound(K)
