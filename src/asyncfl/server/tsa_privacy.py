"""Central DP with the TSA: the TSA adds the noise, so the server never holds the noiseless sum.

DP-FedBuff's Gaussian mechanism (`asyncfl.algorithms.private`) moved across the three parties:
each client clips its update to L2 norm C before encoding (the server cannot see a norm, so the
guarantee assumes clients that run this code); the server keeps one update per user per buffer,
so one user moves the weighted ring sum by at most max_weight C; the TSA subtracts
N(0, (sigma max_weight C)^2) per coordinate from the mask sum it returns; and the server divides
by LEVELS K, a fixed denominator, so the step carries noise std sigma C / K, as in plaintext
DP-FedBuff. The accountant counts one noisy aggregate per step.

The noise must not wrap around the ring: the encoding is sized for K max_weight plus `headroom`
more weight units, room for 8 standard deviations of noise on any coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from asyncfl.privacy import Accountant

NOISE_STDS = 8  # ring headroom for the TSA's noise, in standard deviations


@dataclass(frozen=True)
class TsaNoise:
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    delta: float

    def std(self, max_weight: int) -> float:
        """The noise std on the decoded weighted sum (sum of integer weights x clipped updates)."""
        return self.noise_multiplier * self.clip_norm * max_weight

    def headroom(self, max_weight: int, clip_range: float) -> int:
        """Weight units of ring capacity the noise needs (a unit holds clip_range per coordinate)."""
        return math.ceil(NOISE_STDS * self.std(max_weight) / clip_range)


def tsa_noise(spec) -> TsaNoise | None:
    p = spec.privacy
    if p is None:
        return None
    if p.adaptive is not None:
        from asyncfl.config import ConfigError

        raise ConfigError(
            "privacy.adaptive with secure_aggregation 'tsa': adaptive clipping needs every update's norm, "
            "which the server cannot see; use a fixed clip_norm"
        )
    return TsaNoise(p.noise_multiplier, p.clip_norm, p.sample_rate, p.delta)


class TsaAccounting:
    """The accountant of a TSA run, and what /status reports of its privacy."""

    def __init__(self, noise: TsaNoise, buffer_size: int):
        self.noise, self.buffer_size = noise, buffer_size
        self.accountant = Accountant(noise.noise_multiplier, noise.sample_rate) if noise.noise_multiplier > 0 else None
        self._epsilon: tuple[int, float] | None = None  # (steps, epsilon): /status asks far more often than it changes

    def step(self) -> None:
        if self.accountant is not None:
            self.accountant.step()

    def report(self) -> dict:
        n = self.noise
        if self.accountant is not None and (self._epsilon is None or self._epsilon[0] != self.accountant.steps):
            self._epsilon = (self.accountant.steps, self.accountant.epsilon(n.delta))
        return {
            "epsilon": None if self._epsilon is None else self._epsilon[1],
            "delta": n.delta,
            "noise_multiplier": n.noise_multiplier,
            "clip_norm": n.clip_norm,
            "sample_rate": n.sample_rate,
            "privacy_steps": 0 if self.accountant is None else self.accountant.steps,
            "noise_std_per_step": n.noise_multiplier * n.clip_norm / self.buffer_size,
            "noise_added_by": "tsa",
        }

    def state_dict(self) -> dict | None:
        return None if self.accountant is None else self.accountant.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.accountant is not None and state is not None:
            self.accountant.load_state_dict(state)
