"""Durable server state: one SQLite database (WAL mode, synchronous=FULL) plus immutable files.

Everything an acknowledgement promises changes in one SQLite transaction per event: the update
log (with idempotency keys), the version history, leases, the policy's state, and pointers to
the large tensors (the buffered aggregator's running sum, the model versions still needed).
Those tensors go to files first, each under a fresh name and fsynced, so the transaction that
references them commits only after they are on disk; files no commit references are deleted.
The server answers a client only after the commit, so an acknowledged update survives any
crash, and a restart reads back exactly the state the last commit wrote. (Large blobs inside
SQLite cost ~6x more per update than a plain file write: WAL plus checkpoint copies.) Files are
created readable by the server's user only (0600, directories 0700), whatever the umask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs(name TEXT PRIMARY KEY, file TEXT NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models(version INTEGER PRIMARY KEY, file TEXT NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions(version INTEGER PRIMARY KEY, created_at REAL NOT NULL,
    updates TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS updates(seq INTEGER PRIMARY KEY, client TEXT NOT NULL, idem_key TEXT NOT NULL,
    lease_id TEXT NOT NULL, base_version INTEGER NOT NULL, version_at_submit INTEGER NOT NULL,
    staleness INTEGER NOT NULL, n_examples INTEGER NOT NULL, steps INTEGER NOT NULL, loss REAL,
    norm REAL NOT NULL, verdict TEXT NOT NULL, applied_version INTEGER, received_at REAL NOT NULL,
    status INTEGER NOT NULL, response TEXT NOT NULL, UNIQUE(client, idem_key));
CREATE TABLE IF NOT EXISTS leases(lease_id TEXT PRIMARY KEY, client TEXT NOT NULL, base_version INTEGER NOT NULL,
    seed INTEGER NOT NULL, issued_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS leases_state ON leases(state);
CREATE TABLE IF NOT EXISTS evals(id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, version INTEGER NOT NULL,
    accuracy REAL NOT NULL, loss REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(hash TEXT PRIMARY KEY, client TEXT NOT NULL, task TEXT NOT NULL,
    created_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
"""

DB_NAME = "state.db"
# a state dir holds the model, every update's metadata and the token hashes: this user's only
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700
log = logging.getLogger("asyncfl.server")


_PACK_MAGIC = b"AFS1"


def tensor_bytes(obj: Any) -> bytes:
    """Pack a tree of dicts/lists/scalars/tensors (a state_dict) as JSON plus raw tensor bytes:
    several times faster than torch.save for the multi-megabyte tensors written per update."""
    blobs: list[bytes] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            a = x.detach().cpu().contiguous().numpy()
            blobs.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
            return {"__tensor__": len(blobs) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}
        if isinstance(x, dict):
            return {"__dict__": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot persist {type(x).__name__}")

    head = json.dumps(walk(obj)).encode()
    sizes = json.dumps([len(b) for b in blobs]).encode()
    return b"".join(
        [_PACK_MAGIC, len(head).to_bytes(4, "little"), head, len(sizes).to_bytes(4, "little"), sizes, *blobs]
    )


def tensor_load(data: bytes) -> Any:
    if data[:4] != _PACK_MAGIC:
        raise OSError("not a packed state file")
    view = memoryview(data)
    n = int.from_bytes(view[4:8], "little")
    head = json.loads(bytes(view[8 : 8 + n]))
    pos = 8 + n
    m = int.from_bytes(view[pos : pos + 4], "little")
    sizes = json.loads(bytes(view[pos + 4 : pos + 4 + m]))
    pos += 4 + m
    offsets = [pos + sum(sizes[:i]) for i in range(len(sizes))]

    def walk(x):
        if isinstance(x, dict) and "__tensor__" in x:
            i = x["__tensor__"]
            dt = np.dtype(x["dtype"]).newbyteorder("<")
            a = np.frombuffer(view, dtype=dt, count=sizes[i] // dt.itemsize, offset=offsets[i]).reshape(x["shape"])
            return torch.from_numpy(a.astype(dt.newbyteorder("="), copy=True))
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(head)


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write-to-temp, fsync, rename, fsync the directory: readers see old or new, never half.
    The file is readable by this user only, like everything in a state dir."""
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restrict(paths: list[Path], mode: int) -> None:
    """Take group and other permissions off existing paths (a state dir an older server wrote)."""
    for path in paths:
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, mode)
        except FileNotFoundError:
            pass
        except PermissionError:
            log.warning("%s is not this user's: could not make it private (mode %o)", path, mode)


class Store:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.path = self.dir / DB_NAME
        self.files = self.dir / "tensors"
        for d in (self.dir, self.files):
            d.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        _restrict([self.dir, self.files], PRIVATE_DIR)
        # SQLite gives the WAL and shared-memory files the database file's mode
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
        ours = [self.dir / name for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", "model.afl")]
        _restrict([*ours, *self.files.iterdir()], PRIVATE_FILE)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_token_roles()
        self.lock = threading.Lock()
        # readers get their own connection: in WAL mode they see the last commit without
        # waiting for a commit in progress (its fsync) to finish
        self.reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self.reader_lock = threading.Lock()
        self._file_seq = 0

    def close(self) -> None:
        with self.lock, self.reader_lock:
            self.db.close()
            self.reader.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back on any error. Returns after the fsync."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # ---- immutable tensor files ------------------------------------------------------------
    @staticmethod
    def _write_durably(path: Path, data: bytes, flags: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, PRIVATE_FILE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self) -> None:
        """Makes new directory entries (new files) durable."""
        fd = os.open(self.files, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_files(self, items: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
        """Write each (kind, data) to a new file, fsync them and the directory; (name, crc32)."""
        out = []
        for kind, data in items:
            self._file_seq += 1
            name = f"{kind}-{time.time_ns()}-{self._file_seq}.bin"
            self._write_durably(self.files / name, data, os.O_EXCL)
            out.append((name, zlib.crc32(data)))
        if items:
            self._fsync_dir()
        return out

    def write_slot(self, name: str, data: bytes) -> tuple[str, int]:
        """Overwrite a file that no committed row references (one of an A/B pair), fsync it; the
        commit that follows switches the pointer. No new directory entry, so no directory fsync
        (except the first time) and nothing to delete afterwards."""
        path = self.files / name
        existed = path.exists()
        self._write_durably(path, data, os.O_TRUNC)
        if not existed:
            self._fsync_dir()
        return name, zlib.crc32(data)

    def read_file(self, name: str, crc: int) -> bytes:
        data = (self.files / name).read_bytes()
        if zlib.crc32(data) != crc:
            raise OSError(f"{self.files / name}: checksum mismatch (corrupt state file)")
        return data

    def remove_files(self, names) -> None:
        for name in names:
            try:
                (self.files / name).unlink()
            except FileNotFoundError:
                pass

    def sweep(self) -> None:
        """Delete files no committed row references (left by a crash before a commit)."""
        used = {f for (f,) in self.query("SELECT file FROM blobs UNION SELECT file FROM models")}
        self.remove_files(p.name for p in self.files.iterdir() if p.name not in used and not p.name.startswith("slot-"))

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """A read of the last committed state; never waits for a commit in progress."""
        with self.reader_lock:
            return self.reader.execute(sql, args).fetchall()

    # ---- meta -------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    @staticmethod
    def put_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, json.dumps(value)))

    # ---- tokens -----------------------------------------------------------------------
    def _add_token_roles(self) -> None:
        """Tokens carry a role (client or operator); state dirs from before roles hold clients only."""
        if "role" not in {row[1] for row in self.db.execute("PRAGMA table_info(tokens)")}:
            self.db.execute("ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'client'")

    def create_token(self, token: str, client: str, task: str, role: str = "client") -> None:
        self.create_tokens([(token, client)], task, role)

    def create_tokens(self, entries: list[tuple[str, str]], task: str, role: str = "client") -> None:
        """(token, client) pairs in one transaction: one fsync for a whole fleet's tokens."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO tokens(hash, client, task, created_at, role) VALUES(?, ?, ?, ?, ?)",
                [(hash_token(token), client, task, now, role) for token, client in entries],
            )

    def lookup_token(self, token: str, role: str = "client") -> tuple[str, str] | None:
        """(name, task) of a live token of that role, or None. Read on every request (an indexed
        read of the last commit), so a revocation holds from the next request on."""
        rows = self.query(
            "SELECT client, task FROM tokens WHERE hash=? AND revoked=0 AND role=?", (hash_token(token), role)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def revoke_client(self, client: str) -> int:
        with self.transaction() as db:
            return db.execute("UPDATE tokens SET revoked=1 WHERE client=? AND revoked=0", (client,)).rowcount

    def list_tokens(self) -> list[tuple]:
        return self.query("SELECT client, task, created_at, revoked, role FROM tokens ORDER BY created_at")
