"""What the default thread setting (`--threads auto`) costs against the best fixed setting.

For each case, measured side by side in one run: the simulation's wall time with one torch
thread, with torch's default (one per core), and with `auto` (its probe included). The ratio
auto / best fixed setting is what a user pays for not tuning threads by hand; on a busy
machine the default thread count can be many times slower than one thread, and auto should
track the faster of the two there too.

    python bench/threads.py [--json] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asyncfl import config
from asyncfl.build import build_data
from asyncfl.experiment import build_simulation, choose_threads

CASES = {
    # small model, sequential executor, one client per pass: threads can only wait
    "quickstart fedprox, sequential": ("quickstart", "fedprox", ["executor=sequential", "stop.max_time=300"]),
    # small model, batched passes of ~20 clients
    "quickstart fedbuff, batched": ("quickstart", "fedbuff", ["stop.max_time=400"]),
    # wide passes (concurrency 1,000): large matmuls, where threads can pay off
    "digits C=1000 fedbuff, batched": (
        "quickstart",
        "fedbuff",
        [
            "population.devices=5000",
            "data.num_clients=100",
            "runs.fedbuff.scheduler.concurrency=1000",
            "runs.fedbuff.algorithm.buffer_size=100",
            "stop.max_time=150",
            "model.hidden=[256]",
        ],
    ),
}


def timed_run(cfg, spec, data, threads) -> tuple[float, int]:
    """Wall seconds of choosing the threads (a probe for auto) plus the whole simulation."""
    before = torch.get_num_threads()
    t0 = time.perf_counter()
    choice = choose_threads(cfg, spec, data, threads)
    build_simulation(cfg, spec, data).run()
    wall = time.perf_counter() - t0
    torch.set_num_threads(before)
    return wall, choice.threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is kept")
    args = ap.parse_args()
    default = torch.get_num_threads()
    rows = []
    for case, (preset, run, sets) in CASES.items():
        cfg = config.load(preset=preset, overrides=sets)
        spec, data = cfg.run(run), build_data(cfg)
        best: dict[str, float] = {}
        chosen = None
        for _ in range(args.repeats):  # settings interleaved, so that a change of load hits all alike
            for label, threads in (("1", 1), (str(default), default), ("auto", "auto")):
                wall, used = timed_run(cfg, spec, data, threads)
                best[label] = min(best.get(label, float("inf")), wall)
                if label == "auto":
                    chosen = used
        fixed = min(best["1"], best[str(default)])
        rows.append(
            {
                "case": case,
                "seconds": best,
                "auto_threads": chosen,
                "auto_vs_best": best["auto"] / fixed,
                "default_vs_best": best[str(default)] / fixed,
            }
        )
    if args.json:
        print(json.dumps({"default_threads": default, "cases": rows}, indent=2))
        return
    print(f"torch default: {default} threads; best of {args.repeats} runs per setting (wall seconds)")
    print(f"| case | 1 thread | {default} threads | auto (chose) | auto / best | {default} threads / best |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        print(
            f"| {r['case']} | {s['1']:.2f} | {s[str(default)]:.2f} | {s['auto']:.2f} ({r['auto_threads']}) | "
            f"{r['auto_vs_best']:.2f}x | {r['default_vs_best']:.2f}x |"
        )


if __name__ == "__main__":
    main()
