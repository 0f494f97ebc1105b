"""A small pool of PostgreSQL connections for a server's request threads.

A request that needs the database borrows a connection for one transaction. When PostgreSQL
cannot be reached (down, restarting, or every connection busy for too long) the request gets
503 with Retry-After, so clients back off and retry; nothing it did is acknowledged, since its
transaction did not commit. Broken connections are dropped and replaced on the next borrow.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from asyncfl.server.errors import ApiError

RETRY_AFTER_S = 1


def unavailable(why: str) -> ApiError:
    return ApiError(
        503, "unavailable", f"the database is unavailable ({why}); retry later", {"Retry-After": str(RETRY_AFTER_S)}
    )


class Pool:
    def __init__(self, url: str, size: int = 8, wait_s: float = 5.0, connect_timeout_s: int = 3):
        self.url, self.wait_s, self.connect_timeout_s = url, wait_s, connect_timeout_s
        self._idle: queue.LifoQueue[psycopg.Connection | None] = queue.LifoQueue()
        for _ in range(size):
            self._idle.put(None)  # a permit: connected on first use
        self._closed = threading.Event()

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection in autocommit mode; 503 when none can be had or it breaks meanwhile."""
        try:
            conn = self._idle.get(timeout=self.wait_s)
        except queue.Empty:
            raise unavailable(f"all connections busy for {self.wait_s:g} s") from None
        try:
            if conn is None or conn.closed or conn.broken:
                conn = None
                conn = self._connect()
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            if conn is not None and not conn.closed:
                conn.close()
            conn = None
            raise unavailable(type(err).__name__) from err
        finally:
            self._idle.put(conn)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction: committed when the block ends, rolled back on any error."""
        with self.connection() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                conn.close()
