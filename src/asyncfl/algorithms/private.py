"""Central user-level differential privacy as an aggregator: DP-FedAvg / DP-FedBuff.

`PrivateAggregator` is the buffered mechanism of `aggregators.BufferedAggregator` with the
three changes the Gaussian mechanism needs (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"):

1. every (decoded) client update is clipped to L2 norm C (`asyncfl.privacy.clip`);
2. at each server step (a FedBuff buffer of K updates, or a FedAvg round at its barrier) the
   weighted sum S = sum_i w_i clip(delta_i) gets N(0, (sigma * C * w_max)^2) per coordinate
   (`asyncfl.privacy.add_gaussian_noise`), where w_max bounds every weight a priori: the
   weights used here are staleness s(d) <= 1 (FedBuff) or the straggler's work fraction <= 1
   (FedAvg), so w_max = 1 and the noise std on the sum is sigma * C;
3. the noisy sum is divided by a fixed, data-independent denominator m (FedBuff: K; FedAvg:
   the cohort size), never by the realised count or weight sum, so the pseudo-gradient handed
   to the server optimizer carries noise std sigma * C / m per coordinate.

One user (a data partition, `ClientUpdate.client_id`) contributes at most one update per
aggregate: a second update of the same user inside one buffer is discarded (the sensitivity
of S is then C * w_max). Each noisy aggregate is one step of the RDP `Accountant`, with the
sample rate the caller states (see `asyncfl.privacy.accountant` for the sampling assumption
this makes under asynchronous participation). With `AdaptiveClipping`, C follows a target
quantile of the update norms; the noisy clipped count shares the budget, so the sum is noised
with `update_noise_multiplier(sigma, sigma_b)` and the accountant uses sigma.

Pure tensor math, no clock: the simulator and the network server can both drive it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from asyncfl.algorithms.aggregators import BufferingAggregator
from asyncfl.algorithms.server_opt import ServerOptimizer
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict, clone_or_none
from asyncfl.privacy import Accountant, AdaptiveClipping, add_gaussian_noise, clip, update_noise_multiplier


@dataclass(frozen=True)
class DPMechanism:
    """The Gaussian mechanism's settings: what bounds one user's influence on an aggregate (clip
    norm C, weights within [0, max_weight]), the noise on the sum (sigma = `noise_multiplier`; 0
    clips only and reports no epsilon), the fixed denominator m, and what the accountant needs
    (`sample_rate`, and `delta`, the one epsilon is reported at). `seed` seeds the noise
    generator (deterministic runs). `adaptive` is where C starts from when it follows a quantile
    of the update norms; each aggregator adapts its own copy."""

    clip_norm: float
    noise_multiplier: float
    denominator: float
    sample_rate: float
    max_weight: float = 1.0
    delta: float = 1e-5
    seed: int = 0
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier", "denominator", "sample_rate", "max_weight", "delta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not (math.isfinite(self.denominator) and self.denominator > 0):
            raise ValueError(f"denominator must be a positive number, got {self.denominator}")
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.adaptive is not None and self.noise_multiplier > 0 and self.adaptive.count_noise_std <= 0:
            raise ValueError("adaptive clipping with noise needs count_noise_std > 0 (the clipped count is released)")

    @property
    def sum_noise_multiplier(self) -> float:
        """Noise on the update sum: with adaptive clipping, part of the budget goes to the count."""
        if self.adaptive is not None and self.noise_multiplier > 0:
            return update_noise_multiplier(self.noise_multiplier, self.adaptive.count_noise_std)
        return self.noise_multiplier


class PrivateAggregator(BufferingAggregator):
    """Clip each update, noise each aggregate's sum, divide by a fixed denominator, account.

    `weight(update, staleness)` must stay within [0, mechanism.max_weight]; `buffer_size` None
    means the scheduling policy flushes at a round barrier (FedAvg).
    """

    def __init__(
        self,
        server_opt: ServerOptimizer,
        weight: Callable[[ClientUpdate, int], float],
        mechanism: DPMechanism,
        *,
        buffer_size: int | None = None,
        max_staleness: int | None = None,
    ):
        super().__init__(buffer_size, max_staleness)
        self.server_opt = server_opt
        self.weight = weight
        self.mechanism = mechanism
        self.clip_norm = mechanism.clip_norm  # the current C: adaptive clipping moves it
        self.adaptive = copy.deepcopy(mechanism.adaptive)
        if self.adaptive is not None:
            self.adaptive.clip_norm = self.clip_norm
        self.sum_noise_multiplier = mechanism.sum_noise_multiplier
        self.accountant = (
            Accountant(mechanism.noise_multiplier, mechanism.sample_rate) if mechanism.noise_multiplier > 0 else None
        )
        self.generator = torch.Generator().manual_seed(int(mechanism.seed) & (2**63 - 1))
        self.noisy_steps = 0
        self._epsilon: tuple[int, float, float] | None = None  # (noisy steps, delta, epsilon)

    @property
    def denominator(self) -> float:
        """m, what every noisy sum is divided by."""
        return self.mechanism.denominator

    def _reset(self) -> None:
        super()._reset()
        self.total: torch.Tensor | None = None
        self.users: set[int] = set()
        self.norms: list[float] = []

    def submit(self, state: ServerState, update: ClientUpdate, base_w: torch.Tensor) -> Verdict:
        if self.too_stale(state, update) or update.client_id in self.users:
            return Verdict.DISCARDED  # one update per user per aggregate: the sensitivity is C
        a = float(self.weight(update, state.version - update.base_version))
        max_weight = self.mechanism.max_weight
        if not 0.0 <= a <= max_weight * (1 + 1e-9):
            raise ValueError(f"update weight {a} outside [0, max_weight={max_weight}]: the noise would not cover it")
        clipped, norm = clip(update.delta, self.clip_norm)
        if self.total is None:
            self.total = clipped.to(torch.float32) * a  # a new tensor: never alias the client's delta
        else:
            self.total.add_(clipped, alpha=a)
        self.users.add(update.client_id)
        self.norms.append(norm)
        return self._added(state)

    def flush(self, state: ServerState) -> bool:
        if self.count == 0:
            return False
        noisy = add_gaussian_noise(
            self.total,
            self.sum_noise_multiplier,
            self.clip_norm,
            max_weight=self.mechanism.max_weight,
            generator=self.generator,
        )
        state.w = self.server_opt.step(state.w, noisy / self.mechanism.denominator)
        state.version += 1
        self.noisy_steps += 1
        if self.accountant is not None:
            self.accountant.step()
        if self.adaptive is not None:
            self.clip_norm = self.adaptive.update(self.norms, self.generator)
        self._reset()
        return True

    # ---- reporting ----------------------------------------------------------------------
    def epsilon(self, delta: float | None = None) -> float | None:
        """Epsilon spent so far at `delta` (default: the configured one); None without noise.
        Recomputed only after a noisy step: /status and evaluations ask far more often."""
        if self.accountant is None:
            return None
        delta = self.mechanism.delta if delta is None else delta
        if self._epsilon is None or self._epsilon[:2] != (self.noisy_steps, delta):
            self._epsilon = (self.noisy_steps, delta, self.accountant.epsilon(delta))
        return self._epsilon[2]

    def privacy_report(self) -> dict:
        """What a run reports about its privacy: epsilon at the configured delta, and the knobs."""
        m = self.mechanism
        return {
            "epsilon": self.epsilon(),
            "delta": m.delta,
            "noise_multiplier": m.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sample_rate": m.sample_rate,
            "privacy_steps": self.noisy_steps,
            "noise_std_per_step": self.sum_noise_multiplier * self.clip_norm * m.max_weight / m.denominator,
        }

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "total": clone_or_none(self.total),
            "count": self.count,
            "users": sorted(self.users),
            "norms": list(self.norms),
            "clip_norm": self.clip_norm,
            "noisy_steps": self.noisy_steps,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "generator": self.generator.get_state(),
            "server_opt": self.server_opt.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.total = clone_or_none(state["total"])
        self.count, self.users, self.norms = state["count"], set(state["users"]), list(state["norms"])
        self.clip_norm, self.noisy_steps = float(state["clip_norm"]), int(state["noisy_steps"])
        self._epsilon = None
        if self.adaptive is not None:
            self.adaptive.clip_norm = self.clip_norm
        if self.accountant is not None and state["accountant"] is not None:
            self.accountant.load_state_dict(state["accountant"])
        self.generator.set_state(state["generator"])
        self.server_opt.load_state_dict(state["server_opt"])
