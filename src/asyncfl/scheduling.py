"""Scheduling policies: *when* clients train and the server steps.

A policy is a small state machine over a `Runtime`: the simulator implements it with a virtual
clock, the network server with check-ins and wall-clock timers. Aggregation math stays in the
aggregator; the policy only decides when to start clients, when a round closes and what
happens to stragglers.

Every policy has the same contract: `on_report` returns the verdict of the update it was handed
(None when it did not submit it); `on_refused` hears of a report the runtime refused before
handing it over (the network server's checks), `on_lost` of a trip that ended without one; `state_dict` / `load_state_dict` carry what a restarted
server needs (JSON-able); `status` is what it adds to the server's /status. Timer payloads are
JSON values the runtime treats as opaque (it may persist them and hand back an equal value);
`is_deadline` tells a runtime which timer closes the open round.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from asyncfl.algorithms.types import ClientUpdate, Verdict
from asyncfl.config import SchedulerConfig


class Runtime(Protocol):
    @property
    def in_flight(self) -> int: ...

    def request_clients(self, n: int) -> int:
        """Start up to n trips from the current model; returns how many started. When fewer
        than asked could start, the runtime calls `on_timer(rt, WAKE)` later."""

    def submit(self, trip: Any, update: ClientUpdate) -> Verdict: ...

    def flush(self) -> bool: ...

    def cancel_in_flight(self) -> None: ...

    def expect_reports(self, n: int) -> None:
        """Only the first n reports of the trips now in flight will be used: a runtime that
        prepares results ahead of time may leave the others until they are asked for."""

    def collect_partial(self, limit: int) -> list[tuple[Any, ClientUpdate]]:
        """Stop at most `limit` trips in flight, those that did the most local steps (ties: the
        earlier-started trip), and return their partial updates in start order; trips with no
        step done are never chosen. The others stay in flight (the closing round cancels them)."""

    def set_timer(self, delay: float, payload: Any) -> None:
        """Call `on_timer(rt, payload)` after `delay` seconds; `payload` is a JSON value."""


WAKE = "wake"


class AsyncPolicy:
    """Keep `concurrency` clients training; every report or loss starts a replacement."""

    mode = "async"

    def __init__(self, concurrency: int):
        self.concurrency = concurrency

    def start(self, rt: Runtime) -> None:
        rt.request_clients(self.concurrency - rt.in_flight)

    def on_report(self, rt: Runtime, trip: Any, update: ClientUpdate) -> Verdict:
        verdict = rt.submit(trip, update)
        self.start(rt)
        return verdict

    def on_lost(self, rt: Runtime, trip: Any) -> None:
        self.start(rt)

    on_refused = on_lost

    def on_timer(self, rt: Runtime, payload: Any) -> None:
        if payload == WAKE:
            self.start(rt)

    def is_deadline(self, payload: Any) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def status(self) -> dict:
        return {}


class SyncPolicy:
    """Rounds: select ceil(cohort (1 + over_selection)) devices from one model version; the
    round closes at `cohort` reports, when nobody is left in flight, or at the timeout.
    Stragglers are then cancelled (drop), waited for (wait: no timeout), or asked for the work
    they have done (partial).

    A report the server refused (a norm or filter refusal, a non-finite update) counts towards
    the cohort like an accepted one: were the round to wait for `cohort` accepted updates,
    every refusal would make it wait for one more straggler, so attackers whose updates are
    all refused would still set the pace of training (with 20 % of them, rounds took 3x as
    long on digits)."""

    mode = "sync"

    def __init__(
        self, cohort: int, over_selection: float = 0.0, round_timeout: float | None = None, straggler: str = "drop"
    ):
        self.cohort = cohort
        self.selected = math.ceil(cohort * (1 + over_selection) - 1e-9)
        self.round_timeout = round_timeout if straggler != "wait" else None
        self.straggler = straggler
        self.round = 0
        self.open = False
        self.arrived = 0

    def start(self, rt: Runtime) -> None:
        if rt.request_clients(self.selected) == 0:
            return  # the runtime wakes us when devices may be eligible again
        self.round += 1
        self.open = True
        self.arrived = 0
        rt.expect_reports(self.cohort)  # the round closes at its cohort: over-selected stragglers get cancelled
        if self.round_timeout is not None:
            rt.set_timer(self.round_timeout, self._deadline())

    def _deadline(self) -> dict:
        return {"deadline_of_round": self.round}

    def is_deadline(self, payload: Any) -> bool:
        """True for the timer that closes the round now open (earlier rounds' timers are void)."""
        return self.open and payload == self._deadline()

    def on_report(self, rt: Runtime, trip: Any, update: ClientUpdate) -> Verdict | None:
        if not self.open:
            return None  # the round this trip belonged to has closed
        self.arrived += 1  # first: a report that fails while folding in has counted all the same
        verdict = rt.submit(trip, update)
        self._maybe_close(rt)
        return verdict

    def on_refused(self, rt: Runtime, trip: Any) -> None:
        if self.open:
            self.arrived += 1
        self._maybe_close(rt)

    def on_lost(self, rt: Runtime, trip: Any) -> None:
        self._maybe_close(rt)

    def on_timer(self, rt: Runtime, payload: Any) -> None:
        if payload == WAKE and not self.open:
            self.start(rt)
        elif self.is_deadline(payload):
            if self.straggler == "partial":  # a round folds at most `cohort` updates
                for trip, update in rt.collect_partial(self.cohort - self.arrived):
                    rt.submit(trip, update)
            self._close(rt)

    def _maybe_close(self, rt: Runtime) -> None:
        if self.arrived >= self.cohort or rt.in_flight == 0:
            self._close(rt)

    def _close(self, rt: Runtime) -> None:
        rt.cancel_in_flight()
        rt.flush()
        self.open = False
        self.start(rt)

    def state_dict(self) -> dict:
        return {"round": self.round, "open": self.open, "arrived": self.arrived}

    def load_state_dict(self, state: dict) -> None:
        self.round, self.open, self.arrived = state["round"], state["open"], state["arrived"]

    def status(self) -> dict:
        return {"round": {"number": self.round, "open": self.open, "arrived": self.arrived}}


def build_policy(cfg: SchedulerConfig) -> AsyncPolicy | SyncPolicy:
    if cfg.mode == "async":
        return AsyncPolicy(cfg.concurrency)
    return SyncPolicy(cfg.concurrency, cfg.over_selection, cfg.round_timeout, cfg.straggler)
