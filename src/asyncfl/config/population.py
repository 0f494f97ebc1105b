"""The simulated device population: speeds, bandwidths, dropout, availability, attackers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class TraceConfig(Strict):
    """Measured device behaviour from local trace files (`asyncfl.sim.traces` gives the formats):
    `capacity` replaces the drawn compute speeds and bandwidths, `availability` the diurnal model.
    Device i takes trace row i of a seeded permutation when the population is no larger than the
    trace (a random subset), else the row floor(u x rows) for u a uniform hashed from (seed, i)
    (a draw with replacement that costs nothing per device)."""

    format: Literal["csv", "fedscale"] = Field(
        default="csv", description="csv: our columns; fedscale: FedScale's pickled capacity and behaviour dicts"
    )
    capacity: str | None = Field(default=None, description="path of the capacity trace (or builtin:NAME/capacity.csv)")
    availability: str | None = Field(
        default=None, description="path of the availability trace (or builtin:NAME/availability.csv)"
    )
    period: float | None = Field(
        default=None, gt=0, description="csv availability: seconds after which intervals repeat (default: latest end)"
    )
    compute_scale: float = Field(
        default=1.0, gt=0, description="multiplies the trace's compute time per example (another model's cost)"
    )

    @model_validator(mode="after")
    def _readable(self) -> TraceConfig:
        """Read the files now (once per process: cached), so a bad trace fails before any run."""
        from asyncfl.sim.traces import load_availability, load_capacity

        if self.capacity is None and self.availability is None:
            raise ValueError("traces: give capacity, availability or both")
        if self.format == "fedscale" and self.period is not None:
            raise ValueError("traces.period: fedscale traces carry their own period (finish_time)")
        if self.capacity is not None:
            load_capacity(self.capacity, self.format, self.compute_scale)
        if self.availability is not None:
            load_availability(self.availability, self.format, self.period)
        return self


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

    traces: TraceConfig | None = Field(
        default=None, description="measured capacity and availability traces replacing the drawn profiles"
    )

    def on_demand(self) -> bool:
        return self.profiles == "on_demand" or (self.profiles == "auto" and self.devices > ON_DEMAND_ABOVE)
