"""The aggregator (`asyncfl serve --role aggregator`): steps the models of the tasks the
coordinator assigned to it.

Per task it builds the run's aggregator object exactly as the single process does and resumes
it from the newest version and its `aggregator_state`. It folds the partials selectors left
waiting, in id order: FedBuff's pre-summed (total, count, weight_sum), every other rule's single
updates through the aggregator's own `submit`. Each step is one transaction fenced by the
task's `owner_epoch`: the new version, the aggregator's state after it and the partials it
folded commit together, or (ownership lost) nothing does and the task is dropped. Partials
buffered but not yet stepped stay waiting in the database, so whoever owns the task next folds
them again from the last step's state: every accepted update lands in exactly one version.

With secure aggregation by the TSA the partials are masked ring sums (MaskedFedBuff). Once they
hold K contributions the buffer closes: its step id, contributions and ring sum go into
`aggregator_state`, and its partials are marked with the step id, in one fenced transaction,
before the TSA hears of the request. Only then is the TSA asked to unmask; the step with the
unmasked sum commits like any other. A crash or takeover in between finds the closed buffer in
the state and sends the identical request again, which the TSA answers with its first answer.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import psycopg
import torch

from asyncfl.algorithms.aggregators import BufferedAggregator
from asyncfl.algorithms.types import ServerState, Verdict
from asyncfl.cluster import members
from asyncfl.cluster.evals import TaskEvaluation
from asyncfl.cluster.members import DEFAULT_TIMING, Timing, session
from asyncfl.cluster.partials import Partial, decode_partial
from asyncfl.cluster.tasks import build_objects, task_config
from asyncfl.server.aggregation import all_finite
from asyncfl.server.store import tensor_bytes, tensor_load
from asyncfl.server.tsa_link import FIRST_RETRY, LONGEST_RETRY, TsaRefused, TsaUnavailable

log = logging.getLogger("asyncfl.cluster.aggregator")
BATCH = 256  # partials read per round and task


class Fenced(Exception):
    """This aggregator no longer owns the task (another one does, at a newer epoch)."""


class OwnedTask:
    """One task this aggregator steps, from the state of its newest version."""

    def __init__(self, conn: psycopg.Connection, member: str, task: str, epoch: int):
        self.conn, self.member, self.task, self.epoch = conn, member, task, epoch
        tree, run, state = conn.execute("SELECT config, run, state FROM tasks WHERE task = %s", (task,)).fetchone()
        self.objects = build_objects(task_config(tree), run)
        self.aggregator = self.objects.aggregator
        self.keep_versions = self.objects.settings.keep_versions
        version, body, weights = conn.execute(
            "SELECT a.version, a.body, v.weights FROM aggregator_state a "
            "JOIN versions v ON v.task = a.task AND v.version = a.version WHERE a.task = %s",
            (task,),
        ).fetchone()
        self.state = ServerState(w=tensor_load(weights), version=version)
        self.state_body = bytes(body)  # the aggregator's state right after the newest step
        self.aggregator.load_state_dict(tensor_load(self.state_body))
        self.models = {version: self.state.w}  # recent versions: FedAsync's base models
        self.buffered: list[tuple[int, int]] = []  # (partial id, updates) folded since the last step
        self.evaluation = TaskEvaluation(self.objects)
        self.done = state == "done"
        self.tsa_link = None if self.objects.tsa is None else self.objects.tsa.link()
        self._tsa_retry_at, self._tsa_wait = 0.0, FIRST_RETRY
        if self.tsa_link is not None and self.aggregator.closed:  # closed before a crash: its partials
            self.buffered = conn.execute(
                "SELECT id, count FROM partials WHERE task = %s AND tsa_step = %s AND folded_version IS NULL "
                "ORDER BY id",
                (task, self.aggregator.closed[0].requested_step),
            ).fetchall()

    # ---- folding ----------------------------------------------------------------------
    def poll(self) -> int:
        """Fold the partials waiting (not yet in this buffer), stepping as the aggregator
        decides; how many were read. A closed masked buffer is unmasked and stepped first."""
        if self.tsa_link is not None and self.aggregator.closed:
            self._unmask()
            return 0
        rows = self.conn.execute(
            "SELECT id, count, body FROM partials WHERE task = %s AND folded_version IS NULL "
            "AND NOT (id = ANY(%s)) ORDER BY id LIMIT %s",
            (self.task, [pid for pid, _ in self.buffered], BATCH),
        ).fetchall()
        for read, (pid, count, body) in enumerate(rows, 1):
            self.fold(pid, count, decode_partial(body))
            if self.tsa_link is not None and self.aggregator.closed:
                return read
        return len(rows)

    def fold(self, pid: int, count: int, partial: Partial) -> None:
        agg = self.aggregator
        if partial.masked is not None:
            partial.fold_masked(agg)
            self.buffered.append((pid, count))
            if agg.close_if_full():
                self._close()
            return
        if partial.merged:
            if type(agg) is not BufferedAggregator:
                raise TypeError(f"task {self.task}: a summed partial for a {type(agg).__name__}")
            partial.fold_into(agg)
            self.buffered.append((pid, count))
            if agg.count >= agg.buffer_size:
                self._stepped(agg.flush(self.state))
            return
        update = partial.update
        verdict = agg.submit(self.state, update, self._base(update.base_version))
        if verdict == Verdict.DISCARDED:  # too stale by now: the version moved since the selector judged it
            self._discard([(pid, count)])
            return
        self.buffered.append((pid, count))
        if verdict == Verdict.STEPPED:
            self._stepped(True)

    def _base(self, version: int) -> torch.Tensor:
        """The model a client started from; the current one when it is gone (as the single
        process does after losing it)."""
        w = self.models.get(version)
        if w is None:
            row = self.conn.execute(
                "SELECT weights FROM versions WHERE task = %s AND version = %s", (self.task, version)
            ).fetchone()
            w = self.state.w if row is None else tensor_load(row[0])
        return w

    def _close(self) -> None:
        """The buffer just closed, made durable before its request leaves: the state holding it
        (an empty open buffer, since the partial that filled it was folded whole) and its partials
        marked with its step id."""
        body = tensor_bytes(self.aggregator.state_dict())
        step = self.aggregator.closed[0].requested_step
        ids = [pid for pid, _ in self.buffered]
        with self.conn.transaction():
            self._fence()
            self.conn.execute("UPDATE aggregator_state SET body = %s WHERE task = %s", (body, self.task))
            marked = self.conn.execute(
                "UPDATE partials SET tsa_step = %s WHERE id = ANY(%s) AND folded_version IS NULL AND tsa_step IS NULL",
                (step, ids),
            ).rowcount
            if marked != len(ids):
                raise Fenced(f"task {self.task}: {len(ids) - marked} of buffer {step}'s partials were taken elsewhere")
        self.state_body = body

    def _unmask(self) -> None:
        """Ask the TSA for the closed buffer's mask sum (backing off while it cannot answer) and
        step with the unmasked sum."""
        now = time.monotonic()
        if now < self._tsa_retry_at:
            return
        agg = self.aggregator
        try:
            response = self.tsa_link.unmask(agg.pending_request())
            agg.accept(response)
        except (TsaUnavailable, TsaRefused, ValueError) as err:
            log.warning(
                "task %s: unmasking buffer %s: %s; retrying in %.1f s",
                self.task,
                agg.closed[0].requested_step,
                err,
                self._tsa_wait,
            )
            self._tsa_retry_at, self._tsa_wait = now + self._tsa_wait, min(LONGEST_RETRY, 2 * self._tsa_wait)
            return
        self._tsa_retry_at, self._tsa_wait = 0.0, FIRST_RETRY
        self._stepped(agg.flush(self.state))

    def _stepped(self, stepped: bool) -> None:
        """After the aggregator stepped (or emptied its buffer without a step): commit the
        version, or refuse a step that made anything non-finite, as the single process does."""
        if stepped and torch.isfinite(self.state.w).all() and all_finite(self.aggregator.state_dict()):
            self._commit()
            return
        last = max(self.models)
        self.state.w, self.state.version = self.models[last], last
        self.aggregator.load_state_dict(tensor_load(self.state_body))
        if stepped:
            log.warning("task %s: a step would have made the model non-finite; version %d kept", self.task, last)
        if self.tsa_link is not None and self.aggregator.closed:  # the refused buffer is dropped with its partials
            self.aggregator.closed.pop(0)
            self.state_body = tensor_bytes(self.aggregator.state_dict())
        self._discard(self.buffered)
        self.buffered = []

    def _commit(self) -> None:
        v, w = self.state.version, self.state.w
        body = tensor_bytes(self.aggregator.state_dict())
        ids = [pid for pid, _ in self.buffered]
        with self.conn.transaction():
            self._fence(v)
            self.conn.execute(
                "INSERT INTO versions(task, version, updates, weights) VALUES (%s, %s, %s, %s)",
                (self.task, v, sum(n for _, n in self.buffered), tensor_bytes(w)),
            )
            self.conn.execute(
                "UPDATE aggregator_state SET version = %s, body = %s, report = %s WHERE task = %s",
                (v, body, json.dumps(self.aggregator.status()), self.task),
            )
            folded = self.conn.execute(
                "UPDATE partials SET folded_version = %s WHERE id = ANY(%s) AND folded_version IS NULL", (v, ids)
            ).rowcount
            if folded != len(ids):
                raise Fenced(f"task {self.task}: {len(ids) - folded} of the step's partials were folded elsewhere")
            self._prune(v)
        self.state_body, self.buffered = body, []
        self.models[v] = w
        for old in [k for k in self.models if k <= v - self.keep_versions]:
            del self.models[old]

    def _fence(self, version: int | None = None) -> None:
        """Inside a transaction: lock the task's row if this aggregator still owns it at its
        epoch, and for a step move it from the last committed version to `version`; else Fenced."""
        owner = (self.task, self.member, self.epoch)
        if version is None:
            found = self.conn.execute(
                "SELECT 1 FROM tasks WHERE task = %s AND owner = %s AND owner_epoch = %s FOR UPDATE", owner
            ).fetchone()
        else:
            found = self.conn.execute(
                "UPDATE tasks SET version = %s WHERE task = %s AND owner = %s AND owner_epoch = %s AND version = %s "
                "RETURNING 1",
                (version, *owner, max(self.models)),
            ).fetchone()
        if found is None:
            raise Fenced(f"task {self.task}: no longer owned by {self.member} at epoch {self.epoch}")

    def _discard(self, partials: list[tuple[int, int]]) -> None:
        """Partials that folded into no version: marked with the version they met and their
        updates counted as discarded, so they are not read again."""
        if not partials:
            return
        with self.conn.transaction():
            self._fence()
            self.conn.execute(
                "UPDATE partials SET folded_version = %s, discarded = count WHERE id = ANY(%s) "
                "AND folded_version IS NULL",
                (self.state.version, [pid for pid, _ in partials]),
            )
            if self.tsa_link is not None:  # a closed buffer it dropped
                self.conn.execute("UPDATE aggregator_state SET body = %s WHERE task = %s", (self.state_body, self.task))

    def _prune(self, version: int) -> None:
        """Versions older than keep_versions that no active lease and no waiting update starts from."""
        self.conn.execute(
            "DELETE FROM versions v WHERE v.task = %(t)s AND v.version <= %(floor)s "
            "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.task = v.task AND l.state = 'active' "
            "AND l.base_version = v.version) "
            "AND NOT EXISTS (SELECT 1 FROM partials p JOIN updates u ON u.partial_id = p.id "
            "WHERE p.task = v.task AND p.folded_version IS NULL AND u.base_version = v.version)",
            {"t": self.task, "floor": version - self.keep_versions},
        )

    # ---- evaluation -------------------------------------------------------------------
    def maybe_evaluate(self) -> None:
        version = max(self.models)
        if not self.evaluation.due(version):
            return
        row = self.evaluation.evaluate(self.conn, self.task, version, self.models[version])
        if self.evaluation.reached(row) and not self.done:
            with self.conn.transaction():
                self._fence()
                self.conn.execute("UPDATE tasks SET state = 'done' WHERE task = %s", (self.task,))
            self.done = True
            log.info("task %s reached its target at version %d: done", self.task, version)


class AggregatorRole:
    """The process's loop: follow the tasks assigned to it, fold each. `run` heartbeats from a
    thread of its own, so a long evaluation or step does not make the coordinator think it dead
    (a paused or partitioned process is handled by the fence instead)."""

    def __init__(self, url: str, member: str | None = None, timing: Timing = DEFAULT_TIMING, poll_s: float = 0.05):
        self.url, self.timing, self.poll_s = url, timing, poll_s
        self.member = member or members.member_id("aggregator")
        self.conn = session(url)
        self.tasks: dict[str, OwnedTask] = {}
        self._failed: dict[tuple[str, int], float] = {}  # (task, epoch) that failed to load -> when
        self._beat = -math.inf
        self._beating = False  # True while `run`'s heartbeat thread runs

    def heartbeat(self, conn: psycopg.Connection) -> None:
        members.heartbeat(conn, self.member, "aggregator", stats={"tasks": sorted(self.tasks)})
        self._beat = time.monotonic()

    def round(self) -> int:
        """One pass over the owned tasks; partials read."""
        if not self._beating and time.monotonic() - self._beat >= self.timing.heartbeat_s:
            self.heartbeat(self.conn)
        self._follow_assignments()
        read = 0
        for name, owned in list(self.tasks.items()):
            try:
                read += owned.poll()
                owned.maybe_evaluate()
            except Fenced as err:
                log.info("%s: dropping the task", err)
                del self.tasks[name]
            except psycopg.Error:
                del self.tasks[name]  # its in-memory state may be ahead of the database: reload it
                raise
        return read

    def _follow_assignments(self) -> None:
        owned = dict(
            self.conn.execute("SELECT task, owner_epoch FROM tasks WHERE owner = %s", (self.member,)).fetchall()
        )
        for name in [t for t, o in self.tasks.items() if owned.get(t) != o.epoch]:
            log.info("task %s: assigned elsewhere; dropped", name)
            del self.tasks[name]
        for name, epoch in owned.items():
            if name in self.tasks or time.monotonic() - self._failed.get((name, epoch), -math.inf) < 30.0:
                continue
            try:
                self.tasks[name] = OwnedTask(self.conn, self.member, name, epoch)
                log.info("task %s: taken over at epoch %d, version %d", name, epoch, self.tasks[name].state.version)
            except psycopg.Error:
                raise
            except Exception:  # a config this asyncfl cannot build: the other tasks go on
                log.exception("task %s: cannot load it; retrying in 30 s", name)
                self._failed[(name, epoch)] = time.monotonic()

    def _heartbeats(self, stop: threading.Event) -> None:
        conn = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = session(self.url)
                self.heartbeat(conn)
            except Exception as err:  # the thread must outlive any failure: it is the liveness signal
                log.warning("aggregator heartbeat failed: %s", err)
                if conn is not None:
                    conn.close()
            stop.wait(self.timing.heartbeat_s)
        if conn is not None:
            conn.close()

    def run(self, stop: threading.Event) -> None:
        """Rounds until `stop`; a failed round (the database away) drops the tasks whose state
        may be ahead of it and reconnects."""
        beats = threading.Thread(target=self._heartbeats, args=(stop,), name="asyncfl-heartbeat", daemon=True)
        self._beating = True
        beats.start()
        while not stop.is_set():
            try:
                if self.conn.closed:
                    self.conn, self.tasks = session(self.url), {}
                read = self.round()
            except psycopg.Error as err:
                log.warning("aggregator round failed: %s", err)
                self.conn.close()
                read = 0
            if not read:
                stop.wait(self.poll_s)
        beats.join()
        if not self.conn.closed:
            members.leave(self.conn, self.member)
            self.conn.close()
