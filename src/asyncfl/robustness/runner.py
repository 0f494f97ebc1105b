"""`run_robustness`: every cell of the matrix on a pool of worker processes, in this process
or as Ray tasks, each run's files written as it ends, then the matrix's report."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from rich.console import Console

from asyncfl.config import ExperimentConfig
from asyncfl.report import robustness as report
from asyncfl.robustness.planning import plan
from asyncfl.study.pool import finished, make_pool, on_ray, run_progress
from asyncfl.study.runner import peak_rss_mb, write_run
from asyncfl.study.tuning import execute


def run_robustness(
    cfg: ExperimentConfig, out: Path, console: Console | None = None, threads: int | str = "auto"
) -> dict:
    """Run the matrix; returns the summary written to `out/summary.json`. `threads`: torch's
    threads for runs in this process (workers = 1), a count or "auto" (measured on the first
    run); worker processes and Ray tasks use one thread each."""
    console = console or Console()
    rb = cfg.robustness
    t0 = time.perf_counter()
    cells = plan(cfg)
    if rb.backend == "local" and rb.workers == 1:
        from asyncfl.experiment import choose_threads
        from asyncfl.study.shared import shared_data

        choose_threads(cfg, cfg.runs[0], shared_data(cfg), threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    pool = make_pool(rb.workers, rb.backend, cfg.ray_address)
    console.print(
        f"{cfg.name}: {len(cells)} runs ({len(cfg.runs)} run(s) x defences x "
        f"{1 + len(rb.attacks) * len(rb.fractions)} attack cases x {len(rb.seeds)} seeds); "
        f"{rb.workers or pool.workers} worker(s){on_ray(rb.backend)}"
    )
    results: dict[int, dict] = {}
    progress = run_progress(console)
    bar = progress.add_task("matrix runs", total=len(cells))
    progress.start()
    failed = True
    try:
        pending = {pool.submit(execute, c.tree): i for i, c in enumerate(cells)}
        while pending:
            for fut in finished(pool, pending):
                i = pending.pop(fut)
                r = results[i] = fut.result()
                write_run(r, out / "runs" / cells[i].slug)
                progress.advance(bar)
                if not console.is_terminal:
                    c = cells[i]
                    console.print(
                        f"  {c.run} / {c.defence} / {c.column} / seed {c.seed}: "
                        f"final accuracy {r['entry']['final_accuracy']:.3f}",
                        highlight=False,
                    )
        failed = False
    finally:
        progress.stop()
        pool.shutdown(wait=True, cancel_futures=failed)
    entries = [results[i]["entry"] for i in range(len(cells))]
    return report.write_outputs(cfg, cells, entries, out, time.perf_counter() - t0, peak_rss_mb(), console)
