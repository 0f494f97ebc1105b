"""What a selector hands a task's aggregator: the body of a `partials` row.

A selector that accepted several updates in one commit sends, when the run's aggregator folds
updates linearly (BufferedAggregator: FedAvg, FedBuff), their staleness-weighted sum alone, so
an aggregator reads one tensor per commit instead of one per client. Other aggregators
(FedAsync steps per update, robust rules order the deltas, filters judge each one) need every
update as it came: one partial per update. Staleness is judged by the selector against the
version it knows when the upload arrives, as the single process judges it on arrival.

With secure aggregation by the TSA the updates are masked: a selector sums up to K of them in
the ring, each times its integer weight (tsa_buffer's), and hands over that ring sum with the
list of its contributions (lease id, weight, sealed seed) the TSA will need to unmask it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from asyncfl.algorithms.aggregators import Aggregator, BufferedAggregator, clipped
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.secagg import MaskedBuffer
from asyncfl.server.store import tensor_bytes, tensor_load
from asyncfl.server.tsa_buffer import MaskedFedBuff

FORMAT = 1


def merges(aggregator: Aggregator) -> bool:
    """True when the task's updates may reach its aggregator pre-summed: BufferedAggregator's
    fold is a weighted sum, which adds up the same whichever process sums which part. Exactly
    that class: a subclass may fold differently."""
    return type(aggregator) is BufferedAggregator


@dataclass
class Partial:
    """Either a weighted sum of `count` updates (`total` = sum of a_i clip(delta_i), `weight_sum`
    = sum of a_i, with a_i the aggregator's weight at the update's staleness), or one update
    (`update`, count 1, weight_sum 0) with the `staleness` it was accepted at, or a masked ring
    sum (`masked`: MaskedFedBuff.buffer_state's form; weight_sum: its integer weights' sum)."""

    count: int
    weight_sum: float
    total: torch.Tensor | None = None
    update: ClientUpdate | None = None
    staleness: int | None = None
    masked: dict | None = None

    @property
    def merged(self) -> bool:
        return self.update is None and self.masked is None

    @classmethod
    def masked_sum(cls, aggregator: MaskedFedBuff, buffer: MaskedBuffer) -> Partial:
        """A ring sum of masked uploads (`buffer`, not closed) as a partial."""
        state = aggregator.buffer_state(buffer)
        return cls(count=len(buffer.contributions), weight_sum=float(buffer.total_weight), masked=state)

    def fold_masked(self, aggregator: MaskedFedBuff) -> None:
        """Add this ring sum and its contributions to the open buffer (refused past the ring's
        capacity, or for an update id already in it); closing it is the caller's decision."""
        part, buffer = aggregator.buffer_of(self.masked), aggregator.open
        if any(c.update_id == o.update_id for c in part.contributions for o in buffer.contributions):
            raise ValueError("a masked partial names an update already in the open buffer")
        aggregator.codec.check_weight(buffer.total_weight + part.total_weight)
        buffer.total = aggregator.codec.ring.add(buffer.total, part.total)
        buffer.contributions.extend(part.contributions)

    @classmethod
    def single(cls, update: ClientUpdate, staleness: int) -> Partial:
        return cls(count=1, weight_sum=0.0, update=update, staleness=staleness)

    def add(self, aggregator: BufferedAggregator, update: ClientUpdate, staleness: int) -> None:
        """Fold one accepted update into this sum, as BufferedAggregator.submit folds it."""
        a = aggregator.weight(update, staleness)
        delta = clipped(update.delta, aggregator.clip_norm)
        if self.total is None:
            self.total = delta * a
        else:
            self.total.add_(delta, alpha=a)
        self.weight_sum += a
        self.count += 1

    def fold_into(self, aggregator: BufferedAggregator) -> None:
        """Add this sum to the aggregator's buffer (its count, weight sum and total); whether to
        step is the caller's decision (`aggregator.buffer_size`)."""
        if aggregator.total is None:
            aggregator.total = self.total.clone()
        else:
            aggregator.total.add_(self.total)
        aggregator.count += self.count
        aggregator.weight_sum += self.weight_sum


def empty() -> Partial:
    """A sum of no updates, to `add` to."""
    return Partial(count=0, weight_sum=0.0)


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def encode_partial(p: Partial) -> bytes:
    if p.masked is not None:
        return tensor_bytes({"format": FORMAT, "kind": "masked", "buffer": p.masked})
    if p.merged:
        if p.count < 1 or p.total is None:
            raise ValueError("a partial sum holds at least one update")
        body = {"format": FORMAT, "kind": "sum", "total": p.total, "count": p.count, "weight_sum": p.weight_sum}
        return tensor_bytes(body)
    u = p.update
    body = {
        "format": FORMAT,
        "kind": "single",
        "delta": u.delta,
        "extras": u.extras,
        "staleness": p.staleness,
        "client_id": u.client_id,
        "base_version": u.base_version,
        "n_examples": u.n_examples,
        "steps": u.steps,
        "loss": _number(u.loss),
        "start_loss": _number(u.start_loss),
        "planned_steps": u.planned_steps,
    }
    return tensor_bytes(body)


def decode_partial(data: bytes) -> Partial:
    body = tensor_load(bytes(data))
    if body.get("format") != FORMAT:
        raise ValueError(f"partial of format {body.get('format')!r}; this asyncfl reads format {FORMAT}")
    if body["kind"] == "masked":
        rows = body["buffer"]["contributions"]
        return Partial(count=len(rows), weight_sum=float(sum(w for _, w, _ in rows)), masked=body["buffer"])
    if body["kind"] == "sum":
        return Partial(count=body["count"], weight_sum=body["weight_sum"], total=body["total"])
    update = ClientUpdate(
        client_id=body["client_id"],
        base_version=body["base_version"],
        delta=body["delta"],
        n_examples=body["n_examples"],
        steps=body["steps"],
        loss=math.nan if body["loss"] is None else body["loss"],
        start_loss=math.nan if body["start_loss"] is None else body["start_loss"],
        planned_steps=body["planned_steps"],
        extras=body["extras"],
    )
    return Partial.single(update, body["staleness"])
