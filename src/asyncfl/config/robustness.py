"""Robustness matrices: every run against every attack at every attacker share, behind every
defence, with several seeds (`asyncfl compare` runs them; `asyncfl.robustness`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from asyncfl.attacks import AttackKind
from asyncfl.config.base import Strict
from asyncfl.config.study import Backend, Workers, default_workers


class MatrixAttack(Strict):
    """One attack of the matrix, as `population.attack` takes it (its fraction comes from
    `robustness.fractions`)."""

    name: str = Field(min_length=1, description="column label, e.g. 'sign flip x10'")
    kind: AttackKind
    factor: float = Field(default=10.0, gt=0, description="sign_flip / scale: the multiplier")
    noise_std: float = Field(default=1.0, gt=0, description="gaussian / collude: std per coordinate")

    def population_attack(self, fraction: float) -> dict:
        return {"fraction": fraction, "kind": self.kind, "factor": self.factor, "noise_std": self.noise_std}


class MatrixDefence(Strict):
    """One defence: dotted keys (as for --set) set on each run it applies to, relative to the
    run, e.g. {algorithm.aggregation: median} or {norm_guard: {}}; {} is no defence."""

    name: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict, description="run-relative dotted key -> value")
    runs: list[str] | None = Field(
        default=None, min_length=1, description="the runs it applies to (default: all); others show n/a"
    )
    why_not: str | None = Field(default=None, description="why it does not apply to the other runs (for the table)")


class RobustnessConfig(Strict):
    """Each run of `runs:`, behind each defence, with no attack and with each attack at each
    fraction of malicious devices, once per seed; the report is a table of final accuracy
    (mean over seeds) and each cell's cost against the same run and defence without attack."""

    attacks: list[MatrixAttack] = Field(min_length=1)
    fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default=[0.1, 0.2, 0.3], min_length=1)
    defences: list[MatrixDefence] = Field(min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default=[0, 1, 2], min_length=1)
    goal: dict[str, Any] | None = Field(
        default=None,
        description="{defence, fraction, attacks: [names], max_cost}: the claim the report checks (cost in "
        "accuracy points against no attack, for every run)",
    )
    backend: Backend = "local"
    workers: Workers = None

    @model_validator(mode="after")
    def _consistent(self):
        self.workers = default_workers(self.backend, self.workers)
        for what, names in (
            ("attacks", [a.name for a in self.attacks]),
            ("defences", [d.name for d in self.defences]),
            ("seeds", self.seeds),
            ("fractions", self.fractions),
        ):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} repeat: {names}")
        if self.goal is not None:
            g = self.goal
            if set(g) != {"defence", "fraction", "attacks", "max_cost"}:
                raise ValueError("goal: give exactly defence, fraction, attacks and max_cost")
            if g["defence"] not in {d.name for d in self.defences}:
                raise ValueError(f"goal.defence: {g['defence']!r} is not a defence")
            if g["fraction"] not in self.fractions:
                raise ValueError(f"goal.fraction: {g['fraction']} is not one of fractions {self.fractions}")
            unknown = set(g["attacks"]) - {a.name for a in self.attacks}
            if unknown:
                raise ValueError(f"goal.attacks: not attacks of the matrix: {sorted(unknown)}")
        return self
