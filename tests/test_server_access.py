"""Access: operator tokens for the operator endpoints, client tokens for training only, a
per-address limit on requests without a valid token, revocation at once, users keyed by their
full name, a paginated history, a client that keeps its token on the server's origin, and
leases that neither a wall-clock jump nor a restart cut short."""

from __future__ import annotations

import hashlib
import json
import zlib
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from test_server_compression import CHarness, dp_run, random_delta
from test_server_inputs import Harness, assert_rejected

from asyncfl.client.http import ServerApi, UnsafeUrl, check_server_url
from asyncfl.scheduling import AsyncPolicy
from asyncfl.server.auth import OPERATOR, OPERATOR_COOKIE, user_id
from asyncfl.server.coordinator import ACTIVE, EXPIRED, Coordinator
from asyncfl.server.store import Store
from asyncfl.server.testing import ServerProcess, mint_tokens

OPERATOR_PATHS = ["/status", "/metrics", "/v1/history", "/", "/docs", "/redoc", "/openapi.json"]


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, anonymous_burst=1000)
    yield harness
    harness.close()


def bare(h, address="testclient", cookie=None):
    """A client of the same server from `address`, with no cookie or the operator cookie `cookie`."""
    http = TestClient(h.http.app, client=(address, 50000))
    if cookie is not None:
        http.cookies.set(OPERATOR_COOKIE, cookie)
    return http


@pytest.mark.parametrize("path", OPERATOR_PATHS)
def test_operator_endpoints_need_an_operator_token(h, path):
    http = bare(h)
    assert http.get(path).status_code == 401
    assert http.get(path, headers={"Authorization": "Bearer afl_nope"}).status_code == 401
    assert http.get(path, headers=h.auth("a")).status_code == 403  # a client token opens nothing here
    assert http.get(path, headers={"Authorization": f"Bearer {h.operator}"}).status_code == 200
    assert bare(h, cookie=h.operator).get(path).status_code == 200
    h.server.store.revoke_client("op")
    assert http.get(path, headers={"Authorization": f"Bearer {h.operator}"}).status_code == 401


def test_operator_token_cannot_train_or_upload(h):
    lease = h.checkin("a")
    op = {"Authorization": f"Bearer {h.operator}"}
    http = bare(h)
    for method, path, body in (
        ("POST", "/v1/checkin", b"{}"),
        ("GET", "/v1/task", b""),
        ("GET", "/v1/model/0", b""),
        ("POST", "/v1/update", h.frame(lease)),
    ):
        r = http.request(method, path, headers=op, content=body)
        assert_rejected(h, r, 403, "forbidden", "role 'client'")
    assert h.upload("a", h.frame(lease)).status_code == 200  # the lease was untouched


def test_public_status_opens_status_and_metrics_only(tmp_path):
    with Harness(tmp_path, public_status=True) as h:
        http = bare(h)
        assert http.get("/status").json()["task"] == "task1"
        assert "asyncfl_model_version" in http.get("/metrics").text
        for path in ("/v1/history", "/", "/docs", "/openapi.json"):
            assert http.get(path).status_code == 401, path


def test_dashboard_signs_in_with_an_httponly_cookie(h):
    http = bare(h)
    page = http.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})  # a browser's
    assert page.status_code == 401 and "#token=" in page.text and "acc-chart" not in page.text
    refused = http.get("/", headers=h.auth("a"))  # not a browser: the JSON refusal of every endpoint
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert http.post("/v1/session", headers=h.auth("a")).status_code == 403
    assert bare(h, cookie=h.operator).post("/v1/session").status_code == 401  # a bearer token only
    r = http.post("/v1/session", headers={"Authorization": f"Bearer {h.operator}"})
    assert r.status_code == 204
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{OPERATOR_COOKIE}={h.operator};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie  # http here
    http.cookies.set(OPERATOR_COOKIE, h.operator)
    assert "acc-chart" in http.get("/").text


def test_history_is_paginated(h):
    evals = [{"id": i, "t": 100.0 + i, "version": 0, "accuracy": 0.1, "loss": 2.0} for i in range(1, 1206)]
    h.server.evaluation.evals = evals
    page = h.http.get("/v1/history").json()
    assert [e["id"] for e in page["evals"]] == list(range(1, 1001)) and page["next"] == 1000
    page = h.http.get("/v1/history", params={"since": 1000}).json()
    assert [e["id"] for e in page["evals"]] == list(range(1001, 1206)) and page["next"] is None
    seen, since = [], 0
    while since is not None:
        page = h.http.get("/v1/history", params={"since": since, "limit": 500}).json()
        assert len(page["evals"]) <= 500
        seen += page["evals"]
        since = page["next"]
    assert seen == evals
    assert h.http.get("/v1/history", params={"since": 1204, "limit": 1}).json() == {"evals": [evals[-1]], "next": None}
    for limit in (0, -1, 10_001, "x"):
        assert h.http.get("/v1/history", params={"limit": limit}).status_code == 400


# ---- unauthenticated requests --------------------------------------------------------------


def test_requests_without_a_valid_token_are_rate_limited_per_address(tmp_path):
    with Harness(tmp_path, anonymous_rate_per_s=0.5, anonymous_burst=3) as h:
        mallory = bare(h, "10.0.0.66")
        tries = [
            mallory.post("/v1/checkin", headers={"Authorization": "Bearer afl_guess"}),
            mallory.post("/v1/update", content=b"x"),
            mallory.get("/status"),
        ]
        assert [r.status_code for r in tries] == [401, 401, 401]
        for r in (mallory.get("/v1/task"), mallory.get("/")):
            assert_rejected(h, r, 429, "rate_limited", "address '10.0.0.66'")
            assert int(r.headers["retry-after"]) >= 1
        # a valid token from that address, and other addresses, are not held back
        assert mallory.post("/v1/checkin", headers=h.auth("a")).status_code == 200
        assert mallory.get("/status", headers={"Authorization": f"Bearer {h.operator}"}).status_code == 200
        assert bare(h, "10.0.0.7").get("/status").status_code == 401


# ---- revocation ---------------------------------------------------------------------------


def test_revocation_holds_from_the_next_request_on_a_running_server(tmp_path, capsys):
    from asyncfl.cli import main

    cfg = {
        "name": "revoke",
        "seed": 0,
        "data": {"num_clients": 4},
        "model": {"name": "mlp", "hidden": [8]},
        "runs": [{"name": "revoke", "algorithm": {"name": "fedbuff", "buffer_size": 2}}],
    }
    server = ServerProcess(cfg, tmp_path)
    (tok,) = mint_tokens(server.state_dir, "revoke", ["phone-1"])
    server.start()
    try:
        auth = {"Authorization": f"Bearer {tok}"}
        assert httpx.get(server.url + "/v1/task", headers=auth).status_code == 200
        assert server.status()["task"] == "revoke"
        state = ["--state-dir", str(server.state_dir)]
        assert main(["token", "revoke", *state, "--client", "phone-1"]) == 0
        assert "revoked 1 token(s)" in capsys.readouterr().out
        r = httpx.get(server.url + "/v1/task", headers=auth)
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        assert main(["token", "revoke", *state, "--client", "test-operator"]) == 0
        assert httpx.get(server.url + "/status", headers=server.operator).status_code == 401
    finally:
        server.kill()


def test_token_command_mints_operator_tokens(tmp_path, capsys):
    from asyncfl.cli import main

    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["token", "create", *state, "--operator", "--client", "alice"]) == 0
    tok = capsys.readouterr().out.strip()
    assert main(["token", "create", *state, "--client", "phone-1"]) == 2  # a client token needs a task
    assert "--task" in capsys.readouterr().err
    store = Store(tmp_path / "state")
    try:
        assert store.lookup_token(tok, OPERATOR) == ("alice", "*") and store.lookup_token(tok) is None
    finally:
        store.close()
    assert main(["token", "list", *state]) == 0
    assert "alice\t*\t" in (out := capsys.readouterr().out) and out.rstrip().endswith("active\toperator")


# ---- identity ------------------------------------------------------------------------------


def test_users_whose_names_collide_in_crc32_stay_distinct(tmp_path):
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")  # the collision crc32 keys merged
    assert user_id("plumless") != user_id("buckeroo") and 0 <= user_id("plumless") < 2**63
    assert user_id("plumless") == int(hashlib.sha256(b"plumless").hexdigest()[:16], 16) // 2
    with CHarness(tmp_path, dp_run(1), algorithm={"name": "fedbuff", "buffer_size": 2}) as h:
        h.tokens |= {name: h.mint(name, "task1") for name in ("plumless", "buckeroo")}
        n = h.server.model.numel
        for i, name in enumerate(("plumless", "buckeroo")):
            lease = h.checkin(name)
            r = h.upload(name, h.frame(lease, delta=random_delta(n, i, 0.05)))
            assert r.status_code == 200, r.text  # DP's one-update-per-user rule sees two users
        assert h.http.get("/status").json()["version"] == 1


# ---- the client keeps its token on the server's origin --------------------------------------


def recording_api():
    calls = []

    def handler(request):
        calls.append(str(request.url))
        return httpx.Response(200, content=b"frame")

    return ServerApi("http://x:8080", "t", transport=httpx.MockTransport(handler)), calls


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/v1/model/0",
        "https://x:8080/v1/model/0",
        "http://x:8081/v1/model/0",
        "//evil.example/v1/model/0",
        "http://x.evil.example:8080/v1/model/0",
    ],
)
def test_client_refuses_a_url_on_another_origin(url):
    api, calls = recording_api()
    with pytest.raises(UnsafeUrl, match="not on the server's origin"):
        api.request("GET", url)
    assert calls == []


def test_client_follows_urls_on_the_servers_origin():
    api, calls = recording_api()
    api.request("GET", "/v1/model/0")
    api.request("GET", "http://x:8080/v1/model/1")
    assert calls == ["http://x:8080/v1/model/0", "http://x:8080/v1/model/1"]


def test_client_never_sends_its_token_to_a_foreign_model_url(tmp_path):
    from test_client_runtime import in_process_client

    with Harness(tmp_path) as h:
        rt = in_process_client(h, "a", max_trips=1)
        foreign = []

        def handler(request):
            if request.url.host != "testserver":
                foreign.append(request)
                return httpx.Response(200, content=b"")
            r = h.http.request(request.method, str(request.url), headers=request.headers, content=request.read())
            body = r.content
            if request.url.path == "/v1/checkin":
                answer = r.json()
                answer["model_url"] = "http://evil.example/v1/model/0"
                body = json.dumps(answer).encode()
            return httpx.Response(r.status_code, content=body, headers={"content-type": "application/json"})

        rt.api.http = httpx.Client(
            base_url="http://testserver", headers=dict(rt.api.http.headers), transport=httpx.MockTransport(handler)
        )
        rt.setup()
        with pytest.raises(UnsafeUrl, match="evil.example"):
            rt.trip()
        assert foreign == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost", "http://[::1]:80", "https://fl.example"])
def test_plain_http_is_fine_on_this_machine_and_https_anywhere(url):
    check_server_url(url, insecure=False)


def test_plain_http_to_another_host_needs_insecure(capsys):
    from asyncfl.cli import main

    with pytest.raises(UnsafeUrl, match="--insecure"):
        check_server_url("http://10.0.0.5:8080", insecure=False)
    check_server_url("http://10.0.0.5:8080", insecure=True)
    with pytest.raises(UnsafeUrl):
        check_server_url("ftp://fl.example", insecure=True)
    args = ["client", "--server", "http://fl.example", "--token", "t", "--data", "digits:client=0"]
    assert main(args) == 2 and "refusing plain http to fl.example" in capsys.readouterr().err


# ---- leases on a monotonic clock -----------------------------------------------------------


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def coordinator(clock: Clock, wall: Clock) -> Coordinator:
    aggregation = SimpleNamespace(state=SimpleNamespace(version=0))
    return Coordinator(AsyncPolicy(2), aggregation, 60.0, seed=0, clock=clock, wall=wall)


def test_a_wall_clock_jump_does_not_expire_a_lease():
    mono, wall = Clock(1000.0), Clock(1.7e9)
    co = coordinator(mono, wall)
    co.policy.start(co)
    lease = co.claim("a")
    wall.t += 3600  # the wall clock is set an hour ahead
    mono.t += 30
    assert not co.tick() and lease.state == ACTIVE
    mono.t += 31  # the lease's own 60 s are up
    assert co.tick() and lease.state == EXPIRED


def test_a_lease_keeps_its_remaining_time_across_a_restart(tmp_path):
    store = Store(tmp_path)
    try:
        mono, wall = Clock(1000.0), Clock(1.7e9)
        co = coordinator(mono, wall)
        co.policy.start(co)
        lease = co.claim("a")
        mono.t += 10
        wall.t += 10
        with store.transaction() as db:
            Coordinator.persist(co.snapshot(), db)
        (saved,) = store.query("SELECT expires_at FROM leases")
        assert saved[0] == pytest.approx(1.7e9 + 60)  # stored as wall-clock time
        wall.t += 5  # 5 s of downtime; the new process's monotonic clock starts near zero
        again = coordinator(Clock(3.0), wall)
        again.restore(store)
        restored = again.leases[lease.lease_id]
        assert restored.expires_at - 3.0 == pytest.approx(45.0)  # 60 - 10 before - 5 down
        again.clock.t += 44
        assert not again.tick() and restored.state == ACTIVE
        again.clock.t += 2
        assert again.tick() and restored.state == EXPIRED
    finally:
        store.close()
