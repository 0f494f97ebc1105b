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
torch thread each) or `backend: ray` (Ray tasks, one CPU and one torch thread each) changes wall
times only. Outputs: see `asyncfl.report.study.write_outputs`.

Modules: `planning` (the runs and their configs), `timeouts` (sync runs' default round
timeouts), `tuning` (running one run, the capped grid, the choice), `pool` / `ray_pool` (where
runs execute) and `runner` (`run_study`, its pool of workers and the runs' files).
"""

from asyncfl.study.planning import Group, PlannedRun, base_tree, grid_points, plan, run_tree, seed_run
from asyncfl.study.runner import peak_rss_mb, run_study, write_run
from asyncfl.study.timeouts import round_timeout, trip_durations
from asyncfl.study.tuning import choose, execute, tune

__all__ = [
    "Group",
    "PlannedRun",
    "base_tree",
    "choose",
    "execute",
    "grid_points",
    "peak_rss_mb",
    "plan",
    "round_timeout",
    "run_study",
    "run_tree",
    "seed_run",
    "trip_durations",
    "tune",
    "write_run",
]
