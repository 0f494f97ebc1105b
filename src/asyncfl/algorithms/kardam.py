"""Kardam's Lipschitz filter: a Byzantine filter made for updates that arrive one at a time.

Damaskinos, Guerraoui, Patra, Taziki, Rouault, "Asynchronous Byzantine Machine Learning (the
case of SGD)", ICML 2018. Rules that compare the updates of a round (median, trimmed mean) need
several updates at once; an asynchronous server sees one, computed on a model of its own age.
Kardam judges each update against its sender's previous one instead: worker p's empirical
Lipschitz coefficient

    k_p = ||g_p - g_p'|| / ||x_p - x_p'||

(g_p its update, computed at the model x_p it downloaded; g_p', x_p' its previous update and
that update's model) measures how much its gradient changed per unit of model change. An honest
worker's coefficient estimates the loss's smoothness; a worker that scales, flips or invents its
updates shows a larger one. An update is accepted when k_p is at most the (n - f) / n quantile
of the last `window` coefficients received (f / n = `byzantine_fraction`), so the f / n largest
are refused however large the attackers make them.

Here an update's delta (w_base - w_local) stands for the gradient: with the same local work for
every client it is a fixed multiple of an accumulated gradient, and the ratio of two such
coefficients does not depend on that multiple. Kardam's second component, the staleness-aware
dampening of an accepted gradient, is the wrapped algorithm's own staleness function (FedBuff's
and FedAsync's `staleness`). Not implemented: Kardam's frequency filter (it bounds how many
consecutive updates one worker may have accepted); in a federated population a worker's first
update has no coefficient and is accepted, as in the paper, so attackers each get one update in.
"""

from __future__ import annotations

import collections
import math

import torch

from asyncfl.algorithms.aggregators import Aggregator
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


class LipschitzFilter(Aggregator):
    """Accepts an update into `inner` (FedBuff, FedAsync) only if its sender's empirical
    Lipschitz coefficient passes Kardam's quantile test; a refused update is DISCARDED (the
    simulator counts it as discarded, the server logs it as discarded). Until `warmup`
    coefficients have been seen every update is accepted."""

    def __init__(self, inner: Aggregator, byzantine_fraction: float, window: int, warmup: int):
        super().__init__(inner.max_staleness)  # the server's stale answer names the inner bound
        if not 0 < byzantine_fraction < 0.5 or not 1 <= warmup <= window:
            raise ValueError(
                f"Kardam needs 0 < byzantine_fraction < 0.5 and 1 <= warmup <= window, got "
                f"byzantine_fraction={byzantine_fraction}, warmup={warmup}, window={window}"
            )
        self.inner = inner
        self.byzantine_fraction, self.window, self.warmup = byzantine_fraction, window, warmup
        self._reset()

    def _reset(self) -> None:
        # per client: its last update's delta and the model it was computed at
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.coefficients: collections.deque[float] = collections.deque(maxlen=self.window)
        self.accepted = self.rejected = 0
        self.refusal: str | None = None

    def refused(self) -> str | None:
        return self.refusal

    def threshold(self) -> float | None:
        """The (n - f) / n empirical quantile of the recent coefficients (the ceil(q m)-th
        smallest of m); None during the warm-up."""
        if len(self.coefficients) < self.warmup:
            return None
        ordered = sorted(self.coefficients)
        q = 1.0 - self.byzantine_fraction
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    def coefficient(self, update: ClientUpdate, base_w: torch.Tensor) -> float | None:
        """k_p against the sender's previous update; None when there is none, or when both were
        computed at the same model (no model change to divide by)."""
        prev = self.last.get(update.client_id)
        if prev is None:
            return None
        model_change = _norm(base_w - prev[1])
        if model_change == 0.0:
            return None
        return _norm(update.delta - prev[0]) / model_change

    def submit(self, state: ServerState, update: ClientUpdate, base_w: torch.Tensor) -> Verdict:
        self.refusal = None
        k = self.coefficient(update, base_w)
        self.last[update.client_id] = (update.delta, base_w)
        if k is not None:
            bar = self.threshold()
            self.coefficients.append(k)
            if bar is not None and not k <= bar:  # a NaN coefficient is refused too
                self.rejected += 1
                self.refusal = f"Kardam: Lipschitz coefficient {k:.4g} above the recent quantile {bar:.4g}"
                return Verdict.DISCARDED
        self.accepted += 1
        return self.inner.submit(state, update, base_w)

    def flush(self, state: ServerState) -> bool:
        return self.inner.flush(state)

    @property
    def pending(self) -> int:
        return self.inner.pending

    def downloads(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner.downloads(w)

    def status(self) -> dict:
        return self.inner.status() | {
            "filter": {
                "kind": "kardam",
                "accepted": self.accepted,
                "rejected": self.rejected,
                "threshold": self.threshold(),
            }
        }

    def state_dict(self) -> dict:
        ids = sorted(self.last)
        return {
            "inner": self.inner.state_dict(),
            "clients": ids,
            "deltas": [self.last[i][0].clone() for i in ids],
            "bases": [self.last[i][1].clone() for i in ids],
            "coefficients": list(self.coefficients),
            "accepted": self.accepted,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self._reset()
        for i, d, b in zip(state["clients"], state["deltas"], state["bases"], strict=True):
            self.last[int(i)] = (d.clone(), b.clone())
        self.coefficients.extend(state["coefficients"])
        self.accepted, self.rejected = state["accepted"], state["rejected"]
