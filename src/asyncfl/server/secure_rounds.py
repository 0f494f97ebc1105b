"""Synchronous SecAgg / SecAgg+ rounds over HTTP: the scheduling policy of a sync run whose
`secure_aggregation.protocol` is secagg_plus or secagg.

Like SyncPolicy it opens n = ceil(cohort (1 + over_selection)) slots per round, all from one
model version; unlike it, no individual update ever reaches the server. A round's leases are its
participants, numbered 0..n-1 in the order they join, and run the four phases of
`asyncfl.secagg` (advertise keys, share keys, masked input, unmask) through the endpoints in
`secagg_http.py`. A phase closes once every participant still in it has sent its message, or at
its deadline: key advertisement at the round timeout (clients train before they advertise),
each later phase `server.secagg_phase_timeout` after the previous one closed. Whoever has not
sent by then dropped out. The unmasked sum of the survivors' example-weighted, clipped,
fixed-point updates is decoded and folded into the aggregator as one update of weight
sum_i n_i, so the server optimizer steps with the FedAvg mean (within the encoding's bound);
what FedNova's and SCAFFOLD's clients send instead is in `secure_sums`.
A phase left with fewer than t participants fails the round (`SecAggAbort`): no step, counted
by phase in /status, the next round starts.

The round's messages live in memory only: a restart (or a commit that failed and rolled back)
aborts the open round, counted as failed in phase 'restart', and starts the next one, so a step
is only ever taken on a complete, single-counted sum.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from types import SimpleNamespace
from typing import Any

from asyncfl.config import ConfigError
from asyncfl.config.secure_aggregation import SYNC_PROTOCOLS, neighbours, sync_threshold
from asyncfl.scheduling import WAKE, SyncPolicy
from asyncfl.secagg import FixedPointCodec, ProtocolViolation, Ring, RingOverflowError, SecAggAbort, SecAggServer
from asyncfl.secagg.messages import RoundParams, to_json
from asyncfl.server.coordinator import ACTIVE
from asyncfl.server.errors import ApiError
from asyncfl.server.secagg_messages import PHASES, REPLIES, check
from asyncfl.server.secure_sums import SumForm, sum_form

log = logging.getLogger("asyncfl.server")

MIN_PHASE_TIMEOUT = 2.0


class _Round:
    """One round's protocol state: who joined as which id, what each phase received, and what
    each participant is sent when a phase closes."""

    def __init__(self, number: int, params: RoundParams, base_version: int):
        self.number, self.params, self.base_version = number, params, base_version
        self.server = SecAggServer(params)
        self.phase = 0  # index into PHASES
        self.deadline = math.inf  # clock time the current phase closes at the latest
        self.members: dict[str, int] = {}  # lease id -> client id
        self.leases: dict[int, Any] = {}  # client id -> lease
        self.received: list[dict[int, Any]] = [{} for _ in PHASES]
        self.replies: list[dict[int, Any]] = [{} for _ in REPLIES]
        self.dropped: dict[int, str] = {}  # client id -> the phase it missed

    def participants(self) -> set[int]:
        """Who may send in the current phase: everyone who received the previous phase's reply."""
        return set(self.leases) if self.phase == 0 else set(self.replies[self.phase - 1])


class SecureSyncPolicy(SyncPolicy):
    """SyncPolicy's rounds, run as secure-aggregation rounds (see the module docstring). Its
    runtime is the server's Coordinator (the simulator charges these rounds in
    asyncfl.sim.secure_aggregation instead). The phase handlers are called under the state lock."""

    def __init__(self, spec, form: SumForm, lease_timeout: float, phase_timeout: float | None):
        sc = spec.scheduler
        super().__init__(sc.concurrency, sc.over_selection, sc.round_timeout, sc.straggler)
        s = spec.secure_aggregation
        self.form, self.protocol, self.bits, self.length = form, s.protocol, s.bits, form.length
        self.max_weight = form.max_weight
        self.degree, self.threshold = neighbours(s, self.selected), sync_threshold(s, self.selected)
        self.codec = FixedPointCodec(s.clip_range, self.selected * self.max_weight, Ring(s.bits))
        self.advertise_timeout = self.round_timeout or lease_timeout
        self.phase_timeout = phase_timeout or max(MIN_PHASE_TIMEOUT, self.advertise_timeout / 4)
        self.current: _Round | None = None
        self.outcomes: collections.OrderedDict[str, tuple[str, dict]] = collections.OrderedDict()  # ended rounds
        self.completed = 0
        self.failed: collections.Counter[str] = collections.Counter()  # by phase, 'restart' included
        self.last: dict | None = None
        self._lost = False  # a restored state had a round open whose messages are gone
        self.progress = 0  # counts phase closes and round ends: held polls look again when it moves

    # ---- policy contract --------------------------------------------------------------
    def start(self, rt) -> None:
        if rt.request_clients(self.selected) == 0:
            return
        self.round += 1
        self.open, self.arrived = True, 0
        params = RoundParams(os.urandom(16), self.selected, self.threshold, self.degree, self.length, self.bits)
        self.current = _Round(self.round, params, rt.aggregation.state.version)
        self._arm(rt, self.advertise_timeout)

    def _timer(self, phase: int) -> dict:
        """Key advertisement ends with the round deadline (what check-ins report); later phases
        have timers of their own."""
        return self._deadline() if phase == 0 else {"secagg_round": self.round, "phase": PHASES[phase]}

    def _arm(self, rt, timeout: float) -> None:
        self.current.deadline = rt.clock() + timeout
        rt.set_timer(timeout, self._timer(self.current.phase))

    def is_deadline(self, payload: Any) -> bool:
        return self.current is not None and self.current.phase == 0 and super().is_deadline(payload)

    def on_timer(self, rt, payload: Any) -> None:
        if payload == WAKE and not self.open:
            self.start(rt)
        elif self.current is not None and payload == self._timer(self.current.phase):
            self._close_phase(rt)

    def on_report(self, rt, trip, update) -> None:
        raise ApiError(
            409,
            "secure_aggregation",
            "this task aggregates updates securely: a client takes part through /v1/secagg, never with a plain update",
        )

    def on_refused(self, rt, trip) -> None:
        self._maybe_close_phase(rt)

    def on_lost(self, rt, trip) -> None:
        self._maybe_close_phase(rt)

    def restored(self, rt) -> None:
        """After the server state was loaded: a round that was open lost its messages with the
        process, so it fails (phase 'restart') and the next round starts."""
        if self._lost:
            self._lost = False
            log.warning("secure aggregation round %d was open at the restart: aborted, no step", self.round)
            self.failed["restart"] += 1
            self.last = {"round": self.round, "status": "aborted", "phase": "restart"}
            self._end_round(rt)

    # ---- phase messages (under the state lock) ----------------------------------------
    def join(self, lease) -> tuple[_Round, int]:
        """The round and client id of a live lease; a lease joins while keys are advertised."""
        r = self.current
        if r is None:
            raise ApiError(409, "round_closed", "no secure aggregation round is open; check in again")
        client = r.members.get(lease.lease_id)
        if client is None:
            if r.phase != 0:
                raise ApiError(409, "phase_closed", "key advertisement closed before this lease joined the round")
            client = r.members[lease.lease_id] = len(r.members)
            r.leases[client] = lease
        return r, client

    def receive(self, rt, lease, number: int, phase: str, message) -> bool:
        """Record a participant's message for `phase` of round `number` (its `client` field is
        replaced by the lease's id); True for a re-send of the message already recorded."""
        if self.current is not None and number != self.current.number:
            raise ApiError(409, "round_closed", f"round {number} is not the open round ({self.current.number})")
        r, client = self.join(lease)
        message = dataclasses.replace(message, client=client)
        p = PHASES.index(phase)
        sent = r.received[p].get(client)
        if sent is not None:
            if sent != message:
                raise ApiError(409, "already_sent", f"this client already sent another {phase} message")
            return True
        if p != r.phase:
            code = "phase_closed" if p < r.phase else "wrong_phase"
            raise ApiError(409, code, f"round {r.number} is in phase {PHASES[r.phase]!r}, not {phase!r}")
        if client not in r.participants():
            raise ApiError(409, "dropped", f"client {client} left round {r.number} in phase {r.dropped.get(client)!r}")
        check(
            message,
            r.replies[p - 1].get(client) if p else None,
            self.max_weight,
            self.length * self.codec.ring.element_bytes,
        )
        r.received[p][client] = message
        if p == 2:
            self.arrived += 1
        self._maybe_close_phase(rt)
        return False

    def _maybe_close_phase(self, rt) -> None:
        r = self.current
        if r is None:
            return
        received = r.received[r.phase]
        waiting = sum(1 for c in r.participants() if c not in received and r.leases[c].state == ACTIVE)
        if r.phase == 0:  # slots nobody claimed yet, and leases that have not joined
            waiting += rt.open_slots + sum(1 for lease_id in rt.leases if lease_id not in r.members)
        if waiting == 0:
            self._close_phase(rt)

    def _close_phase(self, rt) -> None:
        r = self.current
        p, messages = r.phase, list(r.received[r.phase].values())
        if p == 0 and not r.members:  # nobody came (as a plain sync round, it just starts again)
            self._end_round(rt)
            return
        try:
            if p == 0:  # nobody joins once the keys are out: unclaimed slots close, unjoined leases end
                rt.open_slots = 0
                for lease in [lease for lease_id, lease in rt.leases.items() if lease_id not in r.members]:
                    rt.close(lease, counted=False)
                reply = r.server.collect_keys(messages)
            elif p == 1:
                reply = r.server.route_shares(messages)
            elif p == 2:
                reply = r.server.collect_masked(messages)
            else:
                self._step(rt, r, r.server.unmask(messages))
                return
        except (SecAggAbort, ProtocolViolation) as err:
            self._fail(rt, r, PHASES[p], err)
            return
        r.replies[p] = reply
        for client, lease in r.leases.items():
            if client not in reply and client not in r.dropped:
                r.dropped[client] = PHASES[p]
                rt.close(lease, counted=False)
            elif client in reply:
                rt.extend(lease, 2 * self.phase_timeout)
        r.phase += 1
        self.progress += 1
        self._arm(rt, self.phase_timeout)
        self._maybe_close_phase(rt)

    def _step(self, rt, r: _Round, result) -> None:
        """Fold the decoded sum in as the one update its form makes of it, and step."""
        try:
            weighted = self.codec.decode(result.total, result.total_weight)
        except RingOverflowError as err:
            self._fail(rt, r, "unmask", err)
            return
        update = self.form.update(weighted, result.total_weight, self.codec.clip_range, r.base_version)
        rt.submit(SimpleNamespace(upload_seq=None, upload_norm=None), update)
        stepped = rt.flush()
        version = rt.aggregation.state.version
        survivors = set(result.survivors)
        for client, lease in r.leases.items():
            rt.close(lease, counted=client in survivors)
        outcome = {"status": "accepted" if stepped else "step_refused", "version": version}
        self.completed += 1
        self.last = {
            "round": r.number,
            "status": outcome["status"],
            "survivors": len(survivors),
            "total_weight": result.total_weight,
            "version": version,
        }
        log.info(
            "secure round %d: %d survivors, total weight %d, version %d",
            *(r.number, len(survivors), result.total_weight, version),
        )
        self._record(r, lambda client: outcome if client in survivors else self._dropped(r, client))
        self._end_round(rt)

    def _fail(self, rt, r: _Round, phase: str, err: Exception) -> None:
        log.warning("secure aggregation round %d failed, no step: %s", r.number, err)
        self.failed[phase] += 1
        outcome = {"status": "aborted", "phase": phase, "detail": str(err)}
        if isinstance(err, SecAggAbort):
            outcome |= {"alive": err.alive, "needed": err.needed}
        self.last = {"round": r.number} | outcome
        self._record(r, lambda client: outcome)
        self._end_round(rt)

    @staticmethod
    def _dropped(r: _Round, client: int) -> dict:
        return {"status": "dropped", "phase": r.dropped.get(client, "unmask")}

    def _record(self, r: _Round, outcome_of) -> None:
        for lease_id, client in r.members.items():
            seen = {"round": r.number, "client": client, "phase": "done", "outcome": outcome_of(client)}
            self.outcomes[lease_id] = (r.leases[client].client, seen)
        while len(self.outcomes) > 10_000:
            self.outcomes.popitem(last=False)

    def _end_round(self, rt) -> None:
        self.progress += 1
        rt.cancel_in_flight()
        self.open, self.current = False, None
        self.start(rt)

    # ---- what a participant sees ------------------------------------------------------
    def outcome(self, lease_id: str, client: str) -> dict | None:
        """The end of a round this lease took part in, once it ended (recent rounds)."""
        found = self.outcomes.get(lease_id)
        return found[1] if found is not None and found[0] == client else None

    def view(self, rt, lease) -> dict:
        """The round as participant `lease` sees it: parameters, the phase, and what it was sent."""
        r, client = self.join(lease)
        view = {
            "round": r.number,
            "client": client,
            "phase": PHASES[r.phase],
            "phase_deadline_in": round(max(0.0, r.deadline - rt.clock()), 3),
            "params": to_json(r.params),
            "encoding": {"clip_range": self.codec.clip_range, "max_total_weight": self.codec.max_total_weight}
            | self.form.encoding(),
        }
        for p, name in enumerate(REPLIES):
            if client in r.replies[p]:
                view[name] = to_json(r.replies[p][client])
        if client in r.dropped:
            view["outcome"] = self._dropped(r, client)
        return view

    # ---- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return super().state_dict() | {
            "secagg": {"completed": self.completed, "failed": dict(self.failed), "last": self.last}
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        s = state["secagg"]
        self.completed, self.failed, self.last = s["completed"], collections.Counter(s["failed"]), s["last"]
        self.current, self._lost = None, self.open

    def status(self) -> dict:
        r = self.current
        return super().status() | {
            "secure_aggregation": {
                "protocol": self.protocol,
                "clients": self.selected,
                "threshold": self.threshold,
                "neighbours": self.degree,
                "phase": PHASES[r.phase] if r is not None else None,
                "joined": len(r.members) if r is not None else 0,
                "completed_rounds": self.completed,
                "failed_rounds": dict(self.failed),
                "last_round": self.last,
            }
        }


def build_secure_policy(spec, settings, aggregator, length: int, bounds) -> SecureSyncPolicy | None:
    """The policy of a sync run with SecAgg / SecAgg+ (None for any other run); a ConfigError
    names what the network server cannot run securely. `length`: the model's; `bounds`: what an
    update may report (its example count is its weight)."""
    s = spec.secure_aggregation
    if s is None or s.protocol not in SYNC_PROTOCOLS:
        return None
    why = None
    if spec.privacy is not None:
        why = "privacy (DP) would need the noise added inside the secure sum"
    elif spec.scheduler.concurrency * (1 + spec.scheduler.over_selection) < 2:
        why = "a secure round needs at least 2 clients"
    if why is not None:
        raise ConfigError(f"run {spec.name!r}: secure_aggregation over HTTP: {why}")
    form = sum_form(spec, aggregator, length, bounds)
    return SecureSyncPolicy(spec, form, settings.lease_timeout, settings.secagg_phase_timeout)
