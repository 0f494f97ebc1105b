"""Slow senders against a real server on loopback: connections that never finish their request
head, trickle it a byte at a time, or stall in the body are closed within the configured bounds
while other clients are served, and the connection cap answers 503 only while it is full. And
`serve` starts at every --log-level the CLI offers."""

from __future__ import annotations

import select
import signal
import socket
import time

import httpx
import pytest
import uvicorn.config

from asyncfl import cli
from asyncfl.server.testing import Child, ServerProcess, free_port, mint_tokens

HEADER_TIMEOUT = BODY_TIMEOUT = 1.0
SLACK = 3.0  # a loaded two-core machine may be late to close; the bound is still seconds, not minutes
MAX_CONNECTIONS = 64


def experiment(**server) -> dict:
    return {
        "name": "slow",
        "seed": 0,
        "data": {"num_clients": 4, "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [16]},
        "runs": [
            {
                "name": "task1",
                "algorithm": {"name": "fedbuff", "buffer_size": 2},
                "scheduler": {"mode": "async", "concurrency": 2},
            }
        ],
        "server": server,
    }


def opened(port: int, first: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(first)
    s.setblocking(False)
    return s


def wait_closed(socks: list[socket.socket], bound: float, each=lambda: None) -> dict[socket.socket, bytes]:
    """Read every socket until the server closes it or `bound` seconds pass, calling `each`
    between polls; returns what each one received, for those that were closed."""
    got = {s: b"" for s in socks}
    closed: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + bound
    while len(closed) < len(socks) and time.monotonic() < deadline:
        each()
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.05)
        for s in ready:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, BlockingIOError) as err:
                data = b"" if isinstance(err, ConnectionResetError) else None
            if data == b"":
                closed[s] = got[s]
            elif data:
                got[s] += data
    for s in socks:
        s.close()
    return closed


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(
        experiment(header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, max_connections=MAX_CONNECTIONS), tmp_path
    )
    (srv.token,) = mint_tokens(srv.state_dir, "task1", ["a"])
    srv.start()
    yield srv
    srv.kill()


def test_slow_senders_are_dropped_within_the_bound_while_others_are_served(server):
    port, token = server.port, server.token
    half_heads = [opened(port, b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-") for _ in range(30)]
    silent = [opened(port, b"") for _ in range(5)]
    tricklers = [opened(port, b"GET /healthz HTTP/1.1\r\nX-Slow: ") for _ in range(5)]
    head = f"POST /v1/update HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 200\r\n\r\n"
    stalled_bodies = [opened(port, head.encode() + b"AFL1") for _ in range(10)]
    served = []
    last = [0.0]

    def meanwhile():  # every 0.2 s: a byte from each trickler (never a whole head), one normal request
        if time.monotonic() - last[0] < 0.2:
            return
        last[0] = time.monotonic()
        for s in tricklers:
            try:
                s.send(b"a")
            except OSError:
                pass
        r = httpx.get(server.url + "/v1/task", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        served.append(r.status_code)

    t0 = time.monotonic()
    closed = wait_closed(half_heads + silent + tricklers + stalled_bodies, HEADER_TIMEOUT + SLACK, meanwhile)
    assert len(closed) == 50, f"{50 - len(closed)} slow connections still open after {time.monotonic() - t0:.1f} s"
    assert all(closed[s].startswith(b"HTTP/1.1 408") for s in stalled_bodies), [closed[s][:40] for s in stalled_bodies]
    assert len(served) >= 5 and set(served) == {200}, served
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_connection_cap_answers_503_until_slow_senders_are_dropped(server):
    hogs = [opened(server.port, b"GET /healthz HTTP/1.1\r\n") for _ in range(MAX_CONNECTIONS + 4)]
    time.sleep(0.2)
    full = httpx.get(server.url + "/healthz", timeout=5)
    assert full.status_code == 503, full.text
    assert len(wait_closed(hogs, HEADER_TIMEOUT + SLACK)) == len(hogs)
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_serve_starts_at_every_log_level_the_cli_offers(tmp_path):
    assert set(cli.LOG_LEVELS) == set(uvicorn.config.LOG_LEVELS)
    cfg = ServerProcess(experiment(), tmp_path).config_path
    servers = {}
    for level in cli.LOG_LEVELS:
        port = free_port()
        argv = ["serve", "--config", str(cfg), "--state-dir", str(tmp_path / level), "--port", str(port)]
        servers[level] = (port, Child([*argv, "--log-level", level], tmp_path / f"{level}.log"))
    try:
        for level, (port, proc) in servers.items():
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / f"{level}.log").read_text()[-2000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"--log-level {level}: not serving"
                time.sleep(0.1)
    finally:
        for _, proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc in servers.values():
            proc.wait(timeout=30)
    logs = {level: (tmp_path / f"{level}.log").read_text() for level in servers}
    assert "HTTP connection made" in logs["trace"]  # uvicorn's TRACE lines
    assert all("HTTP connection made" not in logs[level] for level in servers if level != "trace")
    assert "Application startup complete" in logs["info"] and "Application startup complete" not in logs["warning"]
