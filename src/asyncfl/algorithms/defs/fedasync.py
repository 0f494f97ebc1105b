"""FedAsync: the server mixes each arriving model in at a staleness-discounted rate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms import aggregators
from asyncfl.algorithms.defs._common import build_staleness, with_filter
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, ClientOptions, register
from asyncfl.config.base import Strict
from asyncfl.config.training import KardamConfig, StalenessConfig


class FedAsyncConfig(Strict):
    name: Literal["fedasync"]
    alpha: float = Field(default=0.6, gt=0, le=1, description="mixing rate")
    staleness: StalenessConfig = StalenessConfig(kind="hinge", a=10.0, b=4.0)
    rho: float = Field(default=0.0, ge=0, description="proximal coefficient on clients")
    max_staleness: int | None = Field(default=None, ge=0)
    filter: KardamConfig | None = Field(default=None, description="a Byzantine filter each update passes first")


DEFINITION = register(
    AlgorithmDefinition(
        name="fedasync",
        config=FedAsyncConfig,
        modes=("async",),
        build_aggregator=lambda a, trainer_lr: with_filter(
            aggregators.FedAsync(a.alpha, build_staleness(a.staleness), a.max_staleness), a.filter
        ),
        client_options=lambda a: ClientOptions(prox_mu=a.rho),
    )
)
