"""Running a study's runs: one run, a group's grid with each point capped at the best time to
target so far, and the choice of the best point. `execute` and `tune` are what the pool runs:
they stay at module level, where worker processes (spawn) import them by name."""

from __future__ import annotations

import copy

from asyncfl import config
from asyncfl.study.planning import PlannedRun
from asyncfl.study.shared import shared_data


def execute(tree: dict) -> dict:
    """Run one single-run experiment; returns its summary entry, evaluation rows and staleness."""
    from asyncfl.experiment import run_entry, run_one

    cfg = config.validate(tree)
    spec = cfg.runs[0]
    m = run_one(cfg, spec, shared_data(cfg))
    entry = run_entry(cfg, spec, m)
    entry["reached_target"] = entry["time_to_target"] is not None
    # server steps per virtual hour, over the run (which stops at the target when stop.at_target)
    entry["steps_per_hour"] = 3600.0 * m.server_steps / m.virtual_time if m.virtual_time > 0 else None
    entry["round_timeout"] = spec.scheduler.round_timeout
    entry["stop_max_time"] = cfg.stop.max_time
    return {"entry": entry, "rows": m.rows, "config": cfg.model_dump(mode="json")}


def _capped(tree: dict, best: float | None) -> tuple[dict, float | None]:
    if best is None:
        return tree, None
    cap = best * 1.01
    if cap >= tree["stop"]["max_time"]:
        return tree, None
    tree = copy.deepcopy(tree)
    tree["stop"]["max_time"] = cap
    return tree, cap


def choose(results: list[dict]) -> int:
    """Least time to target, then fewer trips, then grid order; none reached: best accuracy."""
    reached = [i for i, r in enumerate(results) if r["entry"]["time_to_target"] is not None]
    if reached:
        return min(
            reached, key=lambda i: (results[i]["entry"]["time_to_target"], results[i]["entry"]["trips_to_target"], i)
        )
    return max(range(len(results)), key=lambda i: (results[i]["entry"]["best_accuracy"], -i))


def tune(grid: list[PlannedRun], cap_at_best: bool) -> list[dict]:
    """Run a group's grid in order, each point capped at the best time to target so far."""
    results, best = [], None
    for run in grid:
        tree, cap = _capped(run.tree, best if cap_at_best else None)
        r = execute(tree)
        r["entry"].update(
            stage="grid", method=run.method, params=run.point, grid_index=run.grid_index, grid_cap=cap
        )  # grid_cap: stopped at this virtual time, it could no longer be the fastest
        results.append(r)
        t = r["entry"]["time_to_target"]
        if t is not None and (best is None or t < best):
            best = t
    return results
