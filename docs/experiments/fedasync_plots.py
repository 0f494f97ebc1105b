"""Plots and tables for docs/experiments/fedasync.md, from `asyncfl compare` outputs.

    .venv/bin/python docs/experiments/fedasync_plots.py runs/fedasync [runs/fedasync-seed1 ...] \
        [--out docs/experiments] [--targets 0.9 0.95]

The x axis is the number of local gradient steps *applied* to the server model, as in the
FedAsync paper's figures: (trips completed - trips discarded) x trainer.local_steps at every
evaluation. Updates discarded for exceeding max_staleness were computed but never applied; the
table reports their share. The plots are drawn from the first directory (one seed); the table
averages over all the directories given (one per seed).

Reads each directory's config.yaml (resolved config), summary.json and RUN/metrics.csv only.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import yaml  # noqa: E402

COLORS = {"constant": "tab:red", "polynomial": "tab:blue", "hinge": "tab:green"}


def load(run_dir: Path) -> dict:
    """{run name: {"spec", "summary", "grads", "acc", "loss"}} for one compare output."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = cfg["trainer"]["local_steps"]
    if steps is None:
        raise SystemExit("the gradient axis needs trainer.local_steps (not local_epochs)")
    summary = {r["name"]: r for r in json.loads((run_dir / "summary.json").read_text())["runs"]}
    runs = {}
    for spec in cfg["runs"]:
        with open(run_dir / spec["name"] / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        runs[spec["name"]] = {
            "spec": spec,
            "summary": summary[spec["name"]],
            "grads": [(int(r["trips_completed"]) - int(r["trips_discarded"])) * steps for r in rows],
            "acc": [float(r["test_accuracy"]) for r in rows],
            "loss": [float(r["test_loss"]) for r in rows],
            "time": [float(r["virtual_time"]) for r in rows],
        }
    return runs


def max_staleness(run: dict) -> int | None:
    return run["spec"]["algorithm"].get("max_staleness")


def style(run: dict) -> dict:
    a = run["spec"]["algorithm"]
    if a["name"] == "fedavg":
        return {"color": "grey", "lw": 2.0}
    if max_staleness(run) is None:  # single-thread SGD
        return {"color": "black", "lw": 2.0}
    return {"color": COLORS[a["staleness"]["kind"]], "ls": "-" if a["alpha"] >= 0.9 else "--", "lw": 1.1}


def panels(runs: dict) -> list[tuple[int, list[str]]]:
    """One panel per staleness bound: its FedAsync runs plus the two baselines."""
    base = [n for n, r in runs.items() if max_staleness(r) is None]
    bounds = sorted({max_staleness(r) for r in runs.values() if max_staleness(r) is not None})
    return [(m, base + [n for n, r in runs.items() if max_staleness(r) == m]) for m in bounds]


def trailing_mean(xs: list[int], ys: list[float], window: int) -> list[float]:
    """Mean of the evaluations in (x - window, x] at every x: one test set of a few hundred
    examples per evaluation is noisy, and runs evaluate at different gradient spacings."""
    out, lo, total = [], 0, 0.0
    for hi, x in enumerate(xs):
        total += ys[hi]
        while xs[lo] <= x - window:
            total -= ys[lo]
            lo += 1
        out.append(total / (hi - lo + 1))
    return out


def plot_curves(runs: dict, key: str, path: Path, ylabel: str, views: list[tuple[int | None, int, tuple | None]],
                logy: bool = False) -> None:
    """One column per staleness bound, one row per view (x limit or None, smoothing window, y limits)."""
    groups = panels(runs)
    fig, axes = plt.subplots(len(views), len(groups), figsize=(6.2 * len(groups), 4.3 * len(views)), squeeze=False)
    for row, (xmax, window, ylim) in zip(axes, views):
        for ax, (bound, names) in zip(row, groups):
            for n in names:
                st = style(runs[n])
                if runs[n]["spec"]["algorithm"].get("staleness", {}).get("kind") == "hinge" and bound <= 4:
                    st["ls"] = ":"  # hinge with b = 4 weighs every staleness <= 4 fully: the same run as constant
                xs, ys = runs[n]["grads"], trailing_mean(runs[n]["grads"], runs[n][key], window)
                if xmax is not None:
                    keep = [i for i, x in enumerate(xs) if x <= xmax]
                    xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
                ax.plot(xs, ys, label=n, **st)
            span = "" if xmax is None else f", first {xmax:,} gradients"
            ax.set_title(f"staleness at most {bound}{span} (mean over the last {window} gradients)", fontsize=9)
            ax.set_xlabel("local gradient steps applied")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ylim:
                ax.set_ylim(*ylim)
            if logy:
                ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2, loc="lower right" if not logy else "upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_staleness(runs: dict, path: Path) -> None:
    groups = panels(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 3.4), squeeze=False)
    for ax, (bound, names) in zip(axes[0], groups):
        r = runs[[n for n in names if max_staleness(runs[n]) == bound][0]]["summary"]
        hist = {int(k): v for k, v in r["staleness_histogram"].items()}
        total = sum(hist.values())
        ax.bar(list(hist), [v / total for v in hist.values()], color="tab:purple", alpha=0.7,
               label=f"measured (C = {r['concurrency']})")
        ax.axhline(1 / (bound + 1), color="black", ls="--", lw=1, label=f"uniform 0..{bound}")
        ax.set_title(f"staleness at most {bound}: mean {r['mean_staleness']:.1f}, p99 {r['p99_staleness']:g}, "
                     f"{100 * r['trips']['discarded'] / r['trips']['completed']:.0f}% discarded", fontsize=9)
        ax.set_xlabel("staleness of applied updates")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of applied updates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def first_reach(run: dict, target: float, key: str = "grads") -> float | None:
    return next((g for g, a in zip(run[key], run["acc"]) if a >= target), None)


def row_stats(run: dict, targets: list[float]) -> dict:
    acc = run["acc"]
    tail = acc[-max(1, len(acc) // 10):]
    half = [a for a, g in zip(acc, run["grads"]) if g >= run["grads"][-1] / 2]  # second half of the budget
    half_loss = [v for v, g in zip(run["loss"], run["grads"]) if g >= run["grads"][-1] / 2]
    s = run["summary"]
    return {
        **{f"g{t}": first_reach(run, t) for t in targets},
        "time": first_reach(run, targets[-1], "time"),
        "final": acc[-1],
        "tail": sum(tail) / len(tail),
        "sd": statistics.pstdev(half) if len(half) > 1 else None,
        "half_loss": sum(half_loss) / len(half_loss),
        "mean_staleness": s["mean_staleness"] or 0.0,
        "p99": s["p99_staleness"] or 0.0,
        "discarded": s["trips"]["discarded"] / max(1, s["trips"]["completed"]),
        "wall": s["wall_seconds"],
    }


def mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def table(all_runs: list[dict], targets: list[float]) -> str:
    seeds = len(all_runs)
    head = (["run", "C", "mean / p99 staleness", "discarded"] + [f"gradients to {t:g}" for t in targets]
            + [f"virtual s to {targets[-1]:g}", "final acc", "acc, last 10%", "acc sd, 2nd half (pp)", "loss, 2nd half", "wall (s)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in all_runs[0].items():
        stats = [row_stats(runs[name], targets) for runs in all_runs]
        cells = [name, str(run["summary"]["concurrency"]),
                 f"{mean(s['mean_staleness'] for s in stats):.1f} / {mean(s['p99'] for s in stats):.3g}",
                 f"{100 * mean(s['discarded'] for s in stats):.1f}%"]
        for t in targets:
            reached = [s[f"g{t}"] for s in stats if s[f"g{t}"] is not None]
            cell = "—" if not reached else f"{mean(reached):,.0f}"
            if reached and len(reached) < seeds:
                cell += f" ({len(reached)}/{seeds} seeds)"
            cells.append(cell)
        vt = [s["time"] for s in stats if s["time"] is not None]
        cells.append("—" if not vt else f"{mean(vt):.0f}" + (f" ({len(vt)}/{seeds} seeds)" if len(vt) < seeds else ""))
        cells += [f"{mean(s['final'] for s in stats):.3f}", f"{mean(s['tail'] for s in stats):.3f}",
                  f"{100 * mean(s['sd'] for s in stats):.2f}", f"{mean(s['half_loss'] for s in stats):.3f}",
                  f"{mean(s['wall'] for s in stats):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\n(mean over {seeds} seeds)" if seeds > 1 else ""
    return "\n".join(lines) + note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="asyncfl compare output directories (one per seed)")
    p.add_argument("--out", type=Path, default=Path("docs/experiments"), help="where the PNG files go")
    p.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--window", type=int, default=300, help="plots: trailing mean over this many gradients")
    args = p.parse_args()
    all_runs = [load(d) for d in args.dirs]
    names = list(all_runs[0])
    for d, runs in zip(args.dirs[1:], all_runs[1:]):
        if list(runs) != names:
            raise SystemExit(f"{d}: runs differ from {args.dirs[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    first = all_runs[0]
    plot_curves(first, "acc", args.out / "fedasync_accuracy.png", "test accuracy",
                [(2000, args.window // 3, (0.5, 1.0)), (None, args.window, (0.8, 0.98))])
    plot_curves(first, "loss", args.out / "fedasync_loss.png", "test loss", [(None, args.window, None)], logy=True)
    plot_staleness(first, args.out / "fedasync_staleness.png")
    print(table(all_runs, args.targets))
    print(f"\nplots: {', '.join(str(args.out / f) for f in ('fedasync_accuracy.png', 'fedasync_loss.png', 'fedasync_staleness.png'))}")


if __name__ == "__main__":
    main()
