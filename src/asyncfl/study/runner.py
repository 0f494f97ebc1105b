"""`run_study`: plan, tune each group's grid and run its seeds on a pool of worker processes,
in this process or as Ray tasks, write every run's files as it ends, then the study's report."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import yaml
from rich.console import Console

from asyncfl.config import ExperimentConfig, StudyConfig
from asyncfl.memory import peak_rss_mb
from asyncfl.report import study as report
from asyncfl.sim.metrics import write_rows
from asyncfl.study.planning import Group, plan, seed_run
from asyncfl.study.pool import finished, make_pool, on_ray, run_progress
from asyncfl.study.tuning import choose, execute, tune


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
    pool = make_pool(st.workers, st.backend, cfg.ray_address)
    if st.workers is None:  # Ray tasks, as many at once as the cluster has CPUs: reported as such
        st = st.model_copy(update={"workers": pool.workers})
        cfg = cfg.model_copy(update={"study": st})
    console.print(
        f"{cfg.name}: {len(groups)} (method, concurrency) groups, {n_grid} grid runs (seed {st.grid_seed}), "
        f"then {sum(len(g.seeds) for g in groups)} seed runs; {st.workers} worker(s){on_ray(st.backend)}"
    )
    finals: dict[tuple[str, int, int], dict] = {}
    # runs done out of all planned (grids count whole: a group's grid finishes as one task)
    progress = run_progress(console)
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
            for fut in finished(pool, pending):
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
    """Set and describe the torch threads runs use: one per worker process or Ray task, else
    `threads` (measured on the first method's run when "auto")."""
    if cfg.study.backend == "ray" or cfg.study.workers > 1:
        return {"mode": "fixed", "threads": 1}
    from asyncfl.experiment import choose_threads
    from asyncfl.study.shared import shared_data

    return choose_threads(cfg, cfg.run(cfg.study.methods[0].name), shared_data(cfg), threads).summary()


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


def write_run(result: dict, run_dir: Path) -> None:
    """A run's metrics.csv, its resolved single-run config.yaml (rerun it with `asyncfl simulate
    --config`) and its summary entry (entry.json), written as soon as the run ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_rows(result["rows"], run_dir / "metrics.csv")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(result["config"], sort_keys=False))
    (run_dir / "entry.json").write_text(json.dumps(result["entry"], indent=2))
