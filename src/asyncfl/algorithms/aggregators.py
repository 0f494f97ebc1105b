"""Aggregators: how client updates fold into the global model (SPEC §3).

They know nothing of clocks, threads or HTTP: the simulator and the network server call the
same objects. Whether a round barrier exists is the scheduling policy's business; it calls
`flush` when a round closes. `submit` either buffers, steps, or discards an update.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from asyncfl.algorithms.server_opt import ServerOptimizer
from asyncfl.algorithms.staleness import StalenessFn
from asyncfl.algorithms.update import ClientUpdate


@dataclass
class ServerState:
    w: torch.Tensor
    version: int = 0


class Verdict(str, Enum):
    BUFFERED = "buffered"
    STEPPED = "stepped"
    DISCARDED = "discarded"


EXAMPLE_WEIGHTS: dict[str, Callable[[int], float]] = {
    "uniform": lambda n: 1.0,
    "n": lambda n: float(n),
    "sqrt": lambda n: math.sqrt(n),
    "log": lambda n: math.log1p(n),
}


class Aggregator(ABC):
    def __init__(self, max_staleness: int | None = None):
        self.max_staleness = max_staleness

    def too_stale(self, state: ServerState, update: ClientUpdate) -> bool:
        return self.max_staleness is not None and state.version - update.base_version > self.max_staleness

    @abstractmethod
    def submit(self, state: ServerState, update: ClientUpdate, base_w: torch.Tensor) -> Verdict:
        """Fold one update in; `base_w` is the model the client started from."""

    def flush(self, state: ServerState) -> bool:
        """Close a round: apply whatever is buffered. True when the model stepped."""
        return False

    @property
    def pending(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BufferedAggregator(Aggregator):
    """Weighted sum of deltas; the server optimizer steps with the normalised sum.

    FedAvg, FedProx and FedBuff are all this mechanism with different weights, normaliser and
    trigger: FedAvg weighs by n_k, divides by the weight sum and steps at the round barrier;
    FedBuff weighs by s(d) e(n_k), divides by the count and steps every K updates.
    """

    def __init__(
        self,
        server_opt: ServerOptimizer,
        weight: Callable[[ClientUpdate, int], float],
        normalize: str = "count",
        buffer_size: int | None = None,
        max_staleness: int | None = None,
    ):
        super().__init__(max_staleness)
        if normalize not in ("count", "weight"):
            raise ValueError(f"normalize must be 'count' or 'weight', got {normalize!r}")
        self.server_opt = server_opt
        self.weight = weight
        self.normalize = normalize
        self.buffer_size = buffer_size
        self._reset()

    def _reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0
        self.weight_sum = 0.0

    @property
    def pending(self) -> int:
        return self.count

    def submit(self, state, update, base_w):
        if self.too_stale(state, update):
            return Verdict.DISCARDED
        a = self.weight(update, state.version - update.base_version)
        if self.total is None:
            self.total = update.delta * a
        else:
            self.total.add_(update.delta, alpha=a)  # in place: this runs once per client update
        self.count += 1
        self.weight_sum += a
        if self.buffer_size is not None and self.count >= self.buffer_size:
            self.flush(state)
            return Verdict.STEPPED
        return Verdict.BUFFERED

    def flush(self, state):
        if self.count == 0:
            return False
        denom = self.count if self.normalize == "count" else self.weight_sum
        if denom > 0:
            state.w = self.server_opt.step(state.w, self.total / denom)
            state.version += 1
        stepped = denom > 0
        self._reset()
        return stepped

    def state_dict(self):
        return {
            "total": None if self.total is None else self.total.clone(),
            "count": self.count,
            "weight_sum": self.weight_sum,
            "server_opt": self.server_opt.state_dict(),
        }

    def load_state_dict(self, state):
        self.total = None if state["total"] is None else state["total"].clone()
        self.count = state["count"]
        self.weight_sum = state["weight_sum"]
        self.server_opt.load_state_dict(state["server_opt"])


def fedavg(server_opt: ServerOptimizer) -> BufferedAggregator:
    """Example-weighted average of a round's updates: p_k = n_k / sum n."""
    return BufferedAggregator(server_opt, lambda u, d: float(u.n_examples), normalize="weight")


def fedbuff(
    server_opt: ServerOptimizer,
    buffer_size: int,
    staleness: StalenessFn,
    example_weight: str = "uniform",
    normalize: str = "count",
    max_staleness: int | None = None,
) -> BufferedAggregator:
    e = EXAMPLE_WEIGHTS[example_weight]
    return BufferedAggregator(
        server_opt,
        lambda u, d: staleness(d) * e(u.n_examples),
        normalize=normalize,
        buffer_size=buffer_size,
        max_staleness=max_staleness,
    )


class FedAsync(Aggregator):
    """w <- (1 - alpha_t) w + alpha_t x_new with alpha_t = alpha s(t - tau), one step per update."""

    def __init__(self, alpha: float, staleness: StalenessFn, max_staleness: int | None = None):
        super().__init__(max_staleness)
        if not 0 < alpha <= 1:
            raise ValueError(f"FedAsync alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = staleness

    def mixing_rate(self, staleness: int) -> float:
        return self.alpha * self.staleness(staleness)

    def submit(self, state, update, base_w):
        if self.too_stale(state, update):
            return Verdict.DISCARDED
        a = self.mixing_rate(state.version - update.base_version)
        x_new = base_w - update.delta
        state.w = (1 - a) * state.w + a * x_new
        state.version += 1
        return Verdict.STEPPED
