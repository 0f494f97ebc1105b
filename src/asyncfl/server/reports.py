"""What a client reports besides its delta (example count, local steps, losses) is its own
claim: n_examples is its weight in FedAvg, steps scales FedNova's step, start_loss is q-FedAvg's
weight F^q. The server trusts each only within bounds derived from the task, and requires the
fields the run's algorithm reads (`AlgorithmDefinition.reported`)."""

from __future__ import annotations

from dataclasses import dataclass

from asyncfl import wire
from asyncfl.server.errors import ApiError

# Clients may do more local work than the trainer plans (FedNova exists to normalize such
# heterogeneous work), but not unboundedly more: steps scale FedNova's server step.
STEPS_MARGIN = 10


@dataclass(frozen=True)
class ReportBounds:
    """max_examples: the largest example count (the task's largest client partition unless
    configured); max_steps: STEPS_MARGIN x the local steps the trainer plans for that many
    examples;
    max_loss: the largest loss accepted (a sane model's cross-entropy is a few units; 1e4 is a
    diverged client, and keeps q-FedAvg's F^q finite); required: the algorithm's `reported`."""

    max_examples: int
    max_steps: int
    max_loss: float
    required: tuple[str, ...] = ()

    def check(self, h: wire.UpdateHeader, algorithm: str) -> None:
        """422 naming the first reported value out of bounds or missing."""
        if h.n_examples > self.max_examples:
            raise ApiError(
                422,
                "n_examples_too_large",
                f"n_examples {h.n_examples} exceeds {self.max_examples}, the most any client of this task holds "
                "(server.max_examples)",
            )
        for name, value in (("steps", h.steps), ("planned_steps", h.planned_steps)):
            if value is not None and value > self.max_steps:
                raise ApiError(
                    422,
                    "bad_steps",
                    f"{name} {value} exceeds {self.max_steps} ({STEPS_MARGIN} x the task trainer's plan)",
                )
        if h.planned_steps is not None and h.steps > h.planned_steps:
            raise ApiError(422, "bad_steps", f"steps {h.steps} exceeds planned_steps {h.planned_steps}")
        if "steps" in self.required and h.steps < 1:
            raise ApiError(
                422, "bad_steps", f"{algorithm} needs at least one local step (steps {h.steps}): it normalizes by them"
            )
        if "start_loss" in self.required and h.start_loss is None:
            raise ApiError(
                422, "missing_start_loss", f"{algorithm} needs start_loss, the client's loss at the downloaded model"
            )
        for name, value in (("loss", h.loss), ("start_loss", h.start_loss)):
            if value is not None and not 0 <= value <= self.max_loss:
                raise ApiError(422, "bad_loss", f"{name} {value:g} is outside [0, {self.max_loss:g}] (server.max_loss)")
