"""Upload handling: validate an update, apply the lease rule, let the policy fold it in, log it,
and answer once the answer is durable. A re-send (same client, same idempotency key) gets the
first answer, from memory while recent, else from the update log."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable

from asyncfl.algorithms.types import ClientUpdate, Verdict
from asyncfl.server.auth import user_id
from asyncfl.server.coordinator import base_mismatch
from asyncfl.server.durability import GroupCommit
from asyncfl.server.errors import ApiError
from asyncfl.server.reports import ReportBounds
from asyncfl.server.shared import Shared

log = logging.getLogger("asyncfl.server")


def client_update(client: str, h, checked) -> ClientUpdate:
    """What the aggregator folds of a checked upload."""
    return ClientUpdate(
        client_id=user_id(client),
        base_version=h.base_version,
        delta=checked.delta,
        n_examples=h.n_examples,
        steps=h.steps,
        loss=math.nan if h.loss is None else h.loss,
        start_loss=math.nan if h.start_loss is None else h.start_loss,
        planned_steps=h.planned_steps,
        extras=checked.extras,
        masked=checked.masked,
    )


def stale_answer(seq: int, version: int, staleness: int, max_staleness: int | None) -> dict:
    return {
        "error": "stale",
        "seq": seq,
        "version": version,
        "detail": f"staleness {staleness} exceeds max_staleness {max_staleness}; update discarded",
    }


def accepted_answer(verdict: str, seq: int, staleness: int, version: int) -> dict:
    return {"status": "accepted", "verdict": verdict, "seq": seq, "staleness": staleness, "version": version}


class Uploads:
    """Once an upload names a live lease, the trip is over whatever comes of it: an upload
    refused after that point (a reported value out of bounds, the norm guard, a refused step,
    or a server fault) ends the lease, reopens its slot for the policy (`on_lost`) and is
    logged with its answer, so a re-send gets the same answer. `vet` (with a TSA: `TsaLink.vet`)
    judges a masked upload before the lock is taken; the refusal it returns ends the lease the
    same way."""

    def __init__(
        self,
        shared: Shared,
        commit: GroupCommit,
        bounds: ReportBounds,
        algorithm: str,
        vet: Callable[[object], ApiError | None] | None = None,
    ):
        self.shared, self.commit = shared, commit
        self.bounds, self.algorithm, self.vet = bounds, algorithm, vet
        self.next_seq = 1
        self._inflight: dict[tuple[str, str], tuple[int, dict, int]] = {}

    def restore(self) -> None:
        """Under the state lock, from the last durable state."""
        self.next_seq = (self.shared.store.query("SELECT max(seq) FROM updates")[0][0] or 0) + 1
        self._inflight = {}

    def upload(self, client: str, body: bytes) -> tuple[int, dict]:
        """Validate, fold, persist, answer; (status, body). Raises ApiError for bad input."""
        sh = self.shared
        t0 = time.perf_counter()
        with sh.lock:
            sh.counters.traffic["upload_body_bytes"] += len(body)
        try:
            checked = sh.aggregation.check(body)  # no lock: pure, the expensive part
            h = checked.header
            key = (client, h.idempotency_key)
            with sh.lock:
                pending = self._inflight.get(key)
            if pending is None:
                replay = sh.store.query("SELECT status, response FROM updates WHERE client=? AND idem_key=?", key)
                if replay:
                    return replay[0][0], json.loads(replay[0][1]) | {"replayed": True}
                refusal = None if self.vet is None or checked.masked is None else self.vet(checked.masked)
                with sh.lock:
                    pending = self._inflight.get(key)
                    if pending is None:
                        status, answer, epoch = self._fold(client, h, checked, refusal)
            if pending is not None:  # a re-send: the first answer, once it is durable
                status, answer, epoch = pending
                self.commit.sync(epoch)
                return status, answer | {"replayed": True}
            self.commit.sync(epoch)
            sh.counters.latency.append(time.perf_counter() - t0)
            return status, answer
        except ApiError as err:
            sh.counters.rejected[err.code] += 1
            raise

    def _fold(self, client: str, h, checked, refusal: ApiError | None = None) -> tuple[int, dict, int]:
        """Under the state lock: the lease rule, then the policy folds the update in (unless
        vetting refused it)."""
        sh, counters = self.shared, self.shared.counters
        lease = sh.coordinator.active_lease(h.lease_id, client, sh.store)
        if h.base_version != lease.base_version:
            raise base_mismatch(h.base_version, lease.lease_id, lease.base_version)
        seq = self.next_seq
        version_before = sh.aggregation.state.version
        staleness = version_before - h.base_version
        try:
            if refusal is not None:
                raise refusal
            self.bounds.check(h, self.algorithm)
            sh.aggregation.screen(checked.norm)
            verdict = sh.coordinator.report(lease, client_update(client, h, checked), seq, checked.norm)
        except Exception as err:  # the lease ends and its slot reopens, whatever went wrong
            sh.coordinator.release(lease, seq)
            if not isinstance(err, ApiError):
                log.exception("folding upload %d of client %s failed", seq, client)
                err = ApiError(500, "internal", f"the server failed folding this update ({type(err).__name__})")
            log.warning("upload %d of client %s rejected: %s: %s", seq, client, err.code, err.detail)
            counters.rejected[err.code] += 1
            answer = err.body() | {"seq": seq, "version": sh.aggregation.state.version}
            return self._logged(client, h, checked, seq, version_before, staleness, "rejected", err.status, answer)
        version = sh.aggregation.state.version
        if verdict == Verdict.DISCARDED:
            status, answer = 409, stale_answer(seq, version, staleness, sh.aggregation.aggregator.max_staleness)
            counters.rejected["stale"] += 1
        elif verdict is None:  # the policy did not submit it
            status, answer = (
                409,
                {
                    "error": "lease_cancelled",
                    "seq": seq,
                    "version": version,
                    "detail": "the round closed before this update could count",
                },
            )
        else:
            status, answer = 200, accepted_answer(verdict.value, seq, staleness, version)
        return self._logged(
            client, h, checked, seq, version_before, staleness, verdict.value if verdict else "none", status, answer
        )

    def _logged(
        self, client, h, checked, seq, version_before, staleness, verdict: str, status: int, answer: dict
    ) -> tuple[int, dict, int]:
        """The upload's row in the update log, and its answer kept for re-sends."""
        counters = self.shared.counters
        self.commit.rows.append(
            (
                seq,
                client,
                h.idempotency_key,
                h.lease_id,
                h.base_version,
                version_before,
                staleness,
                h.n_examples,
                h.steps,
                h.loss,
                checked.norm,
                verdict,
                time.time(),
                status,
                json.dumps(answer),
            )
        )
        self.next_seq += 1
        counters.traffic["upload_payload_bytes"] += checked.payload_bytes
        counters.traffic["uploads_decoded"] += 1
        epoch = self.commit.epoch
        self._inflight[(client, h.idempotency_key)] = (status, answer, epoch)
        if len(self._inflight) > 10_000:  # recent answers; older ones are found in the update log
            self._inflight.pop(next(iter(self._inflight)))
        return status, answer, epoch
