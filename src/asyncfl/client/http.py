"""HTTP to the server with retries: exponential backoff with full jitter on network errors,
5xx and 429, so a fleet of clients neither gives up during a server restart nor stampedes it
when it comes back."""

from __future__ import annotations

import ipaddress
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Backoff:
    base: float = 0.25
    cap: float = 10.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base 2^attempt)]."""
        return random.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 30)))


class GaveUp(RuntimeError):
    """The server stayed unreachable (or kept failing) for the whole retry budget."""


class TlsError(RuntimeError):
    """The server's certificate did not verify: retrying cannot help, so it is not retried."""


class UnsafeUrl(RuntimeError):
    """A URL the client will not send its token to: another origin, or plain http off this host."""


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def check_server_url(url: str, insecure: bool) -> None:
    """Plain http sends the token in the clear: only to this machine, unless `insecure`."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UnsafeUrl(f"server URL {url!r} must be http(s)://host[:port]")
    if parsed.scheme == "http" and not insecure:
        try:
            loopback = ipaddress.ip_address(parsed.host).is_loopback
        except ValueError:
            loopback = parsed.host == "localhost"
        if not loopback:
            raise UnsafeUrl(
                f"refusing plain http to {parsed.host}: the token would travel in the clear; "
                "use https, or pass --insecure (testing only)"
            )


def _tls_failure(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class ServerApi:
    def __init__(
        self,
        url: str,
        token: str,
        verify: bool | str = True,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
            timeout=timeout,
            transport=transport,
        )
        self.backoff = backoff or Backoff()
        self.retries = 0

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, budget: float = 300.0, **kw: Any) -> httpx.Response:
        """Send until a non-retryable answer arrives; 4xx other than 429 are returned as is.
        `path` may be a URL the server handed out (a model_url): it must be on the server's
        origin, since every request carries the token."""
        target = httpx.URL(path)
        if (target.scheme or target.host) and _origin(target) != _origin(self.http.base_url):
            raise UnsafeUrl(f"refusing to send the token to {path!r}: not on the server's origin {self.url}")
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            wait = None
            try:
                resp = self.http.request(method, path, **kw)
                if resp.status_code < 500 and resp.status_code != 429:
                    return resp
                if resp.status_code == 429:
                    try:
                        wait = float(resp.json().get("retry_after", resp.headers.get("retry-after", 1)))
                    except ValueError:
                        wait = 1.0
                problem = f"HTTP {resp.status_code}"
            except httpx.TransportError as err:
                if _tls_failure(err):
                    raise TlsError(
                        f"{self.url}: TLS certificate verification failed ({err}); pass the server's CA with --ca-cert"
                    ) from None
                problem = f"{type(err).__name__}: {err}"
            delay = self.backoff.delay(attempt) if wait is None else wait * random.uniform(1.0, 1.5)
            attempt += 1
            self.retries += 1
            if time.monotonic() + delay > deadline:
                raise GaveUp(f"{method} {path}: giving up after {attempt} attempts ({problem})")
            time.sleep(delay)
