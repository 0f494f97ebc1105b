"""FedNova (Wang et al. 2020): normalized averaging of heterogeneous local work.

Plain weighted averaging of deltas biases the model toward clients that took more local steps
(objective inconsistency). FedNova divides each delta by the size of the client's local work,
||a_i||_1, and steps with tau_eff * sum_i p_i d_i, d_i = delta_i / ||a_i||_1,
tau_eff = sum_i p_i ||a_i||_1. With tau_i plain SGD steps ||a_i||_1 = tau_i; with a proximal term
mu at learning rate eta, the gradient taken k steps before the last enters the delta with weight
(1 - eta mu)^k, so ||a_i||_1 = (1 - (1 - eta mu)^tau_i) / (eta mu). p_i = w_i / sum w over the
round (or buffer), w_i = s(staleness) e(n_i): s(0) = 1 in sync rounds, so there p_i = n_i / sum n
with e(n) = n.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from asyncfl.algorithms.aggregators import BufferingAggregator, clipped
from asyncfl.algorithms.server_opt import ServerOptimizer
from asyncfl.algorithms.types import ClientUpdate, Verdict, clone_or_none


def local_work(steps: int, lr: float, mu: float) -> float:
    """||a||_1: the sum of the weights the local gradients enter the delta with (in units of lr)."""
    if mu == 0:
        return float(steps)
    return (1.0 - (1.0 - lr * mu) ** steps) / (lr * mu)


class FedNova(BufferingAggregator):
    """Accumulates sum w_i d_i, sum w_i ||a_i||_1 and sum w_i; steps at the round barrier
    (`flush`) or every `buffer_size` updates.

    tau_i is the update's `steps` (the steps actually taken, so partial work is normalized, not
    overweighted), clamped to `max_steps` when set: a client's claim is not trusted blindly, since
    tau_i scales tau_eff and so everyone's step. An update with steps < 1 carries no local work to
    normalize by and is discarded.
    """

    def __init__(
        self,
        server_opt: ServerOptimizer,
        weight: Callable[[ClientUpdate, int], float],
        lr: float,
        mu: float = 0.0,
        buffer_size: int | None = None,
        max_staleness: int | None = None,
        clip_norm: float | None = None,
        max_steps: int | None = None,
    ):
        if mu < 0 or lr <= 0 or lr * mu >= 1:
            raise ValueError(
                f"FedNova needs lr > 0, mu >= 0 and lr x mu < 1 (the proximal term would "
                f"overshoot), got lr={lr:g}, mu={mu:g}"
            )
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"FedNova max_steps must be at least 1, got {max_steps}")
        self.server_opt, self.weight, self.lr, self.mu = server_opt, weight, lr, mu
        self.clip_norm, self.max_steps = clip_norm, max_steps
        super().__init__(buffer_size, max_staleness)

    def _reset(self) -> None:
        super()._reset()
        self.normalized: torch.Tensor | None = None  # sum_i w_i d_i
        self.work = 0.0  # sum_i w_i ||a_i||_1
        self.weight_sum = 0.0

    def steps_counted(self, update: ClientUpdate) -> int:
        return update.steps if self.max_steps is None else min(update.steps, self.max_steps)

    def submit(self, state, update, base_w):
        if self.too_stale(state, update) or update.steps < 1:
            return Verdict.DISCARDED
        w = self.weight(update, state.version - update.base_version)
        a = local_work(self.steps_counted(update), self.lr, self.mu)
        d = clipped(update.delta, self.clip_norm)
        if self.normalized is None:
            self.normalized = d * (w / a)
        else:
            self.normalized.add_(d, alpha=w / a)  # in place: this runs once per client update
        self.work += w * a
        self.weight_sum += w
        return self._added(state)

    def pseudo_gradient(self) -> torch.Tensor:
        """tau_eff * sum_i p_i d_i with p_i = w_i / sum w."""
        return self.normalized * (self.work / self.weight_sum**2)

    def flush(self, state):
        if self.count == 0:
            return False
        stepped = self.weight_sum > 0
        if stepped:
            state.w = self.server_opt.step(state.w, self.pseudo_gradient())
            state.version += 1
        self._reset()
        return stepped

    def state_dict(self):
        return {
            "normalized": clone_or_none(self.normalized),
            "work": self.work,
            "weight_sum": self.weight_sum,
            "count": self.count,
            "server_opt": self.server_opt.state_dict(),
        }

    def load_state_dict(self, state):
        self.normalized = clone_or_none(state["normalized"])
        self.work, self.weight_sum, self.count = state["work"], state["weight_sum"], state["count"]
        self.server_opt.load_state_dict(state["server_opt"])
