"""What a secure round's sum carries for each algorithm, and how it becomes the one update the
server folds in: the server never sees an update, so each algorithm that allows secure
aggregation must get its step from sums alone.

- FedAvg, FedProx, Per-FedAvg: clients send delta_i with weight n_i; the sum / sum_i n_i is the
  example-weighted mean, folded in as one update of n = sum_i n_i.
- FedNova (`example_weight: n`): clients send [d_i / a_i, a_i r / A] with weight n_i (a_i their
  local work, A the largest, r the clip range); the server folds in
  sum_i n_i d_i / a_i x sum_i n_i a_i / W^2, which FedNova's step turns into exactly its
  tau_eff sum_i p_i d_i (one update of any local work a: (W / a) x (W a) / W^2 = 1).
- SCAFFOLD: clients send [delta_i, dc_i] with weight 1; the server folds in the uniform mean of
  the deltas with the sum of the control deltas, the two sums its step reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from asyncfl.algorithms.aggregators import BufferedAggregator
from asyncfl.algorithms.fednova import FedNova, local_work
from asyncfl.algorithms.scaffold import CONTROL_DELTA, ScaffoldAggregator
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.config import ConfigError


@dataclass(frozen=True)
class SumForm:
    """`model_length` coordinates per update; `work`: FedNova's lr, mu, max_steps and `scale`
    (the largest local work); `controls`: SCAFFOLD's control deltas follow the delta."""

    model_length: int
    max_weight: int
    work: dict | None = None
    controls: bool = False

    @property
    def length(self) -> int:
        """Coordinates a client encodes."""
        return 2 * self.model_length if self.controls else self.model_length + (self.work is not None)

    def encoding(self) -> dict:
        """What a client needs to build its vector (client.secure.secure_values) and weight."""
        return {
            "max_weight": self.max_weight,
            "local_work": self.work,
            "unit_weight": self.controls,
            "upload_fields": [CONTROL_DELTA] if self.controls else [],
        }

    def update(self, weighted: np.ndarray, total: int, clip_range: float, base_version: int) -> ClientUpdate:
        """The one update that makes the aggregator step as on the round's plaintext updates;
        `weighted` is the decoded sum, `total` the sum of the weights."""
        extras = None
        if self.controls:
            delta = weighted[: self.model_length] / total
            extras = {CONTROL_DELTA: torch.from_numpy(weighted[self.model_length :]).to(torch.float32)}
        elif self.work is None:
            delta = weighted / total
        else:
            work = weighted[-1] * self.work["scale"] / clip_range
            delta = weighted[:-1] * work / total**2
        return ClientUpdate(
            client_id=0,
            base_version=base_version,
            delta=torch.from_numpy(delta).to(torch.float32),
            n_examples=total,
            steps=1,
            loss=math.nan,
            extras=extras,
        )


def sum_form(spec, aggregator, model_length: int, bounds) -> SumForm:
    """The run's form; a ConfigError names why its server step cannot come from sums.
    `bounds`: what an update may report (the example count bounds its weight)."""
    a = spec.algorithm
    if isinstance(aggregator, ScaffoldAggregator):
        return SumForm(model_length, 1, controls=True)
    if isinstance(aggregator, FedNova) and getattr(a, "example_weight", "n") == "n":
        most = bounds.max_steps if aggregator.max_steps is None else min(bounds.max_steps, aggregator.max_steps)
        work = {
            "lr": aggregator.lr,
            "mu": aggregator.mu,
            "max_steps": aggregator.max_steps,
            "scale": local_work(most, aggregator.lr, aggregator.mu),
        }
        return SumForm(model_length, bounds.max_examples, work)
    why = None
    if not (isinstance(aggregator, BufferedAggregator) and aggregator.normalize == "weight"):
        why = f"{a.name}'s server step needs more than sums of the updates (fednova: example_weight 'n' only)"
    elif getattr(a, "partial_weight", "full") != "full":
        why = "partial_weight 'work_fraction' weighs updates by a fraction, not an integer example count"
    if why is not None:
        raise ConfigError(f"run {spec.name!r}: secure_aggregation over HTTP: {why}")
    return SumForm(model_length, bounds.max_examples)
