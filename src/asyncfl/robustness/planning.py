"""A robustness matrix's plan: one validated single-run experiment per cell and seed."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

from asyncfl import config
from asyncfl.config import ConfigError, ExperimentConfig

NO_ATTACK = "no attack"


@dataclass(frozen=True)
class Cell:
    """One run behind one defence, under one attack at one attacker share (attack None: no
    attacker, fraction 0), with one seed."""

    run: str
    defence: str
    attack: str | None
    fraction: float
    seed: int
    tree: dict  # the single-run experiment, validated

    @property
    def column(self) -> str:
        return NO_ATTACK if self.attack is None else f"{self.attack} @ {self.fraction:.0%}"

    @property
    def slug(self) -> str:
        """A directory name for the cell's files."""
        parts = [self.run, self.defence, self.attack or "none", f"{self.fraction:g}", f"s{self.seed}"]
        return "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", p).strip("_") for p in parts)


def applies(defence: config.MatrixDefence, run: str) -> bool:
    return defence.runs is None or run in defence.runs


def plan(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell of the matrix, validated before anything runs (a defence that does not fit a
    run it claims to apply to is a config error naming both)."""
    rb = cfg.robustness
    base = cfg.model_dump(mode="json")
    base["robustness"] = None
    cases = [(None, 0.0)] + [(a, f) for a in rb.attacks for f in rb.fractions]
    cells = []
    for i, spec in enumerate(cfg.runs):
        for d in rb.defences:
            if not applies(d, spec.name):
                continue
            for attack, fraction in cases:
                for seed in rb.seeds:
                    tree = copy.deepcopy(base)
                    tree["runs"] = [copy.deepcopy(base["runs"][i])]
                    for key, value in d.set.items():
                        config.apply_override(tree, f"runs.0.{key}={json.dumps(value)}")
                    if attack is not None:
                        tree["population"]["attack"] = attack.population_attack(fraction)
                    tree["seed"] = seed
                    try:
                        config.validate(tree)
                    except ConfigError as err:
                        raise ConfigError(f"robustness: defence {d.name!r} on run {spec.name!r}: {err}") from None
                    cells.append(Cell(spec.name, d.name, attack and attack.name, fraction, seed, tree))
    return cells
