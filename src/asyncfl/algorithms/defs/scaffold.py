"""SCAFFOLD: control variates c (server) and c_i (client) correct each local gradient by
c - c_i, so that clients on skewed data stop drifting towards their own optimum.

Sync rounds only, the paper's setting: c is updated with a round's control deltas divided by
the number of users N, which keeps c the mean of all clients' c_i only if every delta was
computed against the c of the version it is folded into; an asynchronous server folds
deltas computed against older c's and breaks that invariant.

Round aggregation: the uniform mean of the round's deltas, as in the paper (not n-weighted),
through the server optimizer (`server_opt`, lr = the global step size eta_g).

N: `algorithm.num_clients`, else derived from the config and data as `asyncfl.build.num_users`
(distinct data partitions devices bring), the same in the simulator and on the server; a
deployment whose real user count differs from its config's partitions should set it.

Not covered: differential privacy (the control deltas are unclipped and unnoised, and scale
with 1 / (K eta)); lossy compression (a lossy dc_i breaks the invariant that c is the mean of
the c_i, unless the client kept exactly what the server decoded, which nothing here does).
Secure aggregation would do: the server only needs the round's sums of deltas and of control
deltas and their count.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.algorithms.defs._common import build_server_opt
from asyncfl.algorithms.defs.registry import AlgorithmDefinition, register
from asyncfl.algorithms.scaffold import CONTROL, CONTROL_DELTA, ControlVariates, ScaffoldAggregator
from asyncfl.config.base import ConfigError, Strict
from asyncfl.config.training import ServerOptConfig


class ScaffoldConfig(Strict):
    name: Literal["scaffold"]
    server_opt: ServerOptConfig = ServerOptConfig()
    num_clients: int | None = Field(
        default=None, gt=0, description="N, the number of users c averages over; default: the config's data partitions"
    )


def _aggregator(a: ScaffoldConfig, trainer_lr: float | None, num_users: int | None) -> ScaffoldAggregator:
    n = a.num_clients or num_users
    if n is None:
        raise ConfigError("scaffold: set algorithm.num_clients (the number of users is not known here)")
    return ScaffoldAggregator(build_server_opt(a.server_opt), n)


def _client_rule(a: ScaffoldConfig, trainer_lr: float) -> ControlVariates:
    return ControlVariates(trainer_lr)


DEFINITION = register(
    AlgorithmDefinition(
        name="scaffold",
        config=ScaffoldConfig,
        modes=("sync",),
        build_aggregator=_aggregator,
        compression=False,
        secure_aggregation=True,
        client_state=CONTROL,
        upload_fields=(CONTROL_DELTA,),
        client_rule=_client_rule,
        sized_by_users=True,
    )
)
