"""FedAvg: rounds of local SGD, averaged by example count."""

from __future__ import annotations

from typing import Literal

from asyncfl.algorithms.defs._common import round_aggregator, round_private_aggregator
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, register
from asyncfl.config.training import RoundAggregation


class FedAvgConfig(RoundAggregation):
    name: Literal["fedavg"]


DEFINITION = register(
    AlgorithmDefinition(
        name="fedavg",
        config=FedAvgConfig,
        modes=("sync",),
        build_aggregator=round_aggregator,
        build_private_aggregator=round_private_aggregator,
        secure_aggregation=True,
    )
)
