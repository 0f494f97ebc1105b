"""FedNova: FedAvg's rounds (or FedBuff's buffer) with each client's delta normalized by its
local work, so clients that took more local steps do not pull the model toward their own
objective. Server side only: clients run plain (or, with mu, proximal) SGD."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms.aggregators import EXAMPLE_WEIGHTS
from asyncfl.algorithms.defs._common import build_server_opt, build_staleness
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, ClientOptions, needs_buffer_when_async, register
from asyncfl.algorithms.fednova import FedNova
from asyncfl.config.base import ConfigError
from asyncfl.config.training import ServerStepConfig, StalenessConfig


class FedNovaConfig(ServerStepConfig):
    name: Literal["fednova"]
    mu: float = Field(default=0.0, ge=0, description="proximal coefficient on clients (FedProx-style)")
    buffer_size: int | None = Field(default=None, gt=0, description="async: step every K updates")
    staleness: StalenessConfig = StalenessConfig()
    example_weight: Literal["uniform", "n", "sqrt", "log"] = Field(
        default="n", description="p_i ∝ s(staleness) e(n_i), normalized over the round or buffer"
    )
    max_staleness: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, gt=0, description="clamp the local steps a client reports")


def _aggregator(a: FedNovaConfig, trainer_lr: float | None) -> FedNova:
    """`trainer_lr` is eta in the proximal clients' ||a_i||_1 (unused when mu = 0)."""
    if trainer_lr is None and a.mu > 0:
        raise ConfigError("fednova with mu > 0 needs the trainer's learning rate to normalize by")
    s, e = build_staleness(a.staleness), EXAMPLE_WEIGHTS[a.example_weight]
    try:
        return FedNova(
            build_server_opt(a.server_opt),
            lambda u, d: s(d) * e(u.n_examples),
            trainer_lr or 1.0,
            a.mu,
            a.buffer_size,
            a.max_staleness,
            a.clip_norm,
            a.max_steps,
        )
    except ValueError as err:
        raise ConfigError(f"algorithm.mu with trainer.lr: {err}") from None


# Privacy: no. The step is sum_i p_i delta_i tau_eff / ||a_i||_1, and tau_eff depends on every
# client's reported steps, so one client moves everyone's contribution: a per-update clip norm
# does not bound the sensitivity.
# Secure aggregation: yes. A client knows its n_i, steps and mu, so it can send w_i d_i and
# w_i ||a_i||_1 (and w_i); the server needs only the three sums.
DEFINITION = register(
    AlgorithmDefinition(
        name="fednova",
        config=FedNovaConfig,
        modes=("sync", "async"),
        build_aggregator=_aggregator,
        secure_aggregation=True,
        client_options=lambda a: ClientOptions(prox_mu=a.mu),
        validate=needs_buffer_when_async,
        reported=("steps",),
    )
)
