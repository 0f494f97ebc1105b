"""Outputs of a study (`asyncfl.study`): summary.json, study.md (tables), metrics CSVs and plots.

- `summary.json`: the usual `preset`, `target_accuracy`, `seed` (the tuning seed), `runs` (one
  entry per method, concurrency and seed, with the usual fields plus `method`, `stage`,
  `params` (the chosen grid point), `grid_index`, `reached_target`, `steps_per_hour`,
  `round_timeout`) and `data`; and `grid` (every grid run's entry, with `grid_cap` when it was
  stopped for being unable to win), `chosen`, `ratios` (per concurrency: baseline / method for
  time, trips and bytes to target, per seed and as mean, std, min, max, geomean) and `study`
  (the settings, the grids, wall seconds and peak memory).
- `study.md`: the ratio table, a per-method table (mean and spread over seeds) and the grid.
- `RUN/metrics.csv`, `RUN/config.yaml` (the resolved single-run experiment) and `RUN/entry.json`
  per seed run, the same under `grid/RUN/` per grid run; written as each run ends.
- `accuracy_vs_time.png`, `accuracy_vs_trips.png` (a panel per concurrency, one colour per
  method, a line per seed), `steps_per_hour.png` (server steps per virtual hour vs
  concurrency), `to_target.png` (time and trips to target vs concurrency), `client_sizes.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from asyncfl.report.ratios import ratios, spread  # noqa: E402
from asyncfl.report.table import summary_table  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def write_outputs(
    cfg, groups, finals: dict, out: Path, wall: float, rss: dict, console: Console, threads: dict | None = None
) -> dict:
    from asyncfl.data.imbalance import data_summary
    from asyncfl.study.shared import shared_data

    st = cfg.study
    methods = [m.name for m in st.methods]
    order = {m: i for i, m in enumerate(methods)}
    keys = sorted(finals, key=lambda k: (k[1], order[k[0]], st.seeds.index(k[2]) if k[2] in st.seeds else k[2]))
    runs = [finals[k]["entry"] for k in keys]
    grid = [dict(r["entry"], chosen=r["entry"]["grid_index"] == g.chosen) for g in groups for r in g.results]
    ratio_blocks = ratios(st, finals)
    data = shared_data(cfg.model_copy(update={"seed": st.grid_seed}))
    # what the shared model of synthetic data alone scores: the task's ceiling on held-out devices
    common = data.common_model_accuracy if getattr(data, "common_model", 0) else None
    summary = {
        "preset": cfg.name,
        "target_accuracy": cfg.target_accuracy,
        "seed": st.grid_seed,
        "runs": runs,
        "grid": grid,
        "chosen": [
            {"method": g.method, "concurrency": g.concurrency, "grid_index": g.chosen, "params": g.grid[g.chosen].point}
            for g in groups
        ],
        "ratios": ratio_blocks,
        "study": {
            "concurrency": st.concurrency,
            "seeds": st.seeds,
            "tune_seed": st.grid_seed,
            "methods": {
                m.name: {
                    "concurrency": st.method_concurrency(m),
                    "set": m.set,
                    "grid": {str(c): m.grid_for(c) for c in st.method_concurrency(m)},
                }
                for m in st.methods
            },
            "at_concurrency": {str(c): v for c, v in st.at_concurrency.items()},
            "round_timeout_percentile": st.round_timeout_percentile,
            "cap_grid_at_best": st.cap_grid_at_best,
            "workers": st.workers,
            "threads": threads,  # torch threads of the runs: one per worker process, else as chosen
            "wall_seconds": wall,
            "peak_rss_mb": rss,
            "runs_executed": len(grid) + sum(1 for e in runs if e["stage"] == "seed" and e.get("grid_index") is None),
        },
        "data": data_summary(
            cfg.data, data.client_sizes(), out, **({"common_model_accuracy": common()} if common else {})
        ),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "study.md").write_text(markdown(summary))
    plot_study(summary, finals, out, methods)
    console.print(summary_table(summary))
    console.print(ratio_table(summary))
    console.print(
        f"{cfg.name}: {wall:.0f} s wall, peak RSS {rss['main']:.0f} MB (main)"
        + (f", {rss['largest_worker']:.0f} MB (largest worker)" if rss.get("largest_worker") else "")
    )
    console.print(
        f"results in {out}/ (summary.json, study.md, config.yaml, */metrics.csv, grid/*/metrics.csv, "
        "accuracy_vs_time.png, accuracy_vs_trips.png, steps_per_hour.png, to_target.png, client_sizes.png)"
    )
    return summary


# ---------------------------------------------------------------------------- tables
def _pm(s: dict, fmt: str = ".2f", unit: str = "x", extent: bool = True) -> str:
    """A `study.spread` as "mean ± sd (min–max)" (the range only with `extent`), "—" when empty."""
    if not s or s.get("n", 0) == 0:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:{fmt}}{unit}"
    text = f"{s['mean']:{fmt}}{unit} ± {s['std']:{fmt}}"
    return f"{text} ({s['min']:{fmt}}–{s['max']:{fmt}})" if extent else text


def ratio_table(summary: dict) -> Table:
    t = Table(
        title=f"{summary['preset']}: baseline / method to target accuracy {summary['target_accuracy']:g} "
        "(mean ± sd over seeds, min–max)"
    )
    for col in ("C", "baseline / method", "time", "trips", "bytes", "seeds reaching"):
        t.add_column(col, justify="left" if col == "baseline / method" else "right")
    for b in summary["ratios"]:
        t.add_row(
            f"{b['concurrency']:,}",
            f"{b['baseline']} / {b['method']}",
            _pm(b["time"]),
            _pm(b["trips"]),
            _pm(b["bytes"]),
            f"{b['seeds_both_reached']}/{len(b['per_seed'])}",
        )
    return t


def _stat(values: list, fmt: str) -> str:
    """ "mean ± sd" over the seeds that have a value."""
    return _pm(spread([x for x in values if x is not None]), fmt, unit="", extent=False)


def per_method_rows(summary: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for e in summary["runs"]:
        groups.setdefault((e["method"], e["concurrency"]), []).append(e)
    rows = []
    for (method, c), es in groups.items():
        rows.append(
            {
                "method": method,
                "mode": es[0]["mode"],
                "concurrency": c,
                "reached": f"{sum(e['reached_target'] for e in es)}/{len(es)}",
                "time": _stat([e["time_to_target"] for e in es], ",.0f"),
                "trips": _stat([e["trips_to_target"] for e in es], ",.0f"),
                "bytes": _stat(
                    [e["bytes_to_target"] / 1e6 if e["bytes_to_target"] is not None else None for e in es], ",.1f"
                ),
                "steps": _stat([e["server_steps"] for e in es], ",.0f"),
                "steps_per_hour": _stat([e["steps_per_hour"] for e in es], ",.0f"),
                "staleness": _stat([e["mean_staleness"] for e in es], ".1f"),
                "p99": _stat([e["p99_staleness"] for e in es], ".0f"),
                "wall": _stat([e["wall_seconds"] for e in es], ".1f"),
                "params": es[0]["params"],
            }
        )
    return rows


def markdown(summary: dict) -> str:
    st = summary["study"]
    lines = [
        f"# {summary['preset']}: target accuracy {summary['target_accuracy']:g}",
        "",
        f"Seeds {st['seeds']} (grid on seed {st['tune_seed']}); wall time {st['wall_seconds']:.0f} s with "
        f"{st['workers']} worker(s); peak RSS {st['peak_rss_mb']['main']:.0f} MB (main process)"
        + (
            f", {st['peak_rss_mb']['largest_worker']:.0f} MB (largest worker)"
            if st["peak_rss_mb"].get("largest_worker")
            else ""
        )
        + ".",
        "",
        "## Ratios (baseline / method; > 1: method is better)",
        "",
        "| C | baseline / method | time to target | trips to target | bytes to target | seeds where both reached |",
        "|---|---|---|---|---|---|",
    ]
    for b in summary["ratios"]:
        lines.append(
            f"| {b['concurrency']:,} | {b['baseline']} / {b['method']} | {_pm(b['time'])} | {_pm(b['trips'])} "
            f"| {_pm(b['bytes'])} | {b['seeds_both_reached']}/{len(b['per_seed'])} |"
        )
    lines += [
        "",
        "mean ± sample sd over seeds (min–max).",
        "",
        "## Per method (mean ± sd over seeds)",
        "",
        "| method | mode | C | reached | time to target (s) | trips to target | MB to target | server steps "
        "| steps / hour | mean staleness | p99 staleness | wall (s) | chosen grid point |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in per_method_rows(summary):
        params = ", ".join(f"`{k}`={v}" for k, v in r["params"].items()) or "—"
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['concurrency']:,} | {r['reached']} | {r['time']} | {r['trips']} "
            f"| {r['bytes']} | {r['steps']} | {r['steps_per_hour']} | {r['staleness']} | {r['p99']} "
            f"| {r['wall']} | {params} |"
        )
    lines += [
        "",
        f"## Grid (seed {st['tune_seed']}; chosen: least time to target)",
        "",
        "| method | C | point | time to target (s) | trips to target | best accuracy | status | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["grid"]:
        params = ", ".join(f"`{k}`={v}" for k, v in e["params"].items()) or "—"
        if e["chosen"]:
            status = "**chosen**"
        elif e.get("grid_cap") is not None and e["time_to_target"] is None:
            status = f"stopped at {e['grid_cap']:,.0f} s (slower than the best)"
        elif e["time_to_target"] is None:
            status = f"not reached by {e['virtual_time']:,.0f} s"
        else:
            status = ""
        tt = "—" if e["time_to_target"] is None else f"{e['time_to_target']:,.0f}"
        tr = "—" if e["trips_to_target"] is None else f"{e['trips_to_target']:,}"
        lines.append(
            f"| {e['method']} | {e['concurrency']:,} | {params} | {tt} | {tr} | {e['best_accuracy']:.3f} "
            f"| {status} | {e['wall_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots
def _panels(finals: dict, x: str, xlabel: str, target: float, path: Path, title: str, methods: list[str]) -> None:
    cs = sorted({c for (_, c, _) in finals})
    fig, axes = plt.subplots(1, len(cs), figsize=(4.6 * len(cs), 4.2), squeeze=False)
    for ax, c in zip(axes[0], cs):
        for i, m in enumerate(methods):
            runs = [finals[k] for k in sorted(finals) if k[0] == m and k[1] == c]
            for j, r in enumerate(runs):
                rows = [row for row in r["rows"] if row["test_accuracy"] == row["test_accuracy"]]
                ax.plot(
                    [row[x] for row in rows],
                    [row["test_accuracy"] for row in rows],
                    color=COLORS[i % len(COLORS)],
                    lw=1.3,
                    alpha=0.85,
                    label=m if j == 0 else None,
                )
        ax.axhline(target, color="grey", ls="--", lw=1)
        if x == "trips_started":
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
        ax.set_title(f"C = {c:,}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (held-out devices)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versus_c(ax, summary: dict, field: str, methods: list[str], ylabel: str) -> None:
    for i, m in enumerate(methods):
        by_c: dict[int, list[float]] = {}
        for e in summary["runs"]:
            if e["method"] == m and e.get(field) is not None:
                by_c.setdefault(e["concurrency"], []).append(e[field])
        if not by_c:
            continue
        cs = sorted(by_c)
        mean = np.array([np.mean(by_c[c]) for c in cs])
        lo = mean - np.array([np.min(by_c[c]) for c in cs])
        hi = np.array([np.max(by_c[c]) for c in cs]) - mean
        ax.errorbar(cs, mean, yerr=[lo, hi], color=COLORS[i % len(COLORS)], marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    cs = sorted({e["concurrency"] for e in summary["runs"]})
    ax.set_xticks(cs, [f"{c:,}" for c in cs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(cs[0] / 1.6, cs[-1] * 1.6)
    ax.set_xlabel("concurrency C")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_study(summary: dict, finals: dict, out: Path, methods: list[str]) -> None:
    target, name = summary["target_accuracy"], summary["preset"]
    _panels(
        finals,
        "virtual_time",
        "virtual time (s)",
        target,
        out / "accuracy_vs_time.png",
        f"{name}: accuracy vs virtual time (one line per seed)",
        methods,
    )
    _panels(
        finals,
        "trips_started",
        "client trips started",
        target,
        out / "accuracy_vs_trips.png",
        f"{name}: accuracy vs client trips (one line per seed)",
        methods,
    )
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _versus_c(ax, summary, "steps_per_hour", methods, "server steps per virtual hour")
    ax.set_title(f"{name}: server steps per hour (mean, min–max over seeds)")
    fig.tight_layout()
    fig.savefig(out / "steps_per_hour.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _versus_c(axes[0], summary, "time_to_target", methods, "virtual time to target (s)")
    _versus_c(axes[1], summary, "trips_to_target", methods, "client trips to target")
    fig.suptitle(f"{name}: cost to reach {target:g} (mean, min–max over seeds)")
    fig.tight_layout()
    fig.savefig(out / "to_target.png", dpi=110)
    plt.close(fig)


def replot(out: Path) -> None:
    """Redraw a finished study's plots from its summary.json and the runs' metrics.csv."""
    import csv

    summary = json.loads((out / "summary.json").read_text())
    finals = {}
    for e in summary["runs"]:
        with open(out / e["name"] / "metrics.csv") as f:
            rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        finals[(e["method"], e["concurrency"], e["seed"])] = {"entry": e, "rows": rows}
    plot_study(summary, finals, out, list(summary["study"]["methods"]))
