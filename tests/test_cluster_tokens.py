"""Signed client tokens of the cluster: a selector accepts them with no database query on the
retry path, refuses forged, tampered, unknown-key, retired-key and revoked ones with the single
process's 401/403, follows key rotation, and every selector honours a revocation within its
refresh period. Random (hashed) tokens minted before signing keep working."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from contextlib import contextmanager

import pytest
from cluster_helpers import experiment, fetch
from fastapi.testclient import TestClient

from asyncfl.cli import main
from asyncfl.cluster.members import session
from asyncfl.cluster.selector import RESYNC_S, Selector
from asyncfl.cluster.selector_app import create_selector_app
from asyncfl.cluster.tasks import add_task, create_token, create_tokens
from asyncfl.cluster.tokens import add_signing_key, retire_signing_keys, sign, signing_key, verify
from asyncfl.config import ServerConfig
from asyncfl.server.auth import ANY_TASK, OPERATOR, new_token
from asyncfl.server.store import hash_token

RUN = {"name": "fb", "algorithm": {"name": "fedbuff", "buffer_size": 10}, "scheduler": {"concurrency": 2}}
SETTINGS = ServerConfig(rate_per_s=1000, rate_burst=1000, anonymous_rate_per_s=1000, anonymous_burst=1000)


@pytest.fixture
def url(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(RUN, server={"retry_after": 0.5}))
    return pg_url


@contextmanager
def selector(url: str, name: str, background: bool = True):
    """A selector in process; without `background` it refreshes only when told."""
    sel = Selector(url, SETTINGS, member_id=name)
    with TestClient(create_selector_app(sel, background)) as http:
        if not background:
            sel.refresh()
        yield sel, http
    if not background:
        sel.pool.close()


def checkin(http: TestClient, token: str):
    return http.post("/v1/checkin", headers={"Authorization": f"Bearer {token}"}, json={"eligible": True})


def count_queries(sel: Selector, monkeypatch) -> list[int]:
    """Counts the connections the selector takes from its pool (every query needs one)."""
    taken, real = [0], sel.pool.connection

    def counted():
        taken[0] += 1
        return real()

    monkeypatch.setattr(sel.pool, "connection", counted)
    return taken


def test_token_format_is_an_hmac_sha256_over_the_claims():
    secret = bytes(range(32))
    token = sign(7, secret, "dév-1", "fb", 1_700_000_000_000_000)
    body, _, tag = token.rpartition(".")
    assert body == "afl_1.7.1700000000000000.ZMOpdi0x.ZmI"  # "dév-1" and "fb", URL-safe base64 unpadded
    expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(tag + "=") == expected
    assert verify(token, secret) == ("dév-1", "fb", 1_700_000_000_000_000)
    assert verify(token, bytes(32)) is None
    assert sign(1, secret, "x" * 200, "fb", 1) is None  # too long for the authenticator: minted random


def test_new_signed_tokens_answer_retry_without_any_query(url, monkeypatch):
    with session(url) as conn:
        tokens = create_tokens(conn, [f"d{i}" for i in range(20)], "fb")
        legacy = new_token()  # as minted before signing: random, looked up by hash
        conn.execute("INSERT INTO tokens(hash, client, task) VALUES (%s, 'old', 'fb')", (hash_token(legacy),))
    assert fetch(url, "SELECT count(*) FROM tokens WHERE hash = ANY(%s)", [hash_token(t) for t in tokens]) == [(20,)]
    with selector(url, "sel-a", background=False) as (sel, http):
        assert checkin(http, tokens[0]).json()["action"] == "retry"  # builds the task's judge once
        queries = count_queries(sel, monkeypatch)
        for token in tokens[1:]:  # never seen by this selector
            r = checkin(http, token)
            assert r.status_code == 200 and r.json()["action"] == "retry"
        assert queries[0] == 0
        assert checkin(http, legacy).json()["action"] == "retry"
        assert queries[0] == 1  # the random token's lookup, then remembered
        assert checkin(http, legacy).json()["action"] == "retry"
        assert queries[0] == 1


def test_forged_tampered_unknown_key_and_wrong_role_are_refused(url):
    with session(url) as conn:
        token = create_token(conn, "alice", "fb")
        key_id, secret = signing_key(conn)
        issued = int(token.split(".")[2])
        operator = create_token(conn, "op", ANY_TASK, OPERATOR)
    body, _, tag = token.rpartition(".")
    forged = f"{body}.{tag[:-2]}{'AA' if tag[-2:] != 'AA' else 'BB'}"
    other_task = body.rsplit(".", 1)[0] + ".b3RoZXI." + tag  # task "other", the tag of "fb"
    unknown_key = sign(key_id + 5, secret, "alice", "fb", issued)
    with selector(url, "sel-a", background=False) as (sel, http):
        assert checkin(http, token).status_code == 200
        for bad in (forged, other_task, unknown_key, token + "x", "afl_1.x." + token.split(".", 2)[2]):
            r = checkin(http, bad)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", bad
            assert r.headers["www-authenticate"] == "Bearer"
        r = checkin(http, sign(key_id, secret, "alice", "no-such-task", issued))  # genuine, for no task here
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        r = http.get("/status", headers={"Authorization": f"Bearer {token}"})  # a client token, not an operator's
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert http.get("/status", headers={"Authorization": f"Bearer {operator}"}).status_code == 200
        assert checkin(http, operator).status_code == 403


def test_rotated_keys_verify_old_and_new_tokens_until_the_old_are_retired(url):
    with session(url) as conn:
        old = create_token(conn, "alice", "fb")
    with selector(url, "sel-a", background=False) as (sel, http):
        assert checkin(http, old).status_code == 200
        with session(url) as conn:
            add_signing_key(conn)
            new = create_token(conn, "bob", "fb")
        assert new.split(".")[1] == str(int(old.split(".")[1]) + 1)
        assert checkin(http, new).status_code == 200  # an unknown key id reloads the keys
        assert checkin(http, old).status_code == 200
        with session(url) as conn:
            assert retire_signing_keys(conn) == 1
        sel.refresh()  # the next resync reloads the keys
        time.sleep(RESYNC_S)
        sel.refresh()
        assert checkin(http, old).status_code == 401
        assert checkin(http, new).status_code == 200


def test_revocation_reaches_every_selector_within_the_refresh_period(url, capsys):
    with session(url) as conn:
        alice, bob = create_tokens(conn, ["alice", "bob"], "fb")
    with selector(url, "sel-a") as (_, a), selector(url, "sel-b") as (_, b):
        assert all(checkin(http, t).status_code == 200 for http in (a, b) for t in (alice, bob))
        assert main(["token", "revoke", "--database-url", url, "--client", "alice"]) == 0
        assert capsys.readouterr().out.strip() == "revoked 1 token(s) of alice"
        start = time.monotonic()
        while any(checkin(http, alice).status_code == 200 for http in (a, b)):
            assert time.monotonic() - start < RESYNC_S + 1.0, "revocation not followed"
            time.sleep(0.02)
        assert all(checkin(http, alice).json()["error"] == "unauthorized" for http in (a, b))
        assert all(checkin(http, bob).status_code == 200 for http in (a, b))
        assert main(["token", "create", "--database-url", url, "--task", "fb", "--client", "alice"]) == 0
        again = capsys.readouterr().out.strip()  # minted after the revocation: valid
        assert all(checkin(http, again).status_code == 200 for http in (a, b))
    assert fetch(url, "SELECT client, revoked FROM tokens ORDER BY created_at, revoked DESC") == [
        ("alice", True),
        ("bob", False),
        ("alice", False),
    ]


def test_rotate_key_command(url, capsys):
    assert main(["token", "rotate-key", "--database-url", url, "--retire-old"]) == 0
    assert capsys.readouterr().out.strip() == "signing key 2 signs new tokens; 1 older key(s) retired"
    assert fetch(url, "SELECT key_id, retired, length(secret) FROM signing_keys ORDER BY key_id") == [
        (1, True, 32),
        (2, False, 32),
    ]
