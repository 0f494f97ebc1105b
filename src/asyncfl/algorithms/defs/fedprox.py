"""FedProx: FedAvg whose clients add a proximal term mu/2 |w - w_global|^2 to their loss."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms.defs._common import round_aggregator, round_private_aggregator
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, ClientOptions, register
from asyncfl.config.training import RoundAggregation


class FedProxConfig(RoundAggregation):
    name: Literal["fedprox"]
    mu: float = Field(default=0.01, ge=0, description="proximal coefficient")


DEFINITION = register(
    AlgorithmDefinition(
        name="fedprox",
        config=FedProxConfig,
        modes=("sync",),
        build_aggregator=round_aggregator,
        build_private_aggregator=round_private_aggregator,
        secure_aggregation=True,
        client_options=lambda a: ClientOptions(prox_mu=a.mu),
    )
)
