"""FedBuff: asynchronous clients; the server steps with the staleness-weighted mean (or a robust
rule) of every K updates it buffers, optionally behind Kardam's Lipschitz filter."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms import aggregators
from asyncfl.algorithms.defs._common import build_server_opt, build_staleness, private_aggregator, with_filter
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, register
from asyncfl.algorithms.private import PrivateAggregator
from asyncfl.config.training import KardamConfig, RobustRule, ServerOptConfig, StalenessConfig


class FedBuffConfig(RobustRule):
    name: Literal["fedbuff"]
    buffer_size: int = Field(default=10, gt=0, description="K updates per server step")
    staleness: StalenessConfig = StalenessConfig()
    example_weight: Literal["uniform", "n", "sqrt", "log"] = "uniform"
    normalize: Literal["count", "weight"] = "count"
    max_staleness: int | None = Field(default=None, ge=0)
    server_opt: ServerOptConfig = ServerOptConfig()
    clip_norm: float | None = Field(default=None, gt=0, description="clip each update's L2 norm first")
    filter: KardamConfig | None = Field(default=None, description="a Byzantine filter each update passes first")


def _aggregator(a: FedBuffConfig, trainer_lr: float | None = None) -> aggregators.Aggregator:
    return with_filter(
        aggregators.fedbuff(
            build_server_opt(a.server_opt),
            a.buffer_size,
            build_staleness(a.staleness),
            a.example_weight,
            a.normalize,
            a.max_staleness,
            a.clip_norm,
            a.aggregation,
            a.trim_fraction,
        ),
        a.filter,
    )


def _validate(a: FedBuffConfig, scheduler) -> None:
    if a.aggregation != "mean" and a.normalize != "count":
        raise ValueError(
            f"algorithm.normalize 'weight' applies to the mean; aggregation {a.aggregation!r} takes the "
            "rule over the staleness-weighted deltas: use normalize 'count'"
        )


def _private_aggregator(spec, num_users: int | None, seed: int = 0) -> PrivateAggregator:
    """DP-FedBuff: the staleness weights (<= 1), divided by K."""
    a = spec.algorithm
    s = build_staleness(a.staleness)
    return private_aggregator(spec, num_users, seed, lambda u, d: s(d), a.buffer_size, a.max_staleness)


def _validate_privacy(a: FedBuffConfig) -> None:
    if a.filter is not None:
        raise ValueError("algorithm.filter is not covered by privacy (it reads each update): remove it")
    if a.example_weight != "uniform":
        raise ValueError(
            f"algorithm.example_weight {a.example_weight!r} is not covered by privacy (unbounded "
            "weights): use 'uniform'"
        )
    if a.normalize != "count":
        raise ValueError(
            "algorithm.normalize 'weight' is not covered by privacy (the weight sum is data dependent): use 'count'"
        )


DEFINITION = register(
    AlgorithmDefinition(
        name="fedbuff",
        config=FedBuffConfig,
        modes=("async", "sync"),
        build_aggregator=_aggregator,
        build_private_aggregator=_private_aggregator,
        secure_aggregation=True,
        validate=_validate,
        validate_privacy=_validate_privacy,
        updates_per_step=lambda a, scheduler: a.buffer_size,
    )
)
