"""Training settings shared by algorithms: local SGD, server optimizer, staleness weights, and
how a round's updates combine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from asyncfl.config.base import Strict


class TrainerConfig(Strict):
    lr: float = Field(default=0.1, gt=0)
    batch_size: int = Field(default=16, gt=0)
    local_steps: int | None = Field(default=10, gt=0)
    local_epochs: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other to null)")
        return self


class ServerOptConfig(Strict):
    name: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


class StalenessConfig(Strict):
    kind: Literal["constant", "polynomial", "hinge", "inverse_sqrt"] = "inverse_sqrt"
    a: float = Field(default=0.5, gt=0)
    b: float = Field(default=4.0, ge=0)


class KardamConfig(Strict):
    """Kardam's Lipschitz filter (Damaskinos et al., ICML 2018) in front of an asynchronous
    rule: an update is refused when its sender's empirical Lipschitz coefficient exceeds the
    (1 - byzantine_fraction) quantile of the last `window` coefficients."""

    kind: Literal["kardam"] = "kardam"
    byzantine_fraction: float = Field(default=0.2, gt=0, lt=0.5, description="f / n: the share refused")
    window: int = Field(default=50, ge=1, description="recent coefficients the quantile is taken over")
    warmup: int = Field(default=10, ge=1, description="coefficients seen before the filter refuses")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup > self.window:
            raise ValueError(f"warmup {self.warmup} exceeds window {self.window}")
        return self


class ServerStepConfig(Strict):
    """How the server steps with an aggregate of updates: its optimizer, and the bound on each
    update's L2 norm (one client's influence)."""

    server_opt: ServerOptConfig = ServerOptConfig()
    clip_norm: float | None = Field(default=None, gt=0, description="clip each update's L2 norm first")


class RobustRule(Strict):
    """How a round's (or buffer's) updates combine: the weighted mean, or a coordinate-wise
    robust rule (privacy and secure aggregation cover the mean only)."""

    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5, description="trimmed_mean: cut from each end")


class RoundAggregation(ServerStepConfig, RobustRule):
    """The FedAvg family's round: a robust rule or the example-weighted mean, and how a
    straggler's partial update weighs in it."""

    partial_weight: Literal["full", "work_fraction"] = Field(
        default="full",
        description="mean: a straggler's partial update weighs n_k (full, as FedProx's reference "
        "implementation) or n_k x the share of its planned steps done (work_fraction)",
    )
