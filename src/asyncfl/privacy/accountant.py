"""RDP accounting for the Poisson-subsampled Gaussian mechanism (Google's `dp-accounting`).

One *step* is one noisy aggregate released by the server (a FedBuff buffer flush, a FedAvg
round, a FedAsync update when K = 1), in which each user is assumed to take part independently
with probability q (the sample rate) and the sum of clipped updates gets noise multiplier
sigma (see `asyncfl.privacy.dp`). Epsilon is for user-level (add/remove one user's data)
neighbouring, at the given delta, via Renyi DP over dp-accounting's default orders.

Asynchronous participation -- an ASSUMPTION, not a guarantee. Asynchronous clients are not
sampled by the server: devices arrive when available and finish at their own speed, and a
buffer holds whichever K updates arrive first. We account as if every buffer step were a
Poisson sample of the population with q = K / N (expected buffer size over the number of
devices that could contribute), one composition per server step. This holds only if device
arrivals behave like independent coin flips per step; it is optimistic when some devices
contribute far more often than q (fast or always-available devices), when the population
that can actually arrive is smaller than N, or when the server can observe who arrived. A
conservative bound that does not rely on sampling: `epsilon(sigma, 1.0, P, delta)` with P the
largest number of aggregates any single device contributed to (bound P by capping each
device's participation). Each device must contribute at most one update per aggregate.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

# dp-accounting (and the scipy modules it pulls in) takes ~1-3 s to import, so it is imported
# on first use: clipping and noise need none of it.


def _real(value: float, name: str, ok, interval: str) -> float:
    """`value` as a float, or a ValueError naming the parameter and its valid interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and ok(v)):
        raise ValueError(f"{name} must be {interval}, got {value}")
    return v


def _check_sigma(noise_multiplier: float) -> float:
    return _real(noise_multiplier, "noise multiplier", lambda v: v > 0, "> 0 and finite")


def _check_rate(sample_rate: float) -> float:
    return _real(sample_rate, "sample rate", lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def _check_delta(delta: float) -> float:
    return _real(delta, "delta", lambda v: 0.0 < v < 1.0, "in (0, 1)")


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {steps!r}")
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return int(steps)


_RDP_CACHE: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}


def _rdp_per_step(sigma: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one Poisson-subsampled Gaussian step), cached per (sigma, q)."""
    key = (sigma, q)
    if key not in _RDP_CACHE:
        from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
        from dp_accounting.rdp import RdpAccountant

        acc = RdpAccountant()
        acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)))
        if len(_RDP_CACHE) > 256:
            _RDP_CACHE.clear()
        _RDP_CACHE[key] = (acc.orders, acc.rdp)
    return _RDP_CACHE[key]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after `steps` compositions of the Poisson-subsampled Gaussian (0 for 0 steps)."""
    acc = Accountant(noise_multiplier, sample_rate)
    delta, steps = _check_delta(delta), _check_steps(steps)
    return acc.step(steps).epsilon(delta)


def noise_multiplier_for(
    target_epsilon: float, sample_rate: float, steps: int, delta: float, tol: float = 1e-3
) -> float:
    """Smallest noise multiplier (within relative `tol`) whose epsilon is <= target_epsilon."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    q, d, n = _check_rate(sample_rate), _check_delta(delta), _check_steps(steps)
    if n == 0:
        raise ValueError("steps must be >= 1 to calibrate a noise multiplier")
    lo, hi = 1e-2, 1.0
    while epsilon(hi, q, n, d) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier <= 1e6 reaches epsilon {target_epsilon}")
    if epsilon(lo, q, n, d) <= target_epsilon:
        return lo
    while hi / lo > 1 + tol:  # bisect in log space: epsilon decreases in sigma
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if epsilon(mid, q, n, d) <= target_epsilon else (mid, hi)
    return hi


class Accountant:
    """Running epsilon as training proceeds: `step()` per noisy aggregate, `epsilon(delta)`.

    The noise multiplier and sample rate may change mid-run (`step(n, noise_multiplier=...,
    sample_rate=...)`); steps are kept as segments [sigma, q, count]. The state is plain JSON.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float):
        self.noise_multiplier = _check_sigma(noise_multiplier)
        self.sample_rate = _check_rate(sample_rate)
        self._segments: list[list[Any]] = []

    def step(
        self, n: int = 1, *, noise_multiplier: float | None = None, sample_rate: float | None = None
    ) -> Accountant:
        """Compose n more aggregates (optionally switching sigma / q from now on). Returns self."""
        n = _check_steps(n, "n")
        if noise_multiplier is not None:
            self.noise_multiplier = _check_sigma(noise_multiplier)
        if sample_rate is not None:
            self.sample_rate = _check_rate(sample_rate)
        if n == 0:
            return self
        last = self._segments[-1] if self._segments else None
        if last is not None and last[0] == self.noise_multiplier and last[1] == self.sample_rate:
            last[2] += n
        else:
            self._segments.append([self.noise_multiplier, self.sample_rate, n])
        return self

    @property
    def steps(self) -> int:
        return sum(seg[2] for seg in self._segments)

    def epsilon(self, delta: float) -> float:
        d = _check_delta(delta)
        if not self._segments:
            return 0.0
        total = None
        for sigma, q, count in self._segments:
            orders, rdp = _rdp_per_step(sigma, q)
            total = count * rdp if total is None else total + count * rdp
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        return float(compute_epsilon(orders, total, d)[0])

    def state_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "segments": [list(seg) for seg in self._segments],
        }

    def load_state_dict(self, state: dict) -> None:
        sigma = _check_sigma(state["noise_multiplier"])
        q = _check_rate(state["sample_rate"])
        segments = []
        for seg in state["segments"]:
            if len(seg) != 3:
                raise ValueError(f"accountant segment must be [sigma, q, count], got {seg!r}")
            segments.append([_check_sigma(seg[0]), _check_rate(seg[1]), _check_steps(seg[2], "segment count")])
        self.noise_multiplier, self.sample_rate, self._segments = sigma, q, segments
