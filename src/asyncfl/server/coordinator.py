"""The coordinator role: task configuration, the concurrency limit, leases and timers.

It implements the scheduling policies' `Runtime` protocol over real time, so the same
AsyncPolicy / SyncPolicy objects the simulator drives decide here when slots open, when a round
closes and what happens to stragglers. A slot opened by `request_clients` becomes a *lease*
when a client checks in; the lease ends with an upload, an expiry (the client vanished: the
policy sees `on_lost` and frees the slot) or a cancellation (the round closed without it).

Deadlines run on a monotonic clock, so setting the wall clock neither expires nor extends a
lease; they are stored as wall-clock times (a monotonic clock restarts with the process) and
converted back on restore, so a lease keeps the time it had left, less the downtime.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncfl.algorithms.seeds import trip_seed
from asyncfl.algorithms.types import ClientUpdate, Verdict
from asyncfl.server.aggregation import AggregationRole
from asyncfl.server.errors import ApiError
from asyncfl.server.store import Store

ACTIVE, DONE, EXPIRED, CANCELLED = "active", "done", "expired", "cancelled"


@dataclass
class Lease:
    """One client trip: the model version it started from, its training seed, its deadline."""

    lease_id: str
    client: str
    base_version: int
    seed: int
    issued_at: float
    expires_at: float
    state: str = ACTIVE
    upload_seq: int | None = None  # the update log's number of the upload that ended it
    upload_norm: float | None = None  # that upload's L2 norm (for the norm guard)
    reported: bool = False  # handed to the policy's on_report (which counted it, whatever happened next)


def _sql_seed(seed: int) -> int:
    """A uint64 seed as SQLite's signed 64-bit INTEGER (two's complement); `_seed_of` undoes it."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _seed_of(stored: int) -> int:
    return stored & ((1 << 64) - 1)


def no_lease(lease_id: str, client: str) -> ApiError:
    return ApiError(409, "no_lease", f"lease {lease_id!r} was not issued to client {client!r}; check in first")


def base_mismatch(sent: int, lease_id: str, base_version: int) -> ApiError:
    return ApiError(
        409, "base_mismatch", f"base_version {sent} does not match lease {lease_id}'s version {base_version}"
    )


def lease_ended(state: str) -> ApiError:
    """The 409 for an upload against a lease that is no longer active, naming why."""
    reason = {
        EXPIRED: (
            "lease_expired",
            "lease expired before the upload arrived; the slot went to another client and the update is not counted",
        ),
        CANCELLED: ("lease_cancelled", "the round this lease belonged to has closed; the update is not counted"),
        DONE: (
            "lease_used",
            "this lease already delivered an update (re-send with the same idempotency key to get its result)",
        ),
    }.get(state, ("no_lease", f"lease state {state}"))
    return ApiError(409, *reason)


class Coordinator:
    def __init__(
        self,
        policy: Any,
        aggregation: AggregationRole,
        lease_timeout: float,
        seed: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.policy, self.aggregation = policy, aggregation
        self.lease_timeout, self.seed, self.clock, self.wall = lease_timeout, seed, clock, wall
        self.leases: dict[str, Lease] = {}  # active only
        self.by_client: dict[str, str] = {}
        self.open_slots = 0
        self.timers: list[tuple[float, int, Any]] = []
        self._timer_seq = itertools.count()
        self.issued = 0
        self.ended = {DONE: 0, EXPIRED: 0, CANCELLED: 0}
        self._dirty: dict[str, Lease] = {}
        self.recent: collections.OrderedDict[str, Lease] = collections.OrderedDict()  # ended leases

    # ---- Runtime protocol -------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self.leases) + self.open_slots

    def request_clients(self, n: int) -> int:
        """Open n slots; check-ins claim them. Never fewer than asked, so no WAKE is needed."""
        n = max(0, n)
        self.open_slots += n
        return n

    def submit(self, trip: Lease, update: ClientUpdate) -> Verdict:
        return self.aggregation.fold(update, trip.upload_seq, trip.upload_norm)

    def flush(self) -> bool:
        return self.aggregation.flush()

    def cancel_in_flight(self) -> None:
        for lease in list(self.leases.values()):
            self._end(lease, CANCELLED)
        self.open_slots = 0

    def expect_reports(self, n: int) -> None:
        """Real devices train on their own time: there is nothing to leave undone here."""

    def collect_partial(self, limit: int) -> list[tuple[Lease, ClientUpdate]]:
        """A server cannot pull work from devices: clients are told the round deadline at
        check-in and send the steps they managed before it (see client runtime)."""
        return []

    def set_timer(self, delay: float, payload: Any) -> None:
        heapq.heappush(self.timers, (self.clock() + delay, next(self._timer_seq), payload))

    # ---- leases -----------------------------------------------------------------------
    def claim(self, client: str) -> Lease | None:
        """The client's live lease, or a new one on a free slot, or None (not needed now)."""
        held = self.by_client.get(client)
        if held is not None:
            return self.leases[held]
        if self.open_slots <= 0:
            return None
        self.open_slots -= 1
        self.issued += 1
        now = self.clock()
        seed = int(trip_seed(self.seed, self.issued - 1)[0])  # trip numbers count from 0, as in the simulator
        lease = Lease(
            f"L{self.issued}-{secrets.token_hex(6)}",
            client,
            self.aggregation.state.version,
            seed,
            now,
            now + self.lease_timeout,
        )
        self.leases[lease.lease_id] = lease
        self.by_client[client] = lease.lease_id
        self._dirty[lease.lease_id] = lease
        return lease

    def round_deadline(self) -> float | None:
        """Seconds until the open round's deadline; None without one."""
        due = [t for t, _, p in self.timers if self.policy.is_deadline(p)]
        return min(due) - self.clock() if due else None

    def active_lease(self, lease_id: str, client: str, store: Store) -> Lease:
        """The live lease an upload answers, or 409 naming why there is none (the lease rule)."""
        lease = self.leases.get(lease_id) or self.recent.get(lease_id)
        if lease is not None and lease.client == client:
            if lease.state == ACTIVE:
                return lease
            state = lease.state
        else:
            rows = (
                []
                if lease is not None
                else store.query("SELECT client, state FROM leases WHERE lease_id=?", (lease_id,))
            )
            if not rows or rows[0][0] != client:
                raise no_lease(lease_id, client)
            state = rows[0][1]
        raise lease_ended(state)

    def extend(self, lease: Lease, seconds: float) -> None:
        """Keep a live lease at least `seconds` more (a secure-aggregation round holds its
        participants through its phases, whose own deadlines decide who dropped)."""
        until = self.clock() + seconds
        if lease.state == ACTIVE and lease.expires_at < until:
            lease.expires_at = until
            self._dirty[lease.lease_id] = lease

    def close(self, lease: Lease, counted: bool) -> None:
        """End a live lease without an upload of its own: a secure round's survivor (its work
        counted: done) or a participant that dropped out of the round (cancelled)."""
        if lease.state == ACTIVE:
            self._end(lease, DONE if counted else CANCELLED)

    def report(self, lease: Lease, update: ClientUpdate, seq: int, norm: float | None = None) -> Verdict | None:
        """Upload number `seq` against a live lease: the trip ends, the policy folds it in.
        Returns its verdict; None when the policy did not submit it. `norm` is the update's L2
        norm, for the norm guard."""
        lease.upload_seq, lease.upload_norm, lease.reported = seq, norm, True
        self._end(lease, DONE)
        return self.policy.on_report(self, lease, update)

    def release(self, lease: Lease, seq: int) -> None:
        """Upload number `seq` against a live lease was refused (before or while folding it
        in): the trip ends all the same and the policy hears of the refused report, so its slot
        reopens (and a synchronous round counts it, as the simulator counts a refused update)."""
        if lease.state == ACTIVE:
            lease.upload_seq = seq
            self._end(lease, DONE)
        (self.policy.on_lost if lease.reported else self.policy.on_refused)(self, lease)

    def _end(self, lease: Lease, state: str) -> None:
        lease.state = state
        self.leases.pop(lease.lease_id, None)
        if self.by_client.get(lease.client) == lease.lease_id:
            del self.by_client[lease.client]
        self.ended[state] += 1
        self._dirty[lease.lease_id] = lease
        self.recent[lease.lease_id] = lease
        if len(self.recent) > 10_000:
            self.recent.popitem(last=False)

    def tick(self) -> bool:
        """Expire vanished clients' leases and fire due timers; True if anything changed."""
        now, changed = self.clock(), False
        for lease in [lease for lease in self.leases.values() if lease.expires_at <= now]:
            if lease.state == ACTIVE and lease.lease_id in self.leases:
                self._end(lease, EXPIRED)
                self.policy.on_lost(self, lease)
                changed = True
        return self.fire_due_timers() or changed

    def fire_due_timers(self) -> bool:
        """The policy's timers now due (a round's deadline); True if any fired. Called at each
        check-in too, so a lease is never given in a round whose deadline has passed while the
        background tick has not come round yet."""
        now, fired = self.clock(), False
        while self.timers and self.timers[0][0] <= now:
            _, _, payload = heapq.heappop(self.timers)
            self.policy.on_timer(self, payload)
            fired = True
        return fired

    def needed_versions(self) -> set[int]:
        return {lease.base_version for lease in self.leases.values()} | {self.aggregation.state.version}

    # ---- durability -------------------------------------------------------------------
    def _offset(self) -> float:
        """Wall-clock time minus clock time, now."""
        return self.wall() - self.clock()

    def snapshot(self) -> dict:
        """Under the state lock: changed leases and the policy's state, as plain data, with
        wall-clock deadlines."""
        offset = self._offset()
        leases = [
            (
                lease.lease_id,
                lease.client,
                lease.base_version,
                _sql_seed(lease.seed),
                lease.issued_at + offset,
                lease.expires_at + offset,
                lease.state,
            )
            for lease in self._dirty.values()
        ]
        self._dirty = {}
        return {
            "leases": leases,
            "meta": {
                "open_slots": self.open_slots,
                "issued": self.issued,
                "ended": dict(self.ended),
                "timers": [[t + offset, p] for t, _, p in sorted(self.timers)],
                "policy": self.policy.state_dict(),
            },
        }

    @staticmethod
    def persist(snap: dict, db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO leases(lease_id, client, base_version, seed, issued_at, expires_at, "
            "state) VALUES(?, ?, ?, ?, ?, ?, ?)",
            snap["leases"],
        )
        Store.put_meta(db, "coordinator", snap["meta"])

    def restore(self, store: Store) -> None:
        saved = store.get_meta("coordinator")
        offset = self._offset()
        self.open_slots, self.issued, self.ended = saved["open_slots"], saved["issued"], saved["ended"]
        self.timers = [(t - offset, next(self._timer_seq), p) for t, p in saved["timers"]]
        heapq.heapify(self.timers)
        self.policy.load_state_dict(saved["policy"])
        self.leases, self.by_client, self.recent = {}, {}, collections.OrderedDict()
        for row in store.query(
            "SELECT lease_id, client, base_version, seed, issued_at, expires_at, state FROM leases WHERE state=?",
            (ACTIVE,),
        ):
            lease = Lease(*row)
            lease.seed = _seed_of(lease.seed)
            lease.issued_at, lease.expires_at = lease.issued_at - offset, lease.expires_at - offset
            self.leases[lease.lease_id] = lease
            self.by_client[lease.client] = lease.lease_id
        self._dirty = {}
