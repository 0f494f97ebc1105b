"""Group commit: when an answer may leave the server.

An event changes memory under the state lock and notes the *epoch* its change belongs to;
`sync` then snapshots every role's changes (as bytes, under the lock), writes them in one store
transaction outside the lock, and only then lets the request answer. Events that arrive while
a commit is on disk share the next one, so fsyncs are paid per group, not per event, and an
answer still never runs ahead of the disk. A failed commit rolls every part back to the last
durable state: the epochs after the last durable one are lost for good, so their requests are
answered 503 (and the clients re-send) even once a later commit succeeds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from asyncfl.server.aggregation import AggregationRole
from asyncfl.server.coordinator import Coordinator
from asyncfl.server.errors import ApiError
from asyncfl.server.shared import Shared
from asyncfl.server.store import Store

log = logging.getLogger("asyncfl.server")

# the layout of a state dir's meta and tables; a dir written in another layout is refused
STATE_FORMAT = 2


def storage_error() -> ApiError:
    return ApiError(
        503, "storage_error", "the server could not make the change durable; retry later", {"Retry-After": "1"}
    )


class GroupCommit:
    def __init__(self, shared: Shared, rollback: Callable[[], None]):
        """`rollback` reloads every part from the last durable state (after a failed commit)."""
        self.shared, self.rollback = shared, rollback
        self._commit_lock = threading.Lock()
        self.epoch = 1  # changes made now are durable once epoch `epoch` is committed
        self._durable = 0  # every epoch up to this one is committed, or lost
        self.durable_version = 0  # what /status shows: a step is public once it survives a crash
        # epochs a failed commit rolled back, as ranges (after, upto]: one per run of failures
        # between two successful commits, so a few integers per disk incident
        self._lost: list[tuple[int, int]] = []
        self.rows: list[tuple] = []  # update-log rows of the coming commit
        self.initial: str | None = None  # the fingerprint a fresh state dir gets with its first commit
        self.obsolete_files: list[str] = []

    def reset(self) -> None:
        """After a restore: nothing pending, the restored version is the durable one."""
        self.rows = []
        self.durable_version = self.shared.aggregation.state.version

    def take_obsolete(self) -> list[str]:
        """Under the state lock: files no commit points to any more, to remove."""
        obsolete, self.obsolete_files = self.obsolete_files, []
        return obsolete

    def _rolled_back(self, epoch: int) -> bool:
        """Whether a failed commit rolled `epoch`'s changes back."""
        return any(after < epoch <= upto for after, upto in self._lost)

    def _lose_through(self, epoch: int) -> None:
        """Every epoch after the last durable one, up to `epoch`, was rolled back."""
        if self._lost and self._lost[-1][0] == self._durable:
            self._lost[-1] = (self._durable, epoch)
        else:
            self._lost.append((self._durable, epoch))

    def sync(self, epoch: int) -> None:
        """Return once the changes of `epoch` are durable (committing them, and whatever else
        is pending, if no one has yet); 503 if a failed commit rolled them back."""
        sh = self.shared
        with self._commit_lock:
            if self._rolled_back(epoch):  # before "durable": a later commit does not bring it back
                raise storage_error()
            if self._durable >= epoch:
                return
            with sh.lock:
                sh.aggregation.prune(sh.coordinator.needed_versions())
                rows, self.rows = self.rows, []
                agg, coord = sh.aggregation.snapshot(), sh.coordinator.snapshot()
                version = sh.aggregation.state.version
                rejected, initial, traffic = dict(sh.counters.rejected), self.initial, dict(sh.counters.traffic)
                target, self.epoch = self.epoch, self.epoch + 1
            new_files: list[str] = []
            try:
                with sh.store.transaction() as db:
                    db.executemany(
                        "INSERT INTO updates(seq, client, idem_key, lease_id, base_version, "
                        "version_at_submit, staleness, n_examples, steps, loss, norm, verdict, received_at, "
                        "status, response) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    obsolete = AggregationRole.persist(agg, db, sh.store, new_files)
                    Coordinator.persist(coord, db)
                    Store.put_meta(db, "rejected", rejected)
                    Store.put_meta(db, "traffic", traffic)
                    if initial is not None:
                        Store.put_meta(db, "fingerprint", initial)
                        Store.put_meta(db, "state_format", STATE_FORMAT)
            except Exception:
                log.exception("commit failed; rolling back to the last durable state")
                sh.store.remove_files(new_files)
                with sh.lock:
                    self._lose_through(self.epoch)  # changes made while the commit ran are gone too
                    self.epoch += 1
                    self.rollback()
                raise storage_error() from None
            self._durable = target
            with sh.lock:
                self.durable_version = max(self.durable_version, version)
                self.initial = None
                self.obsolete_files += obsolete
