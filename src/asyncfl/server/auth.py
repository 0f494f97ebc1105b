"""Client authentication (bearer tokens, stored hashed, bound to one task) and per-client
rate limiting. Tokens are minted by `asyncfl token create`, never by the running server."""

from __future__ import annotations

import secrets
import threading
import time

from asyncfl.server.errors import ApiError
from asyncfl.server.store import Store

TOKEN_PREFIX = "afl_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, store: Store, task: str):
        self.store, self.task = store, task
        self._cache: dict[str, tuple[str, str, float]] = {}  # token -> (client, task, checked at)
        self.ttl = 5.0  # a revoked token stops working within this many seconds

    def client_of(self, authorization: str | None) -> str:
        """The client id behind an `Authorization: Bearer ...` header, or a 401/403."""
        if not authorization:
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token (send 'Authorization: Bearer <token>')",
                {"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "unauthorized", "authorization header must be 'Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is None or now - hit[2] > self.ttl:
            found = self.store.lookup_token(token) if len(token) <= 256 else None
            if found is None:
                self._cache.pop(token, None)
                raise ApiError(401, "unauthorized", "invalid or revoked token", {"WWW-Authenticate": "Bearer"})
            hit = (found[0], found[1], now)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[token] = hit
        client, task, _ = hit
        if task != self.task:
            raise ApiError(403, "forbidden", f"token belongs to task {task!r}; this server runs task {self.task!r}")
        return client


class RateLimiter:
    """Token bucket per client: `rate` requests/s on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self.limited = 0

    def check(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(client, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1.0:
                self._buckets[client] = (level, now)
                self.limited += 1
                wait = (1.0 - level) / self.rate
                raise ApiError(
                    429,
                    "rate_limited",
                    f"client {client!r} exceeds {self.rate:g} requests/s; retry in {wait:.2f} s",
                    {"Retry-After": str(max(1, round(wait + 0.5)))},
                    {"retry_after": wait},
                )
            self._buckets[client] = (level - 1.0, now)
