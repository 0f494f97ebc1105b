"""q-FedAvg: fair aggregation, weighing clients with higher loss more (q = 0: FedAvg-like)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms import aggregators
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, ClientOptions, needs_buffer_when_async, register
from asyncfl.config.base import ConfigError, Strict


class QFedAvgConfig(Strict):
    name: Literal["qfedavg"]
    q: float = Field(default=1.0, ge=0, description="fairness: 0 is FedAvg-like")
    lipschitz: float | None = Field(default=None, gt=0, description="L; default 1 / trainer.lr")
    buffer_size: int | None = Field(default=None, gt=0, description="async: step every K updates")
    max_staleness: int | None = Field(default=None, ge=0)
    loss_estimate: Literal["full", "first_batch"] = Field(
        default="full",
        description="F_k, the client's loss at the downloaded model: over all its training "
        "examples (the paper's), or on its first minibatch (cheaper, noisier)",
    )


def _aggregator(a: QFedAvgConfig, trainer_lr: float | None) -> aggregators.QFedAvg:
    """`trainer_lr` sets the default L = 1 / lr."""
    if a.lipschitz is None and trainer_lr is None:
        raise ConfigError("qfedavg: set algorithm.lipschitz (no trainer learning rate to derive it from)")
    return aggregators.QFedAvg(a.q, a.lipschitz or 1.0 / trainer_lr, a.buffer_size, a.max_staleness)


DEFINITION = register(
    AlgorithmDefinition(
        name="qfedavg",
        config=QFedAvgConfig,
        modes=("sync", "async"),
        build_aggregator=_aggregator,
        validate=needs_buffer_when_async,
        reported=("start_loss",),
        client_options=lambda a: ClientOptions(start_loss=a.loss_estimate),
    )
)
