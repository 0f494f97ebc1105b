"""Notebook-style: run a preset's comparison from Python, look at the rows, plot them.

Each `# %%` block is a notebook cell (VS Code and Jupytext read them so).

    python examples/compare_and_plot.py [--quick] [--out DIR]
"""

# %%
from __future__ import annotations

import argparse

import asyncfl

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--quick", action="store_true", help="a short run (the test suite's)")
ap.add_argument("--out", help="folder for the CLI's outputs (default: a temporary one)")
args = ap.parse_args()

# %% the quickstart preset, shortened with overrides (the CLI's --set)
cfg = asyncfl.load_config("quickstart", overrides={"stop.max_time": 150 if args.quick else 800})

# %% every run of the preset side by side: FedAvg, FedProx, FedAsync, FedBuff
result = asyncfl.compare(cfg, out=args.out)
for run in result.summary["runs"]:
    print(f"{run['name']:>9}: final accuracy {run['final_accuracy']:.3f}, time to target {run['time_to_target']}")

# %% per-evaluation rows: a pandas DataFrame when pandas is installed, else a list of dicts
rows = result.metrics
records = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
for run in result.runs:
    mine = [r for r in records if r["run"] == run]
    print(
        f"{run:>9}: {len(mine)} evaluations, last at t={mine[-1]['virtual_time']:.0f} s after {mine[-1]['trips_started']} trips"
    )

# %% the CLI's figures (accuracy vs virtual time and vs trips, staleness)
for path in result.plot():
    print("figure:", path)
