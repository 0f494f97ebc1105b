"""The selector role: a client checks in and is either assigned a training task (a lease) or
told to come back later. It decides nothing about concurrency itself: it asks the coordinator
for a free slot, which exists only when the scheduling policy opened one."""

from __future__ import annotations

import random
from collections.abc import Callable

from asyncfl.server.coordinator import Coordinator, Lease


def retry_answer(retry_after: float, eligible: bool) -> dict:
    """Come back later: jitter spreads a herd of waiting clients over time."""
    wait = retry_after * random.uniform(0.75, 1.25)
    why = "not eligible" if not eligible else "concurrency limit reached; no slot is open"
    return {"action": "retry", "retry_after": round(wait, 3), "reason": why}


def train_answer(lease_id: str, base_version: int, seed: int, expires_in: float) -> dict:
    return {
        "action": "train",
        "lease_id": lease_id,
        "base_version": base_version,
        "model_url": f"/v1/model/{base_version}",
        "seed": seed,
        "lease_expires_in": round(expires_in, 3),
    }


class Selector:
    def __init__(self, coordinator: Coordinator, retry_after: float, done: Callable[[], bool]):
        self.coordinator, self.retry_after, self.done = coordinator, retry_after, done
        self.assigned = self.deferred = 0

    def checkin(self, client: str, eligible: bool) -> tuple[dict, Lease | None]:
        """(answer, lease); a client that already holds a lease gets the same one back, so a
        client that lost its answer (timeout, restart) can safely check in again."""
        if self.done():
            return {"action": "stop", "reason": "the run has finished"}, None
        lease = self.coordinator.claim(client) if eligible else None
        if lease is None:
            self.deferred += 1
            return retry_answer(self.retry_after, eligible), None
        self.assigned += 1
        answer = train_answer(
            lease.lease_id, lease.base_version, lease.seed, lease.expires_at - self.coordinator.clock()
        )
        deadline = self.coordinator.round_deadline()
        if deadline is not None:
            answer["round_deadline_in"] = round(max(0.0, deadline), 3)
        return answer, lease
