"""Studies: each method at each concurrency, tuned fairly on a grid, then run with several seeds.

An experiment with a `study:` block (`asyncfl.config.StudyConfig`) is run by `asyncfl compare`
as follows, all of it decided by the config:

1. Plan. For every method (a run of `runs:`) and every concurrency C it runs at, one
   single-run experiment per grid point: the experiment's settings, then `at_concurrency[C]`,
   the method's `set`, the grid point (all dotted keys, as for `--set`), the run's
   `scheduler.concurrency = C` and, for sync runs without a `round_timeout`, the
   `round_timeout_percentile`-th percentile of the population's trip durations. Every config is
   validated before anything runs.
2. Tune. The grid of each (method, C) runs with `tune_seed`, point after point in grid order.
   With `cap_grid_at_best`, a point stops once its virtual time passes the best time to target
   found so far (+1%): it can no longer be chosen, and the rule is the same for every method.
   The chosen point has the least time to target (ties: fewer trips, then grid order); when no
   point reaches the target, the highest best accuracy.
3. Seeds. The chosen point runs with each seed of `seeds` (the tuning run is reused for
   `tune_seed`). `ratios` then gives baseline / method for time, trips and bytes to target per
   seed and their spread, per concurrency.

Runs are pure functions of their config and seed, so `workers` > 1 (parallel processes, one
torch thread each) changes wall times only. Outputs: see `write_outputs`.
"""

from __future__ import annotations

import copy
import itertools
import json
import multiprocessing
import resource
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from asyncfl import config
from asyncfl.config import ConfigError, ExperimentConfig, StudyConfig, StudyMethod
from asyncfl.report import study as report
from asyncfl.sim.metrics import write_rows


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


# ---------------------------------------------------------------------------- planning
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


def trip_durations(cfg: ExperimentConfig) -> np.ndarray:
    """Virtual seconds of a whole trip (download, local steps, upload) for every device of the
    population as `cfg` draws it, from its own generator (the simulator's devices are another
    draw of the same distributions)."""
    from asyncfl.build import build_codecs, build_data, build_flat_model, build_trainer
    from asyncfl.sim.population import Population

    spec = cfg.runs[0]
    data = build_data(cfg)
    model = build_flat_model(cfg, data)
    trainer = build_trainer(cfg, spec, model)
    down, up = build_codecs(spec).payload_bytes(model.numel)
    pop = Population(cfg.population, np.random.default_rng([cfg.seed, 0x7D1]))
    sizes = np.asarray(data.client_sizes())
    n = sizes[np.arange(pop.size) % len(sizes)]
    uniq, inverse = np.unique(n, return_inverse=True)
    steps = np.array([trainer.num_steps(int(u)) for u in uniq], dtype=np.float64)[inverse]
    per_step = np.array([trainer.examples_per_step(int(u)) for u in uniq], dtype=np.float64)[inverse]
    return pop.trip_durations(steps, per_step, down, up)


def round_timeout(cfg: ExperimentConfig, percentile: float, cache: dict | None = None) -> float:
    """The `percentile`-th percentile of trip durations (seconds, 3 significant digits)."""
    key = json.dumps(
        [
            cfg.seed,
            percentile,
            cfg.population.model_dump(mode="json"),
            cfg.trainer.model_dump(mode="json"),
            cfg.model.model_dump(mode="json"),
            cfg.data.model_dump(mode="json"),
            cfg.runs[0].compression and cfg.runs[0].compression.model_dump(mode="json"),
        ],
        sort_keys=True,
    )
    if cache is not None and key in cache:
        return cache[key]
    value = float(np.percentile(trip_durations(cfg), percentile))
    value = float(f"{value:.3g}")
    if cache is not None:
        cache[key] = value
    return value


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


# ---------------------------------------------------------------------------- execution
def execute(tree: dict) -> dict:
    """Run one single-run experiment; returns its summary entry, evaluation rows and staleness."""
    from asyncfl.build import build_data
    from asyncfl.experiment import run_entry, run_one

    cfg = config.validate(tree)
    spec = cfg.runs[0]
    m = run_one(cfg, spec, build_data(cfg))
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


def _init_worker() -> None:
    torch.set_num_threads(1)


class _Inline:
    """The ProcessPoolExecutor interface in this process (workers = 1): a task runs when its
    result is first asked for, in submission order."""

    class _Done:
        def __init__(self, fn, args):
            self._call, self._value = (fn, args), None

        def result(self):
            if self._call is not None:
                fn, args = self._call
                self._value, self._call = fn(*args), None
            return self._value

    def submit(self, fn, *args):
        return self._Done(fn, args)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _entry_line(e: dict) -> str:
    hit = (
        f"target at {e['time_to_target']:.0f} s, {e['trips_to_target']:,} trips"
        if e["time_to_target"] is not None
        else f"no target (best {e['best_accuracy']:.3f} by {e['virtual_time']:.0f} s)"
    )
    return f"{e['name']}: {hit}, {e['server_steps']} steps, {e['wall_seconds']:.1f} s wall"


def run_study(cfg: ExperimentConfig, out: Path, console: Console | None = None, threads: int | str = "auto") -> dict:
    """`threads`: torch's threads for runs in this process (workers = 1), a count or "auto"
    (measured on the first method's run); worker processes use one thread each."""
    console = console or Console()
    st: StudyConfig = cfg.study
    t0 = time.perf_counter()
    groups = plan(cfg)  # validates every grid config before anything runs
    threads_used = _runs_threads(cfg, threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    n_grid = sum(len(g.grid) for g in groups)
    console.print(
        f"{cfg.name}: {len(groups)} (method, concurrency) groups, {n_grid} grid runs (seed {st.grid_seed}), "
        f"then {sum(len(g.seeds) for g in groups)} seed runs; {st.workers} worker(s)"
    )
    pool = (
        _Inline()
        if st.workers == 1
        else ProcessPoolExecutor(st.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    )
    finals: dict[tuple[str, int, int], dict] = {}
    # runs done out of all planned (grids count whole: a group's grid finishes as one task)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    bar = progress.add_task("study runs", total=n_grid + sum(len(g.seeds) for g in groups))
    progress.start()
    failed = True
    try:
        # largest concurrency first: the longest tasks start first and the pool stays busy
        pending = {
            pool.submit(tune, g.grid, st.cap_grid_at_best): ("grid", g, None)
            for g in sorted(groups, key=lambda g: -g.concurrency)
        }
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED) if st.workers > 1 else (list(pending), None)
            for fut in done:
                kind, g, seed = pending.pop(fut)
                if kind == "grid":
                    g.results = fut.result()
                    g.chosen = choose(g.results)
                    progress.advance(bar, len(g.grid))
                    for r in g.results:
                        write_run(r, out / "grid" / r["entry"]["name"])
                        console.print("  grid " + _entry_line(r["entry"]), highlight=False)
                    console.print(
                        f"{g.method} at C={g.concurrency}: chose grid point {g.chosen} {g.grid[g.chosen].point}",
                        highlight=False,
                    )
                    if st.grid_seed in st.seeds:
                        finals[(g.method, g.concurrency, st.grid_seed)] = _as_seed_run(g)
                    for s in g.seeds:
                        run = seed_run(cfg, g, s)
                        pending[pool.submit(execute, run.tree)] = ("seed", g, (s, run))
                else:
                    s, run = seed
                    r = fut.result()
                    progress.advance(bar)
                    r["entry"].update(stage="seed", method=g.method, params=run.point, grid_index=None)
                    finals[(g.method, g.concurrency, s)] = r
                    write_run(r, out / r["entry"]["name"])
                    console.print("  seed " + _entry_line(r["entry"]), highlight=False)
        failed = False
    finally:
        progress.stop()
        # after an error, drop the queued runs: they would all run before the error shows
        pool.shutdown(wait=True, cancel_futures=failed)
    wall = time.perf_counter() - t0
    for final in finals.values():  # the tuning seed's run, under its seed name
        write_run(final, out / final["entry"]["name"])
    return report.write_outputs(cfg, groups, finals, out, wall, peak_rss_mb(), console, threads_used)


def _runs_threads(cfg: ExperimentConfig, threads: int | str) -> dict:
    """Set and describe the torch threads runs use: one per worker process, else `threads`
    (measured on the first method's run when "auto")."""
    if cfg.study.workers > 1:
        return {"mode": "fixed", "threads": 1}
    from asyncfl.build import build_data
    from asyncfl.experiment import choose_threads

    return choose_threads(cfg, cfg.run(cfg.study.methods[0].name), build_data(cfg), threads).summary()


def _as_seed_run(g: Group) -> dict:
    """The chosen grid run stands as the tuning seed's run (same config, same seed: same result)."""
    r = copy.deepcopy(g.results[g.chosen])
    e = r["entry"]
    if e.get("grid_cap") is not None:
        # caps exist only once some point reached the target, and then the chosen one did: it
        # stopped at the target before its cap, so the uncapped run is the same run
        assert e["reached_target"]
        e["stop_max_time"] = r["config"]["stop"]["max_time"] = g.grid[g.chosen].tree["stop"]["max_time"]
        e["grid_cap"] = None
    e.update(
        name=f"{g.method}-C{g.concurrency}-s{e['seed']}",
        stage="seed",
        method=g.method,
        params=g.grid[g.chosen].point,
        grid_index=g.chosen,
    )
    r["config"]["runs"][0]["name"] = e["name"]
    return r


def peak_rss_mb() -> dict:
    """Peak resident set size of this process and of the largest finished child (MB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main": round(own, 1), "largest_worker": round(child, 1) if child else None}


def write_run(result: dict, run_dir: Path) -> None:
    """A run's metrics.csv, its resolved single-run config.yaml (rerun it with `asyncfl simulate
    --config`) and its summary entry (entry.json), written as soon as the run ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_rows(result["rows"], run_dir / "metrics.csv")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(result["config"], sort_keys=False))
    (run_dir / "entry.json").write_text(json.dumps(result["entry"], indent=2))
