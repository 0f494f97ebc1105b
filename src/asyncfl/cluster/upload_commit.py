"""Uploads at a selector: judged here, acknowledged only once PostgreSQL holds them.

An upload is checked as the single process checks it (frame, tensors, values, reported bounds,
norm guard, lease rule, staleness against the version known now; a masked one's sealed seed by
the TSA, 503 while the TSA cannot be asked) without holding anything; the
uploads that pass, and the refusals that end a lease, then wait for a group commit: every
BATCH_WAIT_S or BATCH_MAX uploads, one transaction claims each upload's lease (active -> done:
the claim decides between selectors that received the same upload), logs it (updates, unique
per task, client and idempotency key), writes the accepted updates' partial sums for the
tasks' aggregators (`partials`), and hands the freed slots back to this selector. Clients hear
their answer only after that commit; an upload whose lease another selector claimed first gets
that selector's answer. When the commit fails (PostgreSQL down) every upload of it gets 503
with Retry-After and none is acknowledged. At most QUEUE_MAX uploads wait: beyond, 503.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from psycopg.types.json import Jsonb

from asyncfl.cluster.partials import Partial, empty, encode_partial
from asyncfl.cluster.pgpool import unavailable
from asyncfl.cluster.served_task import ServedTask
from asyncfl.cluster.tasks import tsa_buffer_terms
from asyncfl.secagg import MaskedBuffer
from asyncfl.server.aggregation import Checked
from asyncfl.server.coordinator import EXPIRED, base_mismatch, lease_ended, no_lease
from asyncfl.server.errors import ApiError
from asyncfl.server.uploads import accepted_answer, client_update, stale_answer

if TYPE_CHECKING:
    from asyncfl.cluster.selector import Selector

log = logging.getLogger("asyncfl.cluster")
BATCH_MAX, BATCH_WAIT_S = 32, 0.02
QUEUE_MAX = 512
ANSWER_WAIT_S = 60.0


@dataclass
class Pending:
    """An upload waiting for the commit that decides it."""

    client: str
    served: ServedTask
    checked: Checked
    version: int  # the task's version when the upload arrived
    refusal: ApiError | None  # refused after naming a live lease: the lease ends all the same
    stale: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[int, dict] | None = None
    error: ApiError | None = None
    lost: bool = False  # its lease was claimed by another commit: answered from the log

    @property
    def key(self) -> tuple[str, str, str]:
        return self.served.name, self.client, self.checked.header.idempotency_key

    @property
    def staleness(self) -> int:
        return self.version - self.checked.header.base_version

    @property
    def verdict(self) -> str:
        return "rejected" if self.refusal is not None else "discarded" if self.stale else "buffered"

    def answer(self, seq: int) -> tuple[int, dict]:
        if self.refusal is not None:
            return self.refusal.status, self.refusal.body() | {"seq": seq, "version": self.version}
        if self.stale:
            return 409, stale_answer(seq, self.version, self.staleness, self.served.max_staleness)
        return 200, accepted_answer("buffered", seq, self.staleness, self.version)

    def finish(self, result: tuple[int, dict] | None = None, error: ApiError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class UploadCommitter:
    def __init__(self, selector: Selector):
        self.selector, self.pool = selector, selector.pool
        self._queue: collections.deque[Pending] = collections.deque()
        self._waiting: dict[tuple[str, str, str], Pending] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.latency: collections.deque[float] = collections.deque(maxlen=2000)
        self.commits = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="asyncfl-selector-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- request side -----------------------------------------------------------------
    def upload(self, client: str, task: str, body: bytes) -> tuple[int, dict]:
        t0 = time.perf_counter()
        served = self.selector.served(task)
        self.selector.count(self.selector.view(task), "upload_body_bytes", len(body))
        checked = served.aggregation.check(body)  # pure: the expensive part, no lock
        h = checked.header
        key = (task, client, h.idempotency_key)
        with self._cv:
            pending = self._waiting.get(key)
        if pending is None:
            with self.pool.connection() as conn:  # the lease first: ended by then, its upload's row is there
                lease = conn.execute(
                    "SELECT l.client, l.state, l.base_version, l.expires_at > now(), t.version FROM leases l "
                    "JOIN tasks t ON t.task = l.task WHERE l.lease_id=%s AND l.task=%s",
                    (h.lease_id, task),
                ).fetchone()
                replay = conn.execute(
                    "SELECT status, response FROM updates WHERE task=%s AND client=%s AND idem_key=%s", key
                ).fetchone()
            if replay is not None:
                return replay[0], replay[1] | {"replayed": True}
            pending = self._judged(client, served, checked, lease)
            with self._cv:
                first = self._waiting.get(key)
                if first is None:
                    if len(self._queue) >= QUEUE_MAX:
                        raise ApiError(
                            503,
                            "overloaded",
                            "too many uploads waiting for a commit; retry later",
                            {"Retry-After": "1"},
                        )
                    self._waiting[key] = pending
                    self._queue.append(pending)
                    self._cv.notify_all()
                else:
                    pending = first
        status, answer = self._wait(pending)
        if pending.checked is not checked or pending.lost:
            answer = answer | {"replayed": True}
        else:
            self.latency.append(time.perf_counter() - t0)
        return status, answer

    def _judged(self, client: str, served: ServedTask, checked: Checked, lease: tuple | None) -> Pending:
        """The lease rule (409s that leave the lease as it is), then the checks whose refusal ends
        the lease: the TSA's verdict on a masked upload's seed, reported values, the norm guard,
        the staleness bound."""
        h = checked.header
        if lease is None or lease[0] != client:
            raise no_lease(h.lease_id, client)
        _, state, base_version, live, version = lease
        if state != "active" or not live:
            raise lease_ended(state if state != "active" else EXPIRED)
        if h.base_version != base_version:
            raise base_mismatch(h.base_version, h.lease_id, base_version)
        refusal = served.vet(checked)  # raises 503 while the TSA cannot be asked: nothing acknowledged
        try:
            if refusal is None:
                served.bounds.check(h, served.spec.algorithm.name)
                served.screen(checked.norm)
        except ApiError as err:
            refusal = err
        stale = served.max_staleness is not None and version - h.base_version > served.max_staleness
        return Pending(client, served, checked, version, refusal, stale and refusal is None)

    def _wait(self, pending: Pending) -> tuple[int, dict]:
        if not pending.done.wait(ANSWER_WAIT_S):
            raise unavailable("the commit did not finish in time")
        if pending.error is not None:
            raise pending.error
        return pending.result

    # ---- the group commit -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                deadline = time.monotonic() + BATCH_WAIT_S
                while len(self._queue) < BATCH_MAX and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = [self._queue.popleft() for _ in range(min(BATCH_MAX, len(self._queue)))]
            failure = None
            try:
                self._commit(batch)
                self._resolve_lost([p for p in batch if p.lost])
            except ApiError as err:
                failure = err
            except Exception as err:
                log.exception("group commit of %d uploads failed", len(batch))
                failure = unavailable(type(err).__name__)
            with self._cv:
                for p in batch:
                    if self._waiting.get(p.key) is p:
                        del self._waiting[p.key]
            for p in batch:  # those the commit (or the look-up after it) did not answer
                if not p.done.is_set():
                    p.finish(error=failure or unavailable("no answer"))

    def _commit(self, batch: list[Pending]) -> None:
        """One transaction for the whole batch; answers are set only once it committed."""
        me = self.selector.id
        answers: list[tuple[Pending, tuple[int, dict]]] = []
        with self.pool.transaction() as conn:
            seqs = conn.execute(
                "SELECT nextval(pg_get_serial_sequence('updates', 'seq')) FROM generate_series(1, %s)", (len(batch),)
            ).fetchall()
            freed, logged = [], {}
            for p, (seq,) in zip(batch, seqs):
                h, task = p.checked.header, p.served.name
                claimed = conn.execute(
                    "UPDATE leases SET state='done', change=nextval('lease_changes') WHERE lease_id=%s AND task=%s "
                    "AND client=%s AND state='active' AND expires_at > now() RETURNING lease_id",
                    (h.lease_id, task, p.client),
                ).fetchone()
                if claimed is None:
                    p.lost = True
                    continue
                freed.append(h.lease_id)
                status, answer = p.answer(seq)
                row = conn.execute(
                    "INSERT INTO updates(seq, task, client, idem_key, lease_id, base_version, version_at_submit, "
                    "staleness, n_examples, steps, loss, norm, verdict, selector, status, response) "
                    "VALUES(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (task, client, idem_key) DO NOTHING RETURNING seq",
                    (
                        seq,
                        task,
                        p.client,
                        h.idempotency_key,
                        h.lease_id,
                        h.base_version,
                        p.version,
                        p.staleness,
                        h.n_examples,
                        h.steps,
                        h.loss,
                        p.checked.norm,
                        p.verdict,
                        me,
                        status,
                        Jsonb(answer),
                    ),
                ).fetchone()
                if row is None:  # the key answered another lease's upload: that answer stands
                    p.lost = True
                    continue
                answers.append((p, (status, answer)))
                if p.verdict == "buffered":
                    logged.setdefault(task, []).append((p, seq))
            for task, accepted in logged.items():
                self._write_partials(conn, task, accepted)
            if freed:
                conn.execute("UPDATE slots SET lease_id=NULL, selector=%s WHERE lease_id = ANY(%s)", (me, freed))
        self.commits += 1
        for p in batch:  # ended here or, for those lost, elsewhere
            self.selector.lease_ended(p.served.name, p.client, p.checked.header.lease_id)
        for p, result in answers:
            if p.verdict == "buffered":
                p.served.accepted(p.checked.norm)
            else:  # counted by reason, as the single process counts them
                self.selector.reject(p.served.name, p.refusal or ApiError(409, "stale", ""))
            self.selector.count(self.selector.view(p.served.name), f"uploads_{p.verdict}")
            self.selector.count(self.selector.view(p.served.name), "upload_payload_bytes", p.checked.payload_bytes)
            p.finish(result)

    def _write_partials(self, conn, task: str, accepted: list[tuple[Pending, int]]) -> None:
        """The accepted updates' weighted sum as one partial, or (aggregators that need each
        update) one partial per update; their update rows point to it."""
        served = accepted[0][0].served
        groups: list[tuple[Partial, list[int]]] = []
        if served.tsa is not None:
            groups = self._masked_sums(served, accepted)
        elif served.merges:
            total = empty()
            for p, _ in accepted:
                total.add(served.aggregator, client_update(p.client, p.checked.header, p.checked), p.staleness)
            groups.append((total, [seq for _, seq in accepted]))
        else:
            for p, seq in accepted:
                update = client_update(p.client, p.checked.header, p.checked)
                groups.append((Partial.single(update, p.staleness), [seq]))
        for partial, seqs in groups:
            (pid,) = conn.execute(
                "INSERT INTO partials(task, selector, count, weight_sum, body) VALUES(%s, %s, %s, %s, %s) RETURNING id",
                (task, self.selector.id, partial.count, partial.weight_sum, encode_partial(partial)),
            ).fetchone()
            conn.execute("UPDATE updates SET partial_id=%s WHERE seq = ANY(%s)", (pid, seqs))

    @staticmethod
    def _masked_sums(served: ServedTask, accepted: list[tuple[Pending, int]]) -> list[tuple[Partial, list[int]]]:
        """Masked uploads summed in the ring, each times its integer weight at the staleness it
        arrived with, at most K per partial (`tsa_buffer_terms`)."""
        agg = served.aggregator
        per_partial, _ = tsa_buffer_terms(agg.terms.buffer_size)
        groups = []
        for i in range(0, len(accepted), per_partial):
            chunk = accepted[i : i + per_partial]
            buffer = MaskedBuffer(agg.codec, agg.terms.length)
            for p, _ in chunk:
                buffer.fold(p.checked.masked, agg.integer_weight(p.checked.header.n_examples, p.staleness))
            groups.append((Partial.masked_sum(agg, buffer), [seq for _, seq in chunk]))
        return groups

    def _resolve_lost(self, lost: list[Pending]) -> None:
        """Uploads whose lease another commit claimed: the logged answer to the same key (the
        same upload through another selector), else why the lease is gone."""
        if not lost:
            return
        with self.pool.connection() as conn:
            for p in lost:
                h = p.checked.header
                row = conn.execute(
                    "SELECT status, response FROM updates WHERE task=%s AND client=%s AND idem_key=%s", p.key
                ).fetchone()
                if row is not None:
                    p.finish((row[0], row[1]))
                    continue
                state = conn.execute(
                    "SELECT state FROM leases WHERE lease_id=%s AND task=%s", (h.lease_id, p.served.name)
                ).fetchone()
                p.finish(error=lease_ended(EXPIRED if state is None or state[0] == "active" else state[0]))
