"""One client's bad sealed seed costs only its own upload: the TSA vets each upload before the
server acknowledges it, so a forged id, a tampered ciphertext, a seed reused within a buffer or
from an earlier step is refused with 422 and its reason, logged as rejected, and the run steps
on with the honest uploads (the plaintext FedBuff step of those, within the encoding bound)."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import httpx
import numpy as np
import pytest
from test_server_compression import random_delta
from test_server_inputs import assert_rejected
from test_tsa_server import K, TsaHarness, plain_fedbuff_step

from asyncfl.client.masking import tsa_masking
from asyncfl.secagg import (
    MemoryStore,
    ReplayedContribution,
    SqliteStore,
    TrustedAggregator,
    UnauthenticatedContribution,
    prg,
)
from asyncfl.secagg.crypto import KeyPair
from asyncfl.secagg.messages import TsaContribution, TsaRequest
from asyncfl.secagg.tsa import seal_seed
from asyncfl.server.tsa_buffer import LEVELS

CLIP = 0.5


def crafted_upload(h, client, delta, lease, seed, seal_id=None, tamper=False):
    """Upload `delta` masked with a chosen `seed`, sealed under `seal_id` (default: the lease's
    id), its ciphertext's last byte flipped if `tamper`: what a misbehaving client can send."""
    task = h.http.get("/v1/task", headers=h.auth(client)).json()
    masking = tsa_masking(task, task["secure_aggregation"]["tsa_public_key"])
    ring, n = masking.codec.ring, delta.numel()
    encoded = masking.codec.encode(delta.numpy(), np.random.default_rng(0))
    masked = ring.to_bytes(ring.add(encoded, prg.mask(seed, n, ring)))
    sealed = bytearray(seal_seed(seed, masking.key, masking.task, seal_id or lease["lease_id"]))
    if tamper:
        sealed[-1] ^= 1
    return h.upload(client, h.cframe(lease, masked + bytes(sealed), masking.spec))


def logged_verdicts(h) -> list[tuple[str, int]]:
    with closing(sqlite3.connect(h.tmp / "state" / "state.db")) as db:
        return db.execute("SELECT verdict, status FROM updates ORDER BY seq").fetchall()


def steps_with_the_honest_ones(h, version, w_before, honest):
    """The closed buffer steps to `version`, by the plaintext step of the `honest` deltas."""
    assert h.server.unmasker.step_once()
    assert h.status()["version"] == version
    codec = h.server.tsa.terms.codec
    bound = codec.error_bound(K * LEVELS) / (K * LEVELS) + 1e-6
    assert (h.weights(version) - plain_fedbuff_step(w_before, honest, CLIP)).abs().max() <= bound


@pytest.mark.parametrize(
    "bad, words",
    [({"seal_id": "someone-else"}, "failed authentication"), ({"tamper": True}, "failed authentication")],
    ids=["forged_id", "tampered_ciphertext"],
)
def test_an_unauthentic_sealed_seed_costs_only_its_upload(tmp_path, bad, words):
    with TsaHarness(tmp_path) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        leases = {client: h.checkin(client) for client in "abcd"}
        deltas = {client: random_delta(n, i, 0.3) for i, client in enumerate("abcd")}
        assert h.masked_upload("a", deltas["a"], leases["a"]).status_code == 200
        r = crafted_upload(h, "d", deltas["d"], leases["d"], b"\x07" * prg.SEED_BYTES, **bad)
        assert_rejected(h, r, 422, "unauthenticated_contribution", words)
        s = h.status()
        assert s["buffer"]["fill"] == 1 and s["rejected"] == {"unauthenticated_contribution": 1}
        assert s["leases"]["active"] == 2  # b and c: a's trip ended with its upload, d's with its refusal
        for client in "bc":
            assert h.masked_upload(client, deltas[client], leases[client]).status_code == 200
        assert [v for v, _ in logged_verdicts(h)] == ["buffered", "rejected", "buffered", "buffered"]
        steps_with_the_honest_ones(h, 1, w0, [deltas[c] for c in "abc"])


def test_a_seed_reused_within_a_buffer_costs_only_the_second_upload(tmp_path):
    with TsaHarness(tmp_path) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        leases = {client: h.checkin(client) for client in "abcd"}
        deltas = {client: random_delta(n, i, 0.3) for i, client in enumerate("abcd")}
        seed = b"\x01" * prg.SEED_BYTES
        assert crafted_upload(h, "a", deltas["a"], leases["a"], seed).status_code == 200
        r = crafted_upload(h, "b", deltas["b"], leases["b"], seed)
        assert_rejected(h, r, 422, "replayed_contribution", f"reuses the seed of update {leases['a']['lease_id']!r}")
        assert h.upload("b", r.request.content).json()["replayed"]  # a re-send gets the same answer
        for client in "cd":
            assert h.masked_upload(client, deltas[client], leases[client]).status_code == 200
        steps_with_the_honest_ones(h, 1, w0, [deltas[c] for c in "acd"])


def test_a_seed_reused_from_an_earlier_step_costs_only_its_upload(tmp_path):
    with TsaHarness(tmp_path) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        deltas = {client: random_delta(n, i, 0.3) for i, client in enumerate("abcdefg")}
        seed = b"\x02" * prg.SEED_BYTES
        assert crafted_upload(h, "a", deltas["a"], h.checkin("a"), seed).status_code == 200
        for client in "bc":
            assert h.masked_upload(client, deltas[client]).status_code == 200
        steps_with_the_honest_ones(h, 1, w0, [deltas[c] for c in "abc"])
        w1 = h.weights(1)
        leases = {client: h.checkin(client) for client in "defg"}
        r = crafted_upload(h, "d", deltas["d"], leases["d"], seed)
        assert_rejected(h, r, 422, "replayed_contribution", "its seed was used by step")
        for client in "efg":
            assert h.masked_upload(client, deltas[client], leases[client]).status_code == 200
        steps_with_the_honest_ones(h, 2, w1, [deltas[c] for c in "efg"])


def test_uploads_wait_while_the_tsa_cannot_vet_them(tmp_path):
    with TsaHarness(tmp_path) as h:
        lease = h.checkin("a")
        task = h.http.get("/v1/task", headers=h.auth("a")).json()
        masking = tsa_masking(task, task["secure_aggregation"]["tsa_public_key"])
        payload = masking.payload(random_delta(h.server.model.numel, 0), lease["seed"], lease["lease_id"])
        body = h.cframe(lease, payload, masking.spec)
        link = h.server.unmasker.link
        link.http = httpx.Client(base_url="http://127.0.0.1:9", timeout=1)  # nothing listens there
        r = h.upload("a", body)
        assert r.status_code == 503 and r.json()["error"] == "tsa_unavailable" and r.headers["retry-after"] == "1"
        assert h.status()["leases"]["active"] == 1 and h.status()["buffer"]["fill"] == 0  # the trip goes on
        link.http = h.tsa
        assert h.upload("a", body).json()["verdict"] == "buffered"  # the client's re-send


@pytest.mark.parametrize("durable", [True, False], ids=["sqlite_restarted", "memory"])
def test_a_reserved_seed_stays_its_uploads(tmp_path, durable):
    key, seed, memory = KeyPair(), b"\x03" * prg.SEED_BYTES, MemoryStore()

    def tsa():
        store = SqliteStore(tmp_path / "used.db") if durable else memory
        return TrustedAggregator(key, store, "task", 4, 1, 1)

    tsa().verify("u1", seal_seed(seed, key.public_bytes(), "task", "u1"))
    restarted = tsa()
    restarted.verify("u1", seal_seed(seed, key.public_bytes(), "task", "u1"))  # a retry of the same upload
    with pytest.raises(ReplayedContribution, match="reuses the seed of update 'u1'"):
        restarted.verify("u2", seal_seed(seed, key.public_bytes(), "task", "u2"))
    with pytest.raises(UnauthenticatedContribution):
        restarted.verify("u3", seal_seed(seed, key.public_bytes(), "task", "u2"))
    fresh = b"\x04" * prg.SEED_BYTES
    restarted.verify("u3", seal_seed(fresh, key.public_bytes(), "task", "u3"))
    request = TsaRequest("s1", 4, (TsaContribution("u3", 1, seal_seed(fresh, key.public_bytes(), "task", "u3")),))
    restarted.unmask(request)  # u3's seed is used by step s1 from now on
    with pytest.raises(ReplayedContribution, match="its seed was used by step 's1'"):
        restarted.verify("u4", seal_seed(fresh, key.public_bytes(), "task", "u4"))
    with pytest.raises(ReplayedContribution, match="its update id was used by step 's1'"):
        restarted.verify("u3", seal_seed(b"\x05" * prg.SEED_BYTES, key.public_bytes(), "task", "u3"))


def test_the_verify_endpoint_needs_the_token_and_a_well_formed_upload(tmp_path):
    with TsaHarness(tmp_path) as h:
        assert h.tsa.post("/v1/verify", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        for body in ({}, {"update_id": 1, "sealed_seed": ""}, {"update_id": "u", "sealed_seed": "not base64!"}, []):
            assert_rejected(h, h.tsa.post("/v1/verify", json=body), 400, "malformed", "not an upload to verify")
        forged = {"update_id": "u", "sealed_seed": "AAAA"}
        assert_rejected(h, h.tsa.post("/v1/verify", json=forged), 422, "unauthenticated_contribution", "'u'")
