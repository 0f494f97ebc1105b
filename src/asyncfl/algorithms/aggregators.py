"""Aggregators: how client updates fold into the global model.

They know nothing of clocks, threads or HTTP: the simulator and the network server call the
same objects. Whether a round barrier exists is the scheduling policy's business; it calls
`flush` when a round closes. `submit` either buffers, steps, or discards an update.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from asyncfl.algorithms.server_opt import ServerOptimizer
from asyncfl.algorithms.staleness import StalenessFn
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict, clone_or_none
from asyncfl.privacy.dp import clip

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

    def refused(self) -> str | None:
        """Why the last `submit` was DISCARDED when a Byzantine filter, not staleness, refused
        it (the server answers 422 with it); None otherwise."""
        return None

    def flush(self, state: ServerState) -> bool:
        """Close a round: apply whatever is buffered. True when the model stepped."""
        return False

    @property
    def pending(self) -> int:
        return 0

    def downloads(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors a client downloads with the model `w`, by name (SCAFFOLD's control variate);
        empty for algorithms whose clients need the model alone. They change only when the
        model steps, and never in place, so a trip may hold them as a snapshot."""
        return {}

    def privacy_report(self) -> dict | None:
        """Epsilon and DP settings for a differentially private aggregator; None otherwise."""
        return None

    def status(self) -> dict:
        """What the server's /status shows of this aggregator (JSON-able): the buffer's fill and
        size (None: no size trigger) and the privacy report."""
        return {"buffer": {"fill": self.pending, "size": None}, "privacy": self.privacy_report()}

    def state_dict(self) -> dict:
        """Everything a restarted server needs to continue exactly (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 (stateless aggregators restore nothing)
        pass


def clipped(delta: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """The update with its L2 norm bounded by clip_norm (one client's influence is bounded)."""
    return delta if clip_norm is None else clip(delta, clip_norm)[0]


class BufferingAggregator(Aggregator):
    """Accumulates updates; steps at the round barrier (`flush`) or every `buffer_size`."""

    def __init__(self, buffer_size: int | None, max_staleness: int | None):
        super().__init__(max_staleness)
        self.buffer_size = buffer_size
        self._reset()

    def _reset(self) -> None:
        self.count = 0

    @property
    def pending(self) -> int:
        return self.count

    def discard(self) -> None:
        """Drop what is buffered without stepping (a secure round whose sum could not be unmasked)."""
        self._reset()

    def status(self) -> dict:
        return super().status() | {"buffer": {"fill": self.count, "size": self.buffer_size}}

    def _added(self, state: ServerState) -> Verdict:
        self.count += 1
        if self.buffer_size is not None and self.count >= self.buffer_size:
            self.flush(state)
            return Verdict.STEPPED
        return Verdict.BUFFERED


class BufferedAggregator(BufferingAggregator):
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
        clip_norm: float | None = None,
    ):
        if normalize not in ("count", "weight"):
            raise ValueError(f"normalize must be 'count' or 'weight', got {normalize!r}")
        self.server_opt = server_opt
        self.weight = weight
        self.normalize = normalize
        self.clip_norm = clip_norm
        super().__init__(buffer_size, max_staleness)

    def _reset(self) -> None:
        super()._reset()
        self.total: torch.Tensor | None = None
        self.weight_sum = 0.0

    def submit(self, state, update, base_w):
        if self.too_stale(state, update):
            return Verdict.DISCARDED
        a = self.weight(update, state.version - update.base_version)
        delta = clipped(update.delta, self.clip_norm)
        if self.total is None:
            self.total = delta * a
        else:
            self.total.add_(delta, alpha=a)  # in place: this runs once per client update
        self.weight_sum += a
        return self._added(state)

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
            "total": clone_or_none(self.total),
            "count": self.count,
            "weight_sum": self.weight_sum,
            "server_opt": self.server_opt.state_dict(),
        }

    def load_state_dict(self, state):
        self.total = clone_or_none(state["total"])
        self.count = state["count"]
        self.weight_sum = state["weight_sum"]
        self.server_opt.load_state_dict(state["server_opt"])


def fedavg(
    server_opt: ServerOptimizer, clip_norm: float | None = None, partial_weight: str = "full"
) -> BufferedAggregator:
    """Example-weighted average of a round's updates, p_k = n_k / sum n. A straggler's partial
    update counts at its full n_k, as in FedProx's reference implementation; with
    partial_weight 'work_fraction' at n_k times the share of its planned steps it did."""
    if partial_weight == "full":
        return BufferedAggregator(server_opt, lambda u, d: u.n_examples, normalize="weight", clip_norm=clip_norm)
    if partial_weight == "work_fraction":
        return BufferedAggregator(
            server_opt, lambda u, d: u.n_examples * u.work_fraction, normalize="weight", clip_norm=clip_norm
        )
    raise ValueError(f"partial_weight must be 'full' or 'work_fraction', got {partial_weight!r}")


def fedbuff(
    server_opt: ServerOptimizer,
    buffer_size: int,
    staleness: StalenessFn,
    example_weight: str = "uniform",
    normalize: str = "count",
    max_staleness: int | None = None,
    clip_norm: float | None = None,
    aggregation: str = "mean",
    trim_fraction: float = 0.1,
) -> BufferingAggregator:
    """FedBuff's step every K updates: the mean of the deltas weighted by s(d) e(n), or a robust
    rule over the weighted deltas (`RobustAggregator`)."""
    e = EXAMPLE_WEIGHTS[example_weight]

    def weight(u: ClientUpdate, d: int) -> float:
        return staleness(d) * e(u.n_examples)

    if aggregation != "mean":
        return RobustAggregator(server_opt, aggregation, trim_fraction, clip_norm, max_staleness, weight, buffer_size)
    return BufferedAggregator(
        server_opt,
        weight,
        normalize=normalize,
        buffer_size=buffer_size,
        max_staleness=max_staleness,
        clip_norm=clip_norm,
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


class RobustAggregator(BufferingAggregator):
    """Byzantine-robust aggregation: the coordinate-wise median or trimmed mean of the buffered
    (optionally clipped) deltas replaces the weighted mean, so a minority of clients sending
    scaled or sign-flipped updates cannot drag the model (Yin et al. 2018). It has to hold every
    delta of the round or buffer, so it suits rounds and buffers of modest size.

    `weight` (FedBuff's staleness weight s(d) e(n)) scales each delta before the rule, so that
    with every weight 1 this is the plain rule and a stale update moves each coordinate's order
    statistics as little as it moves FedBuff's mean (the mean of the scaled deltas is FedBuff's
    count-normalised step). `buffer_size` steps every K updates; None waits for the barrier."""

    RULES = ("median", "trimmed_mean")

    def __init__(
        self,
        server_opt: ServerOptimizer,
        rule: str,
        trim_fraction: float = 0.1,
        clip_norm: float | None = None,
        max_staleness: int | None = None,
        weight: Callable[[ClientUpdate, int], float] | None = None,
        buffer_size: int | None = None,
    ):
        if rule not in self.RULES:
            raise ValueError(f"robust rule must be one of {self.RULES}, got {rule!r}")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.server_opt, self.rule, self.trim_fraction, self.clip_norm = server_opt, rule, trim_fraction, clip_norm
        self.weight = weight
        super().__init__(buffer_size, max_staleness)

    def _reset(self) -> None:
        super()._reset()
        self.deltas: list[torch.Tensor] = []

    def submit(self, state, update, base_w):
        if self.too_stale(state, update):
            return Verdict.DISCARDED
        delta = clipped(update.delta, self.clip_norm)
        if self.weight is not None:
            delta = delta * self.weight(update, state.version - update.base_version)
        self.deltas.append(delta)
        return self._added(state)

    def combine(self, deltas: torch.Tensor) -> torch.Tensor:
        ordered = torch.sort(deltas, dim=0).values
        m = len(deltas)
        if self.rule == "median":  # the mean of the two middle values when m is even
            return ordered[(m - 1) // 2 : m // 2 + 1].mean(0)
        cut = math.floor(self.trim_fraction * m)
        return ordered[cut : m - cut].mean(0)

    def flush(self, state):
        if not self.deltas:
            return False
        state.w = self.server_opt.step(state.w, self.combine(torch.stack(self.deltas)))
        state.version += 1
        self._reset()
        return True

    def state_dict(self):
        return {"deltas": [d.clone() for d in self.deltas], "server_opt": self.server_opt.state_dict()}

    def load_state_dict(self, state):
        self.deltas = [d.clone() for d in state["deltas"]]
        self.count = len(self.deltas)
        self.server_opt.load_state_dict(state["server_opt"])


class QFedAvg(BufferingAggregator):
    """q-FedAvg (Li et al. 2020, q-FFL): clients with a higher loss F_k at the downloaded model
    weigh more, q = 0 being FedAvg-like and larger q fairer. With dw_k = L delta_k (L = 1/lr):
    w <- w - sum_k F_k^q dw_k / sum_k (q F_k^(q-1) |dw_k|^2 + L F_k^q), at the round barrier, or
    every `buffer_size` updates when run asynchronously."""

    def __init__(self, q: float, lipschitz: float, buffer_size: int | None = None, max_staleness: int | None = None):
        if q < 0 or lipschitz <= 0:
            raise ValueError(f"q-FedAvg needs q >= 0 and L > 0, got q={q}, L={lipschitz}")
        self.q, self.lipschitz = q, lipschitz
        super().__init__(buffer_size, max_staleness)

    def _reset(self) -> None:
        super()._reset()
        self.numerator: torch.Tensor | None = None
        self.denominator = 0.0

    def submit(self, state, update, base_w):
        if self.too_stale(state, update):
            return Verdict.DISCARDED
        f = update.start_loss
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"q-FedAvg needs the client's loss at the downloaded model, got {f}")
        f = max(f, 1e-10)  # F^(q-1) at F = 0 would divide by zero
        dw = self.lipschitz * update.delta
        part = f**self.q * dw
        self.numerator = part if self.numerator is None else self.numerator.add_(part)
        self.denominator += self.q * f ** (self.q - 1) * float(dw.pow(2).sum()) + self.lipschitz * f**self.q
        return self._added(state)

    def flush(self, state):
        if self.count == 0:
            return False
        state.w = state.w - self.numerator / self.denominator
        state.version += 1
        self._reset()
        return True

    def state_dict(self):
        return {"numerator": clone_or_none(self.numerator), "denominator": self.denominator, "count": self.count}

    def load_state_dict(self, state):
        self.numerator = clone_or_none(state["numerator"])
        self.denominator, self.count = state["denominator"], state["count"]
