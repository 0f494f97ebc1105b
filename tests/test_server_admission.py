"""The check-in budget (`server.checkin_rate_per_s`): above it a check-in is answered 429 with
Retry-After and a JSON error before any other work, on the same keep-alive connection; other
requests (uploads, downloads) are never shed by it; none configured, nothing changes."""

from __future__ import annotations

import asyncio
import json
import socket

from raw_http import read_response

from asyncfl.server import admission
from asyncfl.server.admission import CheckinAdmission, with_admission
from asyncfl.server.testing import ServerProcess, mint_tokens


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def call(app, path: str) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """(status, headers, body, calls reaching the inner app) of one request through `app`."""
    sent, reached = [], []

    async def inner(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return {"type": "http.request", "body": b'{"eligible": true}', "more_body": False}

    async def send(message):
        sent.append(message)

    app.app = inner
    asyncio.run(app({"type": "http", "path": path, "method": "POST"}, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"], len(reached)


def test_checkins_over_the_budget_are_refused_before_the_app_and_refill(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(admission.time, "monotonic", clock)
    app = CheckinAdmission(None, rate_per_s=20, retry_after_s=2.2)  # bursts of 2
    assert [call(app, "/v1/checkin")[0] for _ in range(2)] == [200, 200]
    status, headers, body, reached = call(app, "/v1/checkin")
    assert (status, reached) == (429, 0)
    assert headers[b"retry-after"] == b"3"  # whole seconds, rounded up
    assert json.loads(body)["error"] == "overloaded" and "20 check-ins/s" in json.loads(body)["detail"]
    assert int(headers[b"content-length"]) == len(body)
    for path in ("/v1/update", "/v1/model/0", "/v1/task"):  # never shed here
        assert call(app, path)[0] == 200
    clock.now += 0.06  # one check-in's worth, and a bit
    assert [call(app, "/v1/checkin")[0] for _ in range(2)] == [200, 429]
    clock.now += 10.0  # refills to the burst, not beyond
    assert [call(app, "/v1/checkin")[0] for _ in range(3)] == [200, 200, 429]
    assert app.shed == 3


def test_no_budget_leaves_the_app_as_it_is():
    inner = object()
    assert with_admission(inner, None, 2.0) is inner


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    return read_response(sock)


def test_a_served_budget_sheds_on_the_same_keep_alive_connection(tmp_path):
    cfg = {
        "name": "budget",
        "seed": 0,
        "data": {"num_clients": 4},
        "model": {"name": "mlp", "hidden": [8]},
        "runs": [{"name": "budget", "algorithm": {"name": "fedbuff", "buffer_size": 2}}],
        "server": {"checkin_rate_per_s": 2.0, "retry_after": 1.0},
    }
    server = ServerProcess(cfg, tmp_path)
    (token,) = mint_tokens(server.state_dir, "budget", ["phone-1"])
    server.start()
    body = b'{"eligible": true}'
    checkin = (
        f"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            answers = [exchange(sock, checkin) for _ in range(6)]  # one connection throughout
            task = exchange(sock, f"GET /v1/task HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    finally:
        server.kill()
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 3, statuses  # a burst of 1, 2/s refill
    for status, headers, payload in answers:
        if status == 429:
            assert headers["retry-after"] == "1" and json.loads(payload)["error"] == "overloaded"
    assert task[0] == 200
