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


class ServerStepConfig(Strict):
    """How the server steps with an aggregate of updates: its optimizer, and the bound on each
    update's L2 norm (one client's influence)."""

    server_opt: ServerOptConfig = ServerOptConfig()
    clip_norm: float | None = Field(default=None, gt=0, description="clip each update's L2 norm first")


class RoundAggregation(ServerStepConfig):
    """How a round's (or buffer's) updates combine: the weighted mean, or a robust rule."""

    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5, description="trimmed_mean: cut from each end")
    partial_weight: Literal["full", "work_fraction"] = Field(
        default="full",
        description="mean: a straggler's partial update weighs n_k (full, as FedProx's reference "
        "implementation) or n_k x the share of its planned steps done (work_fraction)",
    )
