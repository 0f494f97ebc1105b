"""A few PostgreSQL connections for the selector's event loop, for a statement short enough to
await there (a slot claim: one round trip) rather than hand to a thread: a thread hop under a
busy loop cost a claim about 9 ms of its 12 ms (p50), waiting for the interpreter. Failures are
`pgpool`'s: 503 with Retry-After, the broken connection dropped and replaced on the next use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

from asyncfl.cluster.pgpool import unavailable


class AsyncPool:
    def __init__(self, url: str, size: int = 4, wait_s: float = 5.0, connect_timeout_s: int = 3):
        self.url, self.size, self.wait_s, self.connect_timeout_s = url, size, wait_s, connect_timeout_s
        self._idle: asyncio.LifoQueue[psycopg.AsyncConnection | None] | None = None

    def _queue(self) -> asyncio.LifoQueue:
        """Made on first use, on the loop that uses it; a permit per connection, connected lazily."""
        if self._idle is None:
            self._idle = asyncio.LifoQueue()
            for _ in range(self.size):
                self._idle.put_nowait(None)
        return self._idle

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """An autocommit connection; 503 when none can be had or it breaks meanwhile."""
        idle = self._queue()
        try:
            async with asyncio.timeout(self.wait_s):  # no task per claim, as wait_for would create
                conn = await idle.get()
        except TimeoutError:
            raise unavailable(f"all connections busy for {self.wait_s:g} s") from None
        try:
            if conn is None or conn.closed or conn.broken:
                conn = None
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=self.connect_timeout_s
                )
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            if conn is not None and not conn.closed:
                await conn.close()
            conn = None
            raise unavailable(type(err).__name__) from err
        except asyncio.CancelledError:  # a statement may be left in flight on it
            if conn is not None and not conn.closed:
                await conn.close()
            conn = None
            raise
        finally:
            idle.put_nowait(conn)

    async def close(self) -> None:
        if self._idle is None:
            return
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await conn.close()
