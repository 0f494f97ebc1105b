"""The selector role of a cluster: check-ins, task descriptions and model downloads for every
task in the database, with the single process's answers (server/selector.py), so `asyncfl
client` works unchanged against any selector. Selectors keep no state a client depends on: any
of them answers any request.

The hot path, a check-in answered "retry", touches no database: client tokens are signed and
checked in memory (tokens.py; random ones of older mints are cached for a few seconds), and a
background thread refreshes every REFRESH_S each task's version and state, the free slots the
coordinator granted this selector, the active leases and the token revocations (from change
feeds, resynchronised in full every RESYNC_S since sequence numbers may commit out of order).
Only a check-in that can get a slot claims one, batched with the claims of that moment
(claims.py). Uploads go through `upload_commit.UploadCommitter`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from asyncfl.algorithms.seeds import trip_seed
from asyncfl.cluster import members
from asyncfl.cluster.async_pool import AsyncPool
from asyncfl.cluster.claims import ClaimBatcher
from asyncfl.cluster.members import DEFAULT_TIMING
from asyncfl.cluster.pgpool import Pool
from asyncfl.cluster.served_task import ServedTask
from asyncfl.cluster.tokens import InMemory, TokenCache
from asyncfl.cluster.upload_commit import UploadCommitter
from asyncfl.config import ServerConfig
from asyncfl.server.auth import CLIENT, Authenticator, RateLimiter, admit, bearer
from asyncfl.server.errors import ApiError
from asyncfl.server.selector import retry_answer, train_answer

log = logging.getLogger("asyncfl.cluster")
REFRESH_S = 0.15
RESYNC_S = 2.0


@dataclass
class TaskView:
    """What this selector knows of a task between refreshes."""

    version: int
    state: str
    issued: int
    free: int = 0  # slots granted to this selector and free
    claiming: int = 0  # of them, set aside for check-ins on their way to claim one
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    report: str | None = None  # the aggregator's, as of its newest step (JSON)


@dataclass
class Reservation:
    """A free slot of `view` set aside for one check-in on its way to claim it."""

    view: TaskView
    ended: bool = False


class Selector:
    def __init__(self, url: str, settings: ServerConfig | None = None, member_id: str | None = None, pool_size=8):
        self.settings = settings or ServerConfig()
        self.pool = Pool(url, pool_size)
        self.id = member_id or members.member_id("selector")
        self.claims = ClaimBatcher(AsyncPool(url), self.id)
        self.address: str | None = None
        self.tokens = TokenCache(self.pool)
        self.auth = Authenticator(self.tokens, None)
        self._auth_in_memory = Authenticator(InMemory(self.tokens), None)
        self.limiter = RateLimiter(self.settings.rate_per_s, self.settings.rate_burst)
        self.anonymous = RateLimiter(self.settings.anonymous_rate_per_s, self.settings.anonymous_burst, "address")
        self.lock = threading.Lock()
        self.views: dict[str, TaskView] = {}
        self.leases: dict[tuple[str, str], str] = {}  # (task, client) -> active lease id
        self.rejected: collections.Counter[tuple[str, str]] = collections.Counter()  # (task, code)
        self._served: dict[str, ServedTask] = {}
        self._building, self._refreshing = threading.Lock(), threading.Lock()
        self._cursor, self._resynced, self._beat = 0, 0.0, 0.0
        self.commits = UploadCommitter(self)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- background -------------------------------------------------------------------
    def start(self) -> None:
        self.refresh()
        self.commits.start()
        self._thread = threading.Thread(target=self._loop, name="asyncfl-selector-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.commits.stop()
        try:
            with self.pool.connection() as conn:
                members.leave(conn, self.id)
        except ApiError:
            pass  # the coordinator notices the missing heartbeat instead
        self.pool.close()

    def _loop(self) -> None:
        failing = False  # logged once per outage, not every refresh
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh()
            except ApiError as err:
                if not failing:
                    log.warning("selector refresh: %s", err.detail)
                failing = True
                continue
            except Exception:
                log.exception("selector refresh failed")
                continue
            if failing:
                log.warning("selector refresh: the database is reachable again")
            failing = False

    def refresh(self) -> None:
        """Heartbeat, tasks, this selector's free slots and the lease feed, in one connection;
        one refresh at a time, so an older read never overwrites a newer one."""
        with self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        resync = now - self._resynced >= RESYNC_S
        with self.pool.connection() as conn:
            if now - self._beat >= DEFAULT_TIMING.heartbeat_s:
                members.heartbeat(conn, self.id, "selector", self.address, {"tasks": len(self.views)})
                self._beat = now
            tasks = conn.execute(
                "SELECT t.task, t.version, t.state, t.issued, a.report FROM tasks t "
                "LEFT JOIN aggregator_state a ON a.task = t.task"
            ).fetchall()
            free = dict(
                conn.execute(
                    "SELECT task, count(*) FROM slots WHERE selector=%s AND lease_id IS NULL GROUP BY task", (self.id,)
                ).fetchall()
            )
            where, args = ("state='active'", ()) if resync else ("change > %s", (self._cursor,))
            changes = conn.execute(
                f"SELECT task, client, lease_id, state, change FROM leases WHERE {where} ORDER BY change", args
            ).fetchall()
            self.tokens.follow(conn, resync)
        with self.lock:
            for name, version, state, issued, report in tasks:
                view = self.views.get(name)
                if view is None:
                    self.views[name] = TaskView(version, state, issued, free.get(name, 0), report=report)
                else:
                    view.version, view.state, view.issued, view.free = version, state, issued, free.get(name, 0)
                    view.report = report
            for gone in set(self.views) - {t[0] for t in tasks}:
                del self.views[gone]
            if resync:
                self.leases = {}
                self._resynced = now
            for task, client, lease_id, state, change in changes:
                if state == "active":
                    self.leases[(task, client)] = lease_id
                elif self.leases.get((task, client)) == lease_id:
                    del self.leases[(task, client)]
                self._cursor = max(self._cursor, change)

    # ---- tasks ------------------------------------------------------------------------
    def served(self, task: str) -> ServedTask:
        """The task's judge of uploads and its description, built on first use."""
        found = self._served.get(task)
        if found is not None:
            return found
        with self._building:
            if task not in self._served:
                with self.pool.connection() as conn:
                    row = conn.execute("SELECT config, run FROM tasks WHERE task=%s", (task,)).fetchone()
                if row is None:
                    raise ApiError(403, "forbidden", f"token belongs to task {task!r}, which this cluster does not run")
                self._served[task] = ServedTask(task, row[0], row[1])
            return self._served[task]

    def view(self, task: str) -> TaskView:
        with self.lock:
            found = self.views.get(task)
        if found is None:
            self.served(task)  # 403 for a task the database does not hold
            self.refresh()
            with self.lock:
                found = self.views.get(task)
            if found is None:
                raise ApiError(403, "forbidden", f"token belongs to task {task!r}, which this cluster does not run")
        return found

    # ---- requests ---------------------------------------------------------------------
    def authenticate(self, authorization: str | None, address: str, in_memory: bool = False) -> tuple[str, str]:
        """(client, task) behind a request's client token, within the rate limits; `in_memory`:
        NeedsDatabase rather than a lookup."""
        auth = self._auth_in_memory if in_memory else self.auth
        try:
            return admit(
                lambda: auth.lookup(bearer(authorization), CLIENT),
                address,
                self.anonymous,
                self.limiter,
                lambda found: found[0],
            )
        except ApiError as err:
            self.reject("", err)
            raise

    def reject(self, task: str, err: ApiError) -> None:
        with self.lock:
            self.rejected[(task, err.code)] += 1

    def checkin_from_memory(
        self, client: str, task: str, eligible: bool = True
    ) -> tuple[dict | None, Reservation | None]:
        """(answer, None) where memory decides ("retry", "stop"): no database round trip.
        (None, reservation) where the answer needs the database (a claim, or a lease to
        confirm): one of the view's free slots is set aside for this check-in until `checkin`
        or `release` ends it, so that when a refresh shows a few free slots only that many
        check-ins go to claim them, not every one in flight. (None, None) for a task memory
        does not know yet: `know` it first."""
        with self.lock:
            served, view = self._served.get(task), self.views.get(task)
            if served is None or view is None:
                return None, None
            answer = self._decide(served, view, task, client, eligible)
            if answer is None:
                view.claiming += 1
                return None, Reservation(view)
            view.counts[f"checkin_{answer['action']}"] += 1
        return answer, None

    def release(self, reserved: Reservation | None) -> None:
        """End a reservation (once: later calls do nothing)."""
        if reserved is None:
            return
        with self.lock:
            if not reserved.ended:
                reserved.ended = True
                reserved.view.claiming -= 1

    def know(self, task: str) -> None:
        """Build what memory needs to answer the task's check-ins (its judge, its view); 403 for
        a task the database does not hold. Off the event loop: it may query and load the data."""
        self.served(task)
        self.view(task)

    async def checkin(self, client: str, task: str, eligible: bool, reserved: Reservation) -> dict:
        """A client with an active lease gets it back; a new lease only on a slot this selector
        holds; "retry" otherwise. `reserved`: the slot `checkin_from_memory` set aside for it,
        released here. The claim is awaited on the event loop, sent in a batch (claims.py)."""
        served, view = self._served[task], reserved.view
        try:
            with self.lock:
                answer = self._decide(served, view, task, client, eligible, not reserved.ended)
            if answer is None:  # a lease known from the feed is confirmed: its upload may have reached another selector
                row = await self.claims.claim(task, client, served.max_trips, served.settings.lease_timeout)
                answer = self._claimed(row, client, task, served, view)
        finally:
            self.release(reserved)
        self.count(view, f"checkin_{answer['action']}")
        return answer

    def _decide(
        self, served: ServedTask, view: TaskView, task: str, client: str, eligible: bool, reserved: bool = False
    ) -> dict | None:
        """Under self.lock: "stop" or "retry" when the view decides, None when the database must."""
        if view.state == "done" or (served.max_trips is not None and view.issued >= served.max_trips):
            return {"action": "stop", "reason": "the run has finished"}
        unreserved = view.free - view.claiming + (1 if reserved else 0)
        if not eligible or ((task, client) not in self.leases and unreserved <= 0):
            return retry_answer(served.settings.retry_after, eligible)
        return None

    def count(self, view: TaskView, what: str, n: int = 1) -> None:
        with self.lock:
            view.counts[what] += n

    def _claimed(self, row: tuple, client: str, task: str, served: ServedTask, view: TaskView) -> dict:
        """The answer to a claim's outcome, and what memory learns from it."""
        outcome, lease_id, version, trip, expires_s, free_now = row
        retry_after = served.settings.retry_after
        if outcome == "expiring":
            return retry_answer(retry_after, True)
        if outcome == "stop":  # the next refresh shows it
            return {"action": "stop", "reason": "the run has finished"}
        with self.lock:
            if outcome == "full":  # no lease for this client and none of ours free now
                view.free = free_now
                self.leases.pop((task, client), None)
            else:
                if outcome == "leased":
                    view.free -= 1
                    view.issued = max(view.issued, trip)
                self.leases[(task, client)] = lease_id
        if outcome == "full":
            return retry_answer(retry_after, True)
        seed = int(trip_seed(served.cfg.seed, trip - 1)[0])  # trips count from 0, as in the simulator
        return train_answer(lease_id, version, seed, expires_s)

    def lease_ended(self, task: str, client: str, lease_id: str) -> None:
        with self.lock:
            if self.leases.get((task, client)) == lease_id:
                del self.leases[(task, client)]

    def task_info(self, task: str) -> dict:
        return self.served(task).info

    def served_from_memory(self, task: str) -> ServedTask | None:
        """The task's judge when built already (`served` builds it, off the event loop)."""
        return self._served.get(task)

    def frame_from_memory(self, task: str, version: int) -> bytes | None:
        """A version's frame when memory holds it, as it does for every download but the first
        of each version; None: `model_frame` builds it, off the event loop."""
        served = self.served_from_memory(task)
        with self.lock:
            view = self.views.get(task)
        frame = None if served is None or view is None else served.cached_frame(version)
        if frame is not None:
            self._downloaded(view, frame)
        return frame

    def model_frame(self, task: str, version: int) -> bytes:
        def load(v: int) -> bytes | None:
            with self.pool.connection() as conn:
                row = conn.execute("SELECT weights FROM versions WHERE task=%s AND version=%s", (task, v)).fetchone()
            return None if row is None else row[0]

        frame = self.served(task).frame(version, load)
        self._downloaded(self.view(task), frame)
        return frame

    def _downloaded(self, view: TaskView, frame: bytes) -> None:
        with self.lock:
            view.counts["downloads"] += 1
            view.counts["download_bytes"] += len(frame)

    def upload(self, client: str, task: str, body: bytes) -> tuple[int, dict]:
        try:
            return self.commits.upload(client, task, body)
        except ApiError as err:
            self.reject(task, err)
            raise
