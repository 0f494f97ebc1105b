"""Authentication (bearer tokens, stored hashed) and rate limiting. Tokens are minted by
`asyncfl token create`, never by the running server. A *client* token is bound to one task and
may train and upload; an *operator* token may read the run (/status, /metrics, /v1/history, the
dashboard, the API docs) and nothing else. Each request looks its token up in the store, so a
revocation holds from the next request on."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from asyncfl.server.errors import ApiError
from asyncfl.server.store import Store

TOKEN_PREFIX = "afl_"
CLIENT, OPERATOR = "client", "operator"
ANY_TASK = "*"  # the task of an operator token not bound to one
OPERATOR_COOKIE = "asyncfl_operator"  # the dashboard's credential (HttpOnly, SameSite=Strict)
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
T = TypeVar("T")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def user_id(name: str) -> int:
    """The id updates carry (DP counts distinct users by it): 63 bits of SHA-256 of the full
    name, so distinct names share an id only by a 2^-63 accident (crc32 merged users)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer ...` header, or a 401."""
    if not authorization:
        raise ApiError(401, "unauthorized", "missing bearer token (send 'Authorization: Bearer <token>')", _CHALLENGE)
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "authorization header must be 'Bearer <token>'", _CHALLENGE)
    return token


class Authenticator:
    """`store` is anything with Store's `lookup_token` (the cluster's selectors cache PostgreSQL's)."""

    def __init__(self, store: Store, task: str | None):
        self.store, self.task = store, task

    def lookup(self, token: str, role: str) -> tuple[str, str]:
        """(name, task) behind a live token of `role`, whatever its task, or a 401/403."""
        found = self.store.lookup_token(token, role) if len(token) <= 256 else None
        if found is None:
            other = OPERATOR if role == CLIENT else CLIENT
            if len(token) <= 256 and self.store.lookup_token(token, other) is not None:
                raise ApiError(403, "forbidden", f"this endpoint needs a token of role {role!r}, not {other!r}")
            raise ApiError(401, "unauthorized", "invalid or revoked token", _CHALLENGE)
        return found

    def identify(self, token: str, role: str) -> str:
        """The name behind a live token of `role` for this task, or a 401/403."""
        name, task = self.lookup(token, role)
        if task != self.task and not (role == OPERATOR and task == ANY_TASK):
            raise ApiError(403, "forbidden", f"token belongs to task {task!r}; this server runs task {self.task!r}")
        return name

    def client_of(self, authorization: str | None) -> str:
        """The client behind an `Authorization: Bearer ...` header, or a 401/403."""
        return self.identify(bearer(authorization), CLIENT)

    def operator_of(self, authorization: str | None, cookie: str | None) -> str:
        """The operator behind a bearer header or, without one, the dashboard's cookie."""
        return self.identify(bearer(authorization) if authorization or not cookie else cookie, OPERATOR)


class RateLimiter:
    """Token bucket per key (a client, or an address): `rate` requests/s on average, bursts up
    to `burst`."""

    def __init__(self, rate: float, burst: float, what: str = "client"):
        self.rate, self.burst, self.what = rate, burst, what
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - last) * self.rate)
            if level < 1.0:
                self._buckets[key] = (level, now)
                wait = (1.0 - level) / self.rate
                raise ApiError(
                    429,
                    "rate_limited",
                    f"{self.what} {key!r} exceeds {self.rate:g} requests/s; retry in {wait:.2f} s",
                    {"Retry-After": str(max(1, round(wait + 0.5)))},
                    {"retry_after": wait},
                )
            if len(self._buckets) > 100_000:  # many keys: forget the buckets that have refilled
                self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
                if len(self._buckets) > 100_000:
                    self._buckets.clear()
            self._buckets[key] = (level - 1.0, now)


def admit(
    identify: Callable[[], T],
    address: str,
    anonymous: RateLimiter,
    per_name: RateLimiter | None = None,
    name_of: Callable[[T], str] = str,
) -> T:
    """Who `identify` finds behind a request, once the rate limits let it through: requests
    without a valid token count against their address's bucket (`anonymous`), the others
    against their name's (`per_name`, when given); 429 once a bucket is empty."""
    try:
        found = identify()
    except ApiError:
        anonymous.check(address)
        raise
    if per_name is not None:
        per_name.check(name_of(found))
    return found
