"""The selector role: a client checks in and is either assigned a training task (a lease) or
told to come back later. It decides nothing about concurrency itself: it asks the coordinator
for a free slot, which exists only when the scheduling policy opened one."""

from __future__ import annotations

import random
from collections.abc import Callable

from asyncfl.server.coordinator import Coordinator, Lease


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
            # jitter spreads a herd of waiting clients over time
            wait = self.retry_after * random.uniform(0.75, 1.25)
            why = "not eligible" if not eligible else "concurrency limit reached; no slot is open"
            return {"action": "retry", "retry_after": round(wait, 3), "reason": why}, None
        self.assigned += 1
        answer = {
            "action": "train",
            "lease_id": lease.lease_id,
            "base_version": lease.base_version,
            "model_url": f"/v1/model/{lease.base_version}",
            "seed": lease.seed,
            "lease_expires_in": round(lease.expires_at - self.coordinator.clock(), 3),
        }
        deadline = self.coordinator.round_deadline()
        if deadline is not None:
            answer["round_deadline_in"] = round(max(0.0, deadline), 3)
        return answer, lease
