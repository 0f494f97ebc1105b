"""Simulator at scale: 10^6 devices, 10^4 training at once, batched executor, on CPU.

Reports events/s, client-updates/s, peak RSS and where the wall time goes, so the
non-training overhead (event heap, device selection, trip bookkeeping, data gathering,
aggregation, metrics, evaluation) can be checked against the training itself.

    python bench/scale.py [--json] [--devices 1000000] [--concurrency 10000] [--trips 60000]

The first 10^4 trips start with nothing to report and the 10^4 in flight at the stop are trained
without their reports being processed; these transients favour the training share, so the run
is six times the concurrency long to keep them small.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from functools import wraps

import torch

from asyncfl import config
from asyncfl.experiment import build_simulation


def build(devices: int, concurrency: int, trips: int, memory_mb: float, **settings):
    """The simulation; `settings` replace top-level config fields (e.g. executor="ray")."""
    tree = {
        "name": "scale",
        "seed": 0,
        "executor": "batched",
        "executor_memory_mb": memory_mb,
        "data": {"num_clients": 100, "partition": {"kind": "iid"}},  # devices reuse partitions modulo
        "model": {"name": "mlp", "hidden": [64]},
        "population": {"devices": devices, "dropout": 0.05},
        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
        "eval": {"every_seconds": 2.0},
        "stop": {"max_time": 1e9, "max_trips": trips},
        "runs": [
            {
                "name": "fedbuff",
                "algorithm": {"name": "fedbuff", "buffer_size": 100},
                "scheduler": {"mode": "async", "concurrency": concurrency},
            }
        ],
    }
    cfg = config.validate({**tree, **settings})
    return build_simulation(cfg, cfg.runs[0])


class Timers:
    """Wall time spent inside wrapped callables; the wrappers do not nest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr)
        self.seconds.setdefault(label, 0.0)
        self.calls.setdefault(label, 0)

        @wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(obj, attr, timed)


def breakdown(devices: int, concurrency: int, trips: int, memory_mb: float) -> tuple[dict[str, float], float]:
    """Where the wall time goes, from a second, instrumented run of the same simulation: the
    per-call timers cost about a microsecond each, so the headline figures come from the first,
    uninstrumented run."""
    sim = build(devices, concurrency, trips, memory_mb)
    timers = Timers()
    timers.wrap(sim.population, "pick", "device selection")
    timers.wrap(sim, "_start_trip", "trip start (seed, durations, submit)")
    timers.wrap(sim.aggregator, "submit", "aggregation")
    timers.wrap(sim.metrics, "on_verdict", "metrics")
    timers.wrap(sim.metrics, "record", "metrics")
    m = sim.run()
    ex = sim.executor
    parts = {
        "training (vectorised passes)": ex.train_seconds,
        "data gathering (minibatch indices, start models, results)": ex.gather_seconds,
        "evaluation (batched)": sim.evaluations.seconds,
        **timers.seconds,
    }
    parts["event loop (heap, dispatch, policy)"] = max(0.0, m.wall_seconds - sum(parts.values()))
    return parts, m.wall_seconds


def run(devices: int, concurrency: int, trips: int, memory_mb: float) -> dict:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    sim = build(devices, concurrency, trips, memory_mb)
    setup = time.perf_counter() - t0
    m = sim.run()
    wall = m.wall_seconds
    ex = sim.executor
    events = m.started + m.completed + m.dropped + len(m.rows)  # pushes that were popped, roughly
    train = ex.train_seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final_accuracy = m.rows[-1]["test_accuracy"]
    started, completed, trained, steps, vtime = m.started, m.completed, ex.trained, m.server_steps, m.virtual_time
    executor = type(ex).__name__
    del sim, m, ex
    parts, parts_wall = breakdown(devices, concurrency, trips, memory_mb)
    return {
        "devices": devices,
        "concurrency": concurrency,
        "executor": executor,
        "torch_threads": torch.get_num_threads(),
        "trips_started": started,
        "client_updates": completed,  # updates delivered to the aggregator
        "client_updates_trained": trained,  # includes pooled work still in flight at the stop
        "server_steps": steps,
        "virtual_time": vtime,
        "wall_seconds": wall,
        "setup_seconds": setup,
        "events": events,
        "events_per_s": events / wall,
        "updates_per_s": completed / wall,
        "trained_per_s": trained / wall,
        "final_accuracy": final_accuracy,
        "peak_rss_mb": peak,
        "rss_before_mb": rss0,
        "training_seconds": train,
        "overhead_fraction": 1.0 - train / wall,
        "breakdown_seconds": parts,  # from the instrumented run
        "breakdown_wall_seconds": parts_wall,
        # the same per update delivered: what each part costs a report, comparable across run lengths
        "breakdown_us_per_update": {k: 1e6 * v / completed for k, v in parts.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=10_000)
    ap.add_argument("--trips", type=int, default=60_000, help="stop after this many trips started")
    ap.add_argument("--memory-mb", type=float, default=512.0, help="batched executor budget per pass")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice); 1 is "
        "steadier on a shared machine, where waiting OpenMP threads slow small ops down",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.devices, args.concurrency, args.trips, args.memory_mb)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 100))
    t = Table(
        title=f"{r['devices']:,} devices, concurrency {r['concurrency']:,}, {r['executor']}, "
        f"{r['torch_threads']} torch threads"
    )
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, fmt in [
        ("trips_started", ",d"),
        ("client_updates", ",d"),
        ("client_updates_trained", ",d"),
        ("server_steps", ",d"),
        ("virtual_time", ",.0f"),
        ("wall_seconds", ".1f"),
        ("events_per_s", ",.0f"),
        ("updates_per_s", ",.0f"),
        ("trained_per_s", ",.0f"),
        ("final_accuracy", ".3f"),
        ("peak_rss_mb", ",.0f"),
        ("overhead_fraction", ".1%"),
    ]:
        t.add_row(k, format(r[k], fmt))
    con.print(t)
    b = Table(title=f"where the wall time goes (a run with per-call timers: {r['breakdown_wall_seconds']:.1f} s)")
    b.add_column("part")
    b.add_column("seconds", justify="right")
    b.add_column("share", justify="right")
    b.add_column("µs per update", justify="right")
    for k, v in sorted(r["breakdown_seconds"].items(), key=lambda kv: -kv[1]):
        b.add_row(k, f"{v:.2f}", f"{v / r['breakdown_wall_seconds']:.1%}", f"{r['breakdown_us_per_update'][k]:.1f}")
    con.print(b)


if __name__ == "__main__":
    main()
