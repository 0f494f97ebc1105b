"""uvicorn's HTTP/1.1 protocol with a deadline for each request's headers. uvicorn closes a
connection left idle after a response, but it waits for ever on one whose request never
finishes its headers, or whose peer sends a byte now and then: a few hundred such slow senders
would hold the server's connections (and, with a connection cap, lock everyone else out)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """A connection must deliver a complete request head within `header_timeout` seconds of
    opening, and of each response; else it is closed. The body's own bound is the app's
    (`read_limited`)."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None

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
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)
