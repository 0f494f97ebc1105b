"""The coordinator (`asyncfl serve --role coordinator`): housekeeping no request waits for.

Every `period_s`: expire leases past their deadline (their slots free again); deal each task's
free slots to the live selectors in fair shares (a slot whose selector is gone, or one over its
share, moves to one under its share); give every task without a live aggregator to the live
aggregator with the fewest tasks, bumping `owner_epoch` so the old owner's commits fail. Every
change is a guarded UPDATE (it applies only if the row is still as read), so selectors claiming
slots meanwhile are never overridden. Two coordinators may run: a session advisory lock lets one
act while the other heartbeats and waits; the lock goes with the holder's connection. While no
coordinator runs, training goes on: selectors keep their slots, and an upload returns its slot
to the selector that took it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import psycopg

from asyncfl.cluster import members
from asyncfl.cluster.members import DEFAULT_TIMING, Timing, session

log = logging.getLogger("asyncfl.cluster.coordinator")
LOCK_KEY = 0x61666C636F6F7264  # pg advisory lock id: "aflcoord"


def plan_grants(slots: list[tuple[int, str | None, bool]], selectors: list[str]) -> list[tuple[int, str | None, str]]:
    """Moves (slot, from, to) that bring each live selector to its fair share of a task's
    slots. `slots`: (slot, selector, leased). Shares differ by at most one; the larger ones go
    to the selectors already holding most, so a balanced task stays as it is. Only free slots
    move: a leased one stays with its selector until its lease ends."""
    if not selectors:
        return []
    held = Counter(sel for _, sel, _ in slots if sel in selectors)
    base, extra = divmod(len(slots), len(selectors))
    by_holding = sorted(selectors, key=lambda s: (-held[s], s))
    share = {s: base + (i < extra) for i, s in enumerate(by_holding)}
    movable = [(slot, sel) for slot, sel, leased in slots if not leased and sel not in share]
    for s in selectors:
        excess = held[s] - share[s]
        if excess > 0:
            movable += [(slot, sel) for slot, sel, leased in slots if sel == s and not leased][:excess]
    needy = [s for s in selectors for _ in range(share[s] - held[s])]
    return [(slot, old, new) for (slot, old), new in zip(movable, needy)]


def plan_owners(tasks: list[tuple[str, str | None]], aggregators: list[str]) -> list[tuple[str, str | None, str]]:
    """Moves (task, from, to): each task without a live owner to the live aggregator with the
    fewest tasks; then, while one aggregator has two more tasks than another, one task moves
    (one per round: every move makes its new owner reload the task)."""
    if not aggregators:
        return []
    load = Counter({a: 0 for a in aggregators})
    load.update(owner for _, owner in tasks if owner in load)
    moves = []
    for task, owner in tasks:
        if owner not in load:
            to = min(aggregators, key=lambda a: (load[a], a))
            load[to] += 1
            moves.append((task, owner, to))
    busiest = max(aggregators, key=lambda a: (load[a], a))
    idlest = min(aggregators, key=lambda a: (load[a], a))
    if load[busiest] - load[idlest] >= 2:
        moved = {t for t, _, _ in moves}
        task = next(t for t, owner in reversed(tasks) if owner == busiest and t not in moved)
        moves.append((task, busiest, idlest))
    return moves


class Coordinator:
    def __init__(self, url: str, member: str | None = None, timing: Timing = DEFAULT_TIMING):
        self.url, self.timing = url, timing
        self.member = member or members.member_id("coordinator")
        self.conn = session(url)
        self.leader = False

    def tick(self) -> dict:
        """One round; what it changed (empty while another coordinator leads)."""
        members.heartbeat(self.conn, self.member, "coordinator", stats={"leader": self.leader})
        if not self.leader:
            self.leader = bool(self.conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0])
            if not self.leader:
                return {}
            log.info("coordinator %s leads", self.member)
        return {"expired": self.expire_leases(), "granted": self.grant_slots(), "assigned": self.assign_tasks()}

    def expire_leases(self) -> int:
        """Leases past their deadline end ('expired'; selectors see it by `change`), their
        slots free again for the same selector."""
        with self.conn.transaction():
            rows = self.conn.execute(
                "WITH gone AS (UPDATE leases SET state = 'expired', change = nextval('lease_changes') "
                "WHERE state = 'active' AND expires_at < now() RETURNING lease_id) "
                "UPDATE slots SET lease_id = NULL WHERE lease_id IN (SELECT lease_id FROM gone) RETURNING slot"
            ).fetchall()
        return len(rows)

    def grant_slots(self) -> int:
        selectors = members.live(self.conn, "selector", self.timing.member_timeout_s)
        if not selectors:
            return 0
        rows = self.conn.execute(
            "SELECT s.task, s.slot, s.selector, s.lease_id IS NOT NULL FROM slots s JOIN tasks t USING (task) "
            "WHERE t.state = 'running' ORDER BY s.task, s.slot"
        ).fetchall()
        by_task: dict[str, list] = {}
        for task, slot, selector, leased in rows:
            by_task.setdefault(task, []).append((slot, selector, leased))
        moved = 0
        for task, slots in by_task.items():
            plan = plan_grants(slots, selectors)
            if not plan:
                continue
            numbers, olds, news = (list(column) for column in zip(*plan))
            # one statement per task (10^4 slots dealt in one round trip, not 10^4); a slot
            # leased or regranted meanwhile keeps its selector
            moved += self.conn.execute(
                "UPDATE slots s SET selector = g.new FROM unnest(%s::int[], %s::text[], %s::text[]) AS g(slot, old, new) "
                "WHERE s.task = %s AND s.slot = g.slot AND s.lease_id IS NULL AND s.selector IS NOT DISTINCT FROM g.old",
                (numbers, olds, news, task),
            ).rowcount
        return moved

    def assign_tasks(self) -> int:
        aggregators = members.live(self.conn, "aggregator", self.timing.member_timeout_s)
        tasks = self.conn.execute("SELECT task, owner FROM tasks ORDER BY created_at, task").fetchall()
        moved = 0
        for task, old, new in plan_owners([tuple(t) for t in tasks], aggregators):
            n = self.conn.execute(
                "UPDATE tasks SET owner = %s, owner_epoch = owner_epoch + 1 WHERE task = %s "
                "AND owner IS NOT DISTINCT FROM %s",
                (new, task, old),
            ).rowcount
            if n:
                log.info("task %s: aggregator %s -> %s", task, old, new)
            moved += n
        return moved

    def run(self, stop: threading.Event, period_s: float = 0.2) -> None:
        """Rounds until `stop`; a failed round (the database away) is logged and retried on a
        new connection (the advisory lock went with the old one)."""
        while not stop.is_set():
            try:
                if self.conn.closed:
                    self.conn, self.leader = session(self.url), False
                self.tick()
            except psycopg.Error as err:
                log.warning("coordinator round failed: %s", err)
                self.conn.close()
            stop.wait(period_s)
        if not self.conn.closed:
            members.leave(self.conn, self.member)
            self.conn.close()
