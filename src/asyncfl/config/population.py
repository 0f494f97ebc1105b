"""The simulated device population: speeds, bandwidths, dropout, availability, attackers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.attacks import Attack, AttackKind
from asyncfl.config.base import Strict

ON_DEMAND_ABOVE = 10_000_000  # `profiles: auto` computes profiles on demand above this many devices


class Dist(Strict):
    """A per-device random quantity. `scale` is the median (lognormal, pareto), the sigma of the
    underlying normal (halfnormal), the mean (exponential) or the value (constant). pareto:
    P(X > x) = (x_m / x)^shape for x >= x_m, with x_m = scale / 2^(1/shape) so that scale is the
    median; the mean is finite for shape > 1, the variance for shape > 2."""

    kind: Literal["lognormal", "halfnormal", "exponential", "constant", "pareto"] = "lognormal"
    scale: float = Field(gt=0)
    sigma: float = Field(default=1.0, ge=0, description="lognormal shape")
    shape: float = Field(default=2.0, gt=0, description="pareto tail index (smaller: heavier tail)")
    minimum: float = Field(default=0.0, ge=0, description="floor applied after sampling")


class Availability(Strict):
    """Diurnal eligibility: a device is eligible for `on_fraction` of every `period`, at a
    per-device random phase. on_fraction = 1 means always eligible."""

    period: float = Field(default=86400.0, gt=0)
    on_fraction: float = Field(default=1.0, gt=0, le=1)


class AttackConfig(Strict):
    """Untrusted clients: a fixed random `fraction` of devices corrupt every update they send,
    each kind as `asyncfl.attacks` defines it."""

    fraction: float = Field(default=0.0, ge=0, lt=1)
    kind: AttackKind = "sign_flip"
    factor: float = Field(default=10.0, gt=0, description="scale: delta x factor; sign_flip: delta x -factor")
    noise_std: float = Field(default=1.0, gt=0, description="gaussian, collude: std of each coordinate sent")
    seed: int = Field(default=0, ge=0, description="collude: seed of the one vector every attacker sends")

    def attack(self) -> Attack | None:
        """The attack its malicious devices carry out (None when there are none)."""
        if not self.fraction:
            return None
        return Attack(self.kind, self.factor, self.noise_std, self.seed)


class PopulationConfig(Strict):
    devices: int = Field(default=100, gt=0)
    compute_per_example: Dist = Dist(kind="lognormal", scale=0.05, sigma=1.0)
    download_bandwidth: Dist = Dist(kind="lognormal", scale=1e6, sigma=0.5)  # bytes / s
    upload_bandwidth: Dist = Dist(kind="lognormal", scale=2.5e5, sigma=0.5)
    dropout: float = Field(default=0.0, ge=0, lt=1, description="probability a trip never reports")
    availability: Availability = Availability()
    retry_interval: float = Field(default=60.0, gt=0, description="wait when no device is eligible")
    attack: AttackConfig = AttackConfig()
    profiles: Literal["auto", "arrays", "on_demand"] = Field(
        default="auto",
        description="arrays: every device's profile drawn up front; on_demand: a device's profile computed from "
        "(seed, device id) when it is picked, so the population costs nothing until it trains; auto: on_demand "
        "above 10^7 devices",
    )

    def on_demand(self) -> bool:
        return self.profiles == "on_demand" or (self.profiles == "auto" and self.devices > ON_DEMAND_ABOVE)
