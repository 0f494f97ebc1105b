"""Per-FedAvg: clients train for a model that adapts well after one local step (MAML-style)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms.defs._common import round_aggregator, round_private_aggregator
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, ClientOptions, register
from asyncfl.config.training import RoundAggregation


class PerFedAvgConfig(RoundAggregation):
    name: Literal["perfedavg"]
    variant: Literal["fo", "hf"] = Field(default="fo", description="first order, or Hessian-free")
    meta_lr: float = Field(default=0.01, gt=0, description="alpha: the personalisation step size")
    meta_delta: float = Field(default=1e-3, gt=0, description="hf: finite-difference step")


DEFINITION = register(
    AlgorithmDefinition(
        name="perfedavg",
        config=PerFedAvgConfig,
        modes=("sync",),
        build_aggregator=round_aggregator,
        build_private_aggregator=round_private_aggregator,
        secure_aggregation=True,
        client_options=lambda a: ClientOptions(meta=a.variant, meta_lr=a.meta_lr, meta_delta=a.meta_delta),
    )
)
