"""The TSA's durable memory of used contributions: what makes a seed single-use across restarts.

If the TSA forgot a used seed (a restart, a crash), a curious server could ask it again for the
mask of one update inside a different set and difference the two answers down to that update.
So the TSA claims a request's ids and seed digests before it computes anything and only answers
once the claim is durable. A claim is atomic and tied to the step that made it: the identical
request again (a server retrying after a lost reply) is allowed and gets the identical answer;
any other request touching a claimed id or seed, or reusing a step id, is refused.

Before the server acknowledges an upload, the TSA also *reserves* its seed for its update id
(`reserve`), durably too: a seed then belongs to one update id for good, so an upload that reuses
a seed (within a buffer, or from an earlier step) is refused on arrival, and only that upload,
instead of blocking the step of the buffer it would have been folded into.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class TsaRefusal(ValueError):
    """The TSA declined a request; the subclass says why."""


class ReplayedContribution(TsaRefusal):
    """An update id or seed used before (also across restarts) or twice in one request, or a reused step id."""


class UsedContributionStore(Protocol):
    def claim(self, step_id: str, request_digest: bytes, keys: Sequence[str]) -> None:
        """Atomically record `keys` as used by `step_id`, durably before returning.

        Returns without change for an exact retry (same step id and digest); raises
        `ReplayedContribution` if the step id was used for another request or any key was used
        by another step.
        """
        ...

    def reserve(self, update_id: str, seed_key: str) -> None:
        """Durably give the seed `seed_key` to `update_id` alone; raises `ReplayedContribution` if
        the id or the seed was used by a step, or the seed was reserved for another update id
        (reserving the same pair again is a retry and succeeds)."""
        ...


class MemoryStore:
    """In-process store: for tests and for runs where the TSA never restarts."""

    def __init__(self) -> None:
        self._steps: dict[str, bytes] = {}
        self._used: dict[str, str] = {}
        self._reserved: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, step_id: str, request_digest: bytes, keys: Sequence[str]) -> None:
        with self._lock:
            if _is_retry(self._steps.get(step_id), step_id, request_digest):
                return
            _refuse_used(step_id, [(key, self._used[key]) for key in keys if key in self._used])
            self._steps[step_id] = request_digest
            self._used.update(dict.fromkeys(keys, step_id))

    def reserve(self, update_id: str, seed_key: str) -> None:
        with self._lock:
            id_key = f"id:{update_id}"
            _refuse_reserved(update_id, [(k, self._used[k]) for k in (id_key, seed_key) if k in self._used])
            _refuse_taken(update_id, self._reserved.setdefault(seed_key, update_id))


class SqliteStore:
    """A SQLite file (WAL, synchronous=FULL): a committed claim survives kill -9 and power loss."""

    def __init__(self, path: str | Path) -> None:
        self._connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS steps (step_id TEXT PRIMARY KEY, digest BLOB NOT NULL)"
            )
            self._connection.execute("CREATE TABLE IF NOT EXISTS used (key TEXT PRIMARY KEY, step_id TEXT NOT NULL)")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS reserved (seed TEXT PRIMARY KEY, update_id TEXT NOT NULL)"
            )

    def claim(self, step_id: str, request_digest: bytes, keys: Sequence[str]) -> None:
        with self._lock:
            db = self._connection
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT digest FROM steps WHERE step_id = ?", (step_id,)).fetchone()
                if _is_retry(None if row is None else bytes(row[0]), step_id, request_digest):
                    db.execute("COMMIT")
                    return
                clashes = []
                for start in range(0, len(keys), 500):
                    chunk = list(keys[start : start + 500])
                    marks = ",".join("?" * len(chunk))
                    clashes += db.execute(f"SELECT key, step_id FROM used WHERE key IN ({marks})", chunk).fetchall()
                _refuse_used(step_id, clashes)
                db.execute("INSERT INTO steps VALUES (?, ?)", (step_id, request_digest))
                db.executemany("INSERT INTO used VALUES (?, ?)", [(key, step_id) for key in keys])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def reserve(self, update_id: str, seed_key: str) -> None:
        with self._lock:
            db = self._connection
            db.execute("BEGIN IMMEDIATE")
            try:
                used = db.execute(
                    "SELECT key, step_id FROM used WHERE key IN (?, ?)", (f"id:{update_id}", seed_key)
                ).fetchall()
                _refuse_reserved(update_id, used)
                db.execute("INSERT OR IGNORE INTO reserved VALUES (?, ?)", (seed_key, update_id))
                (owner,) = db.execute("SELECT update_id FROM reserved WHERE seed = ?", (seed_key,)).fetchone()
                _refuse_taken(update_id, owner)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._connection.close()


def _is_retry(stored_digest: bytes | None, step_id: str, request_digest: bytes) -> bool:
    if stored_digest is None:
        return False
    if stored_digest != request_digest:
        raise ReplayedContribution(f"step id {step_id!r} was already used for a different request")
    return True


def _refuse_used(step_id: str, clashes: Sequence[tuple[str, str]]) -> None:
    if clashes:
        key, earlier = clashes[0]
        raise ReplayedContribution(
            f"{len(clashes)} contribution(s) of step {step_id!r} were used before, e.g. {key} by step {earlier!r}"
        )


def _refuse_reserved(update_id: str, used: Sequence[tuple[str, str]]) -> None:
    if used:
        key, step = used[0]
        what = "its update id" if key.startswith("id:") else "its seed"
        raise ReplayedContribution(f"update {update_id!r}: {what} was used by step {step!r}")


def _refuse_taken(update_id: str, owner: str) -> None:
    if owner != update_id:
        raise ReplayedContribution(f"update {update_id!r} reuses the seed of update {owner!r}")
