"""A study's plan: for each (method, concurrency) group, one validated single-run experiment
per grid point (the tuning seed), and later one per other seed at the chosen point."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

from asyncfl import config
from asyncfl.config import ConfigError, ExperimentConfig, StudyMethod
from asyncfl.study.timeouts import round_timeout


@dataclass
class PlannedRun:
    method: str
    concurrency: int
    seed: int
    point: dict  # the grid point's {dotted key: value}
    grid_index: int | None  # position in the grid (grid runs), None for seed runs
    tree: dict  # the single-run experiment, validated
    name: str = ""


@dataclass
class Group:
    """One method at one concurrency: its grid points (tune seed) and its other seeds."""

    method: str
    concurrency: int
    grid: list[PlannedRun]
    seeds: list[int]
    results: list[dict] = field(default_factory=list)  # grid results, in grid order
    chosen: int | None = None


def grid_points(m: StudyMethod, concurrency: int) -> list[dict]:
    """The grid at a concurrency, in product order (the first key varies slowest)."""
    grid = m.grid_for(concurrency)
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def _set(tree: dict, key: str, value) -> None:
    config.apply_override(tree, f"{key}={json.dumps(value)}")  # JSON is YAML: the value arrives unchanged


def base_tree(cfg: ExperimentConfig) -> dict:
    tree = cfg.model_dump(mode="json")
    tree["study"] = None
    return tree


def run_tree(
    cfg: ExperimentConfig,
    method: StudyMethod,
    concurrency: int,
    seed: int,
    point: dict,
    name: str,
    round_timeouts: dict | None = None,
) -> dict:
    """The validated single-run experiment of one (method, concurrency, seed, grid point)."""
    st = cfg.study
    tree = base_tree(cfg)
    tree["seed"] = seed
    where = f"study (method {method.name}, concurrency {concurrency})"
    try:
        _set(tree, f"runs.{method.name}.scheduler.concurrency", concurrency)
        for source in (st.at_concurrency.get(concurrency, {}), method.set, point):
            for key, value in source.items():
                _set(tree, key, value)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    tree["runs"] = [r for r in tree["runs"] if r["name"] == method.name]
    tree["runs"][0]["name"] = name
    try:
        run_cfg = config.validate(tree)
    except ConfigError as err:
        raise ConfigError(f"{where}, grid point {point}: {err}") from None
    sched = run_cfg.runs[0].scheduler
    if sched.mode == "sync" and sched.round_timeout is None and st.round_timeout_percentile is not None:
        timeout = round_timeout(run_cfg, st.round_timeout_percentile, round_timeouts)
        tree["runs"][0]["scheduler"]["round_timeout"] = timeout
        run_cfg = config.validate(tree)
    return run_cfg.model_dump(mode="json")


def plan(cfg: ExperimentConfig) -> list[Group]:
    st = cfg.study
    if st is None:
        raise ConfigError("this experiment has no study: block")
    timeouts: dict = {}
    groups = []
    for m in st.methods:
        for c in st.method_concurrency(m):
            points = grid_points(m, c)
            runs = []
            for i, point in enumerate(points):
                name = f"{m.name}-C{c}-g{i}"
                runs.append(
                    PlannedRun(
                        m.name,
                        c,
                        st.grid_seed,
                        point,
                        i,
                        run_tree(cfg, m, c, st.grid_seed, point, name, timeouts),
                        name,
                    )
                )
            groups.append(Group(m.name, c, runs, [s for s in st.seeds if s != st.grid_seed]))
    return groups


def seed_run(cfg: ExperimentConfig, g: Group, seed: int) -> PlannedRun:
    m = next(m for m in cfg.study.methods if m.name == g.method)
    point = g.grid[g.chosen].point
    name = f"{g.method}-C{g.concurrency}-s{seed}"
    return PlannedRun(
        g.method, g.concurrency, seed, point, None, run_tree(cfg, m, g.concurrency, seed, point, name), name
    )
