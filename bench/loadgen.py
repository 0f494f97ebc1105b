"""A bounded, self-stopping load generator for the server benchmarks: simulated devices check in
over loopback, and the few told to train download the model, "train" (sleep), and upload a
precomputed delta, re-sending the same upload after a 429/503's Retry-After.

HTTP/1.1 over raw asyncio streams with keep-alive connections (httpx's async client costs
several times more CPU per request, which on a small machine would measure the generator). A
fixed set of connections is the cap on requests in flight; every phase ends at a deadline,
uploads still being retried at most `grace_s` after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from asyncfl import wire

CHECKIN_BODY = b'{"eligible": true}'
SHED = (429, 503)


class Connection:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after a close."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, lower-cased headers, body). A reused connection the server closed while idle
        is reopened once (uploads are idempotent, check-ins harmless)."""
        for attempt in (0, 1):
            reused = self.writer is not None
            if not reused:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(head + body)
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            lines = raw[:-4].split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            payload = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
            if headers.get(b"connection") == b"close":
                self.close()
            return status, headers, payload
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def head(method: str, path: str, token: str, length: int, content_type: str = "application/json") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@dataclass
class Stats:
    """What one phase measured; latencies (and rates) of the requests answered 200 that started
    after the warm-up and before the deadline."""

    latency: dict[str, list[float]] = field(
        default_factory=lambda: {"checkin": [], "checkin_train": [], "download": [], "upload": []}
    )  # "checkin_train": the check-ins among "checkin" answered with a lease
    status: Counter = field(default_factory=Counter)  # (kind, status)
    shed_without_retry_after: int = 0
    transport_errors: int = 0
    trains: int = 0
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (client, idempotency key) answered 200
    offered: int = 0  # open loop: sessions due after the warm-up
    capped: int = 0  # open loop: of them, not sent: every connection busy

    def summary(self, seconds: float) -> dict:
        def pct(kind: str, q: float) -> float | None:
            lat = self.latency[kind]
            return round(float(np.percentile(lat, q)) * 1000, 2) if lat else None

        checkins = len(self.latency["checkin"])
        shed = {f"{kind}_{code}": n for (kind, code), n in sorted(self.status.items()) if code in SHED}
        return {
            "checkins_per_s": round(checkins / seconds, 1),
            "updates_per_s": round(len(self.latency["upload"]) / seconds, 1),
            "checkin_p50_ms": pct("checkin", 50),
            "checkin_p99_ms": pct("checkin", 99),
            "checkin_train_p50_ms": pct("checkin_train", 50),
            "checkin_train_p99_ms": pct("checkin_train", 99),
            "upload_p50_ms": pct("upload", 50),
            "upload_p99_ms": pct("upload", 99),
            "download_p50_ms": pct("download", 50),
            "train_fraction": round(self.trains / max(1, self.status_total("checkin")), 4),
            "shed": shed,
            "shed_total": sum(shed.values()),
            "shed_without_retry_after": self.shed_without_retry_after,
            "transport_errors": self.transport_errors,
            "acknowledged_uploads": len(self.acknowledged),
            "statuses": {f"{kind}_{code}": n for (kind, code), n in sorted(self.status.items())},
        }

    def status_total(self, kind: str) -> int:
        return sum(n for (k, _), n in self.status.items() if k == kind)


class Fleet:
    """`len(tokens)` devices (client d{i} holds tokens[i]) against selectors at `endpoints`;
    `frame(lease_id, base_version, key)` encodes an upload."""

    def __init__(self, endpoints: list[tuple[str, int]], tokens: list[str], names, shapes, train_s: float, seed=0):
        self.endpoints, self.tokens, self.train_s = endpoints, tokens, train_s
        self.names, self.shapes = names, shapes
        n = sum(int(np.prod(s)) for s in shapes)
        self.delta = np.random.default_rng(seed).normal(0, 1e-3, n).astype(np.float32)
        self.rng = random.Random(seed)
        self._endpoint = 0

    def connection(self) -> Connection:
        """Connections spread round-robin over the endpoints (selectors are stateless)."""
        self._endpoint += 1
        return Connection(*self.endpoints[self._endpoint % len(self.endpoints)])

    def frame(self, lease: dict, key: str) -> bytes:
        import torch

        return wire.encode_update(
            lease_id=lease["lease_id"],
            base_version=lease["base_version"],
            idempotency_key=key,
            n_examples=10,
            steps=10,
            loss=1.0,
            delta=torch.from_numpy(self.delta),
            names=self.names,
            shapes=self.shapes,
        )

    async def phase(self, seconds: float, warmup: float, inflight: int, rate: float | None, grace_s: float, marks):
        """Closed loop (`rate` None: `inflight` connections check in back to back) or open loop
        (`rate` sessions/s offered, each on a free one of `inflight` connections, else counted
        as capped). `marks(0)` / `marks(1)` are called at the start and end of the measured window."""
        loop = asyncio.get_running_loop()
        stats, trainers = Stats(), set()
        t0 = loop.time()
        warm, end = t0 + warmup, t0 + warmup + seconds
        loop.call_at(warm, marks, 0)
        loop.call_at(end, marks, 1)
        connections = [self.connection() for _ in range(inflight)]
        # open loop: each endpoint's idle connections, most recently used last, so sessions go
        # round-robin over the selectors as a load balancer's would and reuse open connections
        idle = {endpoint: [] for endpoint in self.endpoints}
        for conn in reversed(connections):
            idle[(conn.host, conn.port)].append(conn)
        turn = itertools.cycle(self.endpoints)

        async def timed(kind: str, conn: Connection, request: bytes, body: bytes = b""):
            start = loop.time()
            try:
                status, headers, payload = await conn.request(request, body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                stats.transport_errors += 1
                return None
            done = loop.time()
            stats.status[(kind, status)] += 1
            if status in SHED and b"retry-after" not in headers:
                stats.shed_without_retry_after += 1
            timed_s = done - start if status == 200 and warm <= start < end else None
            if timed_s is not None:
                stats.latency[kind].append(timed_s)
            return status, headers, payload, timed_s

        async def checkin(conn: Connection) -> None:
            device = self.rng.randrange(len(self.tokens))
            got = await timed(
                "checkin", conn, head("POST", "/v1/checkin", self.tokens[device], len(CHECKIN_BODY)), CHECKIN_BODY
            )
            if got is not None and got[0] == 200 and b'"train"' in got[2]:
                stats.trains += 1
                if got[3] is not None:
                    stats.latency["checkin_train"].append(got[3])
                task = asyncio.ensure_future(train(device, json.loads(got[2])))
                trainers.add(task)
                task.add_done_callback(trainers.discard)

        async def until_answered(kind: str, conn: Connection, request: bytes, body: bytes = b""):
            """Re-sent after each 429/503's Retry-After until answered otherwise or past the grace."""
            while True:
                got = await timed(kind, conn, request, body)
                if got is None or got[0] not in SHED:
                    return got
                retry = float(got[1].get(b"retry-after", b"1"))
                if loop.time() + retry > end + grace_s:
                    return got
                await asyncio.sleep(retry)

        async def train(device: int, lease: dict) -> None:
            """Download, sleep for the training time, upload (the same frame on every re-send)."""
            token, conn = self.tokens[device], self.connection()
            try:
                got = await until_answered("download", conn, head("GET", lease["model_url"], token, 0))
                if got is None or got[0] != 200:
                    return
                await asyncio.sleep(self.train_s)
                key = uuid.uuid4().hex
                body = self.frame(lease, key)
                got = await until_answered(
                    "upload", conn, head("POST", "/v1/update", token, len(body), "application/octet-stream"), body
                )
                if got is not None and got[0] == 200:
                    stats.acknowledged.append((f"d{device}", key))
            finally:
                conn.close()

        async def closed_loop(conn: Connection) -> None:
            while loop.time() < end:
                await checkin(conn)

        async def session(conn: Connection) -> None:
            try:
                await checkin(conn)
            finally:
                idle[(conn.host, conn.port)].append(conn)

        if rate is None:
            await asyncio.gather(*(closed_loop(c) for c in connections))
        else:
            due, sessions = t0, set()
            while due < end:
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                while due <= loop.time() and due < end:
                    measured = due >= warm
                    due += 1.0 / rate
                    stats.offered += measured
                    first = next(turn)
                    endpoint = next((e for e in (first, *self.endpoints) if idle[e]), None)
                    if endpoint is None:
                        stats.capped += measured
                        continue
                    task = asyncio.ensure_future(session(idle[endpoint].pop()))
                    sessions.add(task)
                    task.add_done_callback(sessions.discard)
            if sessions:
                await asyncio.wait(sessions)
        if trainers:
            await asyncio.wait(set(trainers), timeout=end + grace_s + 5 - loop.time())
        for conn in connections:
            conn.close()
        return stats
