"""One definition per algorithm, and the registry every part of the system reads it from.

Config validation, experiment building, the server's task description and the client all ask
an algorithm's definition instead of checking its name, so adding an algorithm is one module in
this package (plus its entry in `MODULES`) and its tests.
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

if TYPE_CHECKING:
    from asyncfl.algorithms.aggregators import Aggregator
    from asyncfl.algorithms.private import PrivateAggregator
    from asyncfl.config.scheduler import SchedulerConfig

# Algorithm modules of this package, in the order their names are listed to users.
MODULES = ("fedavg", "fedprox", "perfedavg", "qfedavg", "fedasync", "fedbuff", "fednova", "scaffold")


@dataclass(frozen=True)
class ClientOptions:
    """What the local trainer needs from the algorithm: a proximal coefficient (FedProx's mu,
    FedAsync's rho), Per-FedAvg's meta step (`meta` 'fo' or 'hf'; None: plain SGD) and how the
    loss at the downloaded model is measured (`start_loss`: 'first_batch' costs nothing extra,
    'full' is one more pass over the client's data). The defaults are the plain trainer's."""

    prox_mu: float = 0.0
    meta: str | None = None
    meta_lr: float = 0.01
    meta_delta: float = 1e-3
    start_loss: str = "first_batch"


def _no_checks(a, *args) -> None:
    pass


def needs_buffer_when_async(a, scheduler: SchedulerConfig) -> None:
    """A `validate` for algorithms that step at the round barrier in sync mode and every
    `buffer_size` updates in async mode, which therefore needs one."""
    if scheduler.mode == "async" and a.buffer_size is None:
        raise ValueError(f"{a.name} in async mode needs algorithm.buffer_size (updates per server step)")


def _plain_client(a) -> ClientOptions:
    return ClientOptions()


def _cohort(a, scheduler: SchedulerConfig) -> int:
    return scheduler.concurrency


@dataclass(frozen=True)
class AlgorithmDefinition:
    """An algorithm's identity.

    name, config: the `algorithm.name` tag and the pydantic class of its `algorithm:` section.
    modes: the scheduling modes it makes sense in; the first is the default.
    build_aggregator(a, trainer_lr): the aggregator without privacy.
    build_private_aggregator(spec, num_users, seed): the DP aggregator; None when the DP
        mechanism does not cover the algorithm (its aggregate's sensitivity is not bounded by
        the clip norm).
    compression: whether its updates may go through lossy codecs.
    secure_aggregation: whether the server only needs a weighted sum of updates, so that a
        secure-aggregation protocol could compute it (weighted means, with aggregation 'mean' and no
        Byzantine filter; not q-FedAvg's or FedAsync's rules, nor robust ones).
    client_options(a): the local trainer's algorithm-specific settings.
    validate(a, scheduler): raises ValueError for settings that do not fit the schedule.
    validate_privacy(a): raises ValueError for settings DP does not cover.
    updates_per_step(a, scheduler): expected updates per server step, the fixed denominator of
        a private aggregate (the round's cohort unless the algorithm steps every K updates).
    client_state: the name of per-client state kept between a client's trips (SCAFFOLD's
        control variate c_i): the simulator keeps it per device, a network client on disk; None:
        clients are stateless.
    upload_fields: tensors a client uploads besides its model delta (SCAFFOLD's change of c_i),
        the keys of `ClientUpdate.extras`; empty: the delta alone.
    client_rule(a, trainer_lr): the client's side of `client_state` (set with it): an object
        with `correction(downloaded, own)` (added to every local gradient), `uploads(downloaded,
        own, update)` (the `upload_fields` tensors) and `advanced(own, uploaded)` (the state
        once the server accepted the update); `downloaded` is the aggregator's `downloads`.
    sized_by_users: build_aggregator takes a third argument, the number of distinct users
        (SCAFFOLD's N), which the builders derive from the data unless the config sets it.
    reported: what its aggregator reads from a client's report besides the delta and
        n_examples, which an upload must carry with a usable value ('start_loss': present;
        'steps': at least one); the server answers 422 otherwise.
    """

    name: str
    config: type
    modes: tuple[str, ...]
    build_aggregator: Callable[[Any, float | None], Aggregator]
    build_private_aggregator: Callable[[Any, int | None, int], PrivateAggregator] | None = None
    compression: bool = True
    secure_aggregation: bool = False
    client_options: Callable[[Any], ClientOptions] = _plain_client
    validate: Callable[[Any, SchedulerConfig], None] = _no_checks
    validate_privacy: Callable[[Any], None] = _no_checks
    updates_per_step: Callable[[Any, SchedulerConfig], int] = _cohort
    client_state: str | None = None
    upload_fields: tuple[str, ...] = ()
    client_rule: Callable[[Any, float], Any] | None = None
    sized_by_users: bool = False
    reported: tuple[str, ...] = ()

    @property
    def private(self) -> bool:
        return self.build_private_aggregator is not None


_REGISTRY: dict[str, AlgorithmDefinition] = {}


def register(definition: AlgorithmDefinition) -> AlgorithmDefinition:
    if definition.name in _REGISTRY:
        raise ValueError(f"algorithm {definition.name!r} is registered twice")
    _REGISTRY[definition.name] = definition
    return definition


def definitions() -> dict[str, AlgorithmDefinition]:
    """Every algorithm, by name, in `MODULES` order (importing their modules the first time)."""
    for module in MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return dict(_REGISTRY)


def definition(name: str) -> AlgorithmDefinition:
    found = definitions().get(name)
    if found is None:
        raise ValueError(f"unknown algorithm {name!r}; valid: {valid_names()}")
    return found


def valid_names() -> str:
    return ", ".join(sorted(definitions()))


def privacy_denominator(spec) -> int:
    """The fixed number a private aggregate's noisy sum is divided by, which is also the
    expected number of updates per server step: FedBuff's K, else the round's cohort."""
    return definition(spec.algorithm.name).updates_per_step(spec.algorithm, spec.scheduler)


def config_union() -> Any:
    """The `algorithm:` section's type: the algorithms' config classes, told apart by `name`."""
    union = functools.reduce(operator.or_, (d.config for d in definitions().values()))
    return Annotated[union, Field(discriminator="name")]
