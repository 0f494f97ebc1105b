"""uvicorn's HTTP/1.1 protocol with a deadline for each request's headers, and a bound on their
size (httptools, unlike h11, has none: a head would be buffered whole). uvicorn closes a
connection left idle after a response, but it waits for ever on one whose request never
finishes its headers, or whose peer sends a byte now and then: a few hundred such slow senders
would hold the server's connections (and, with a connection cap, lock everyone else out).

Above the connection cap uvicorn's own 503 says neither when to come back nor why (and logs a
warning per request, CPU spent when a server is overloaded already); here the same cap answers
503 with Retry-After and a JSON error like every other refusal."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

OVER_CAP_RETRY_AFTER_S = 1
MAX_HEAD_BYTES = 16 * 1024  # a request's line and headers (h11's bound; httptools has none)
_HEAD_TOO_LARGE_BODY = json.dumps(
    {"error": "header_too_large", "detail": f"a request's line and headers may hold at most {MAX_HEAD_BYTES} bytes"}
).encode()
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    + f"content-length: {len(_HEAD_TOO_LARGE_BODY)}\r\nconnection: close\r\n\r\n".encode()
    + _HEAD_TOO_LARGE_BODY
)
_OVER_CAP_BODY = json.dumps(
    {"error": "overloaded", "detail": "the server holds too many connections; retry later"}
).encode()
_OVER_CAP_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_OVER_CAP_BODY)).encode()),
    (b"retry-after", str(OVER_CAP_RETRY_AFTER_S).encode()),
    (b"connection", b"close"),
]


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """A connection must deliver a complete request head within `header_timeout` seconds of
    opening, and of each response; else it is closed. A head of more than MAX_HEAD_BYTES is
    answered 431 and the connection closed (httptools would buffer it whole). The body's own
    bound is the app's (`read_limited`). httptools' C parser rather than h11's: parsing is most
    of what a check-in answered from memory costs, and it parses a request several times
    faster."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self.connection_cap, self.limit_concurrency = self.limit_concurrency, None  # checked in _capped
        if self.connection_cap is not None:
            self.app = self._capped(self.app)

    def _capped(self, app):
        """uvicorn's cap (connections, or requests being answered, at the limit) with Retry-After.
        uvicorn counts the requests before this one's task exists; here it is among them."""

        async def capped(scope, receive, send):
            cap = self.connection_cap
            if scope["type"] == "http" and (len(self.connections) >= cap or len(self.tasks) > cap):
                await send({"type": "http.response.start", "status": 503, "headers": _OVER_CAP_HEADERS})
                await send({"type": "http.response.body", "body": _OVER_CAP_BODY})
                return
            await app(scope, receive, send)

        return capped

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        """Close unless a request started since the deadline was armed (a new cycle) and is
        still being answered."""
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request within %g s", self.header_timeout)
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes: int | None = 0  # of the head arriving; None while a body does
        self._tail = b""  # the last bytes of it, where its blank line may have begun
        self._arm()

    def data_received(self, data: bytes) -> None:
        """A head ends at its first blank line: only the bytes up to it count, so a chunk that
        ends a head and carries a body is judged by its head alone."""
        if self._head_bytes is not None:
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            head = len(data) if end < 0 else end + 4 - len(self._tail)
            if self._head_bytes + head > MAX_HEAD_BYTES:
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()
                return
            self._head_bytes += head
            self._tail = seen[-3:]
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes, self._tail = 0, b""

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)
