"""Comparison plots (PNG) of several runs of one experiment."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asyncfl.sim.metrics import Metrics, Target  # noqa: E402


def _curves(results: dict[str, Metrics], x: str, xlabel: str, target: Target, path: Path, title: str) -> None:
    """The target's metric against x, per run, with the target as a line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = target.metric
    for name, m in results.items():
        ax.plot([r[x] for r in m.rows], [r.get(metric, float("nan")) for r in m.rows], label=name, lw=1.6)
    ax.axhline(target.value, color="grey", ls="--", lw=1, label=f"target {target.value:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title)
    if metric == "test_accuracy":
        ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: dict[str, Metrics], target: float | Target, out: Path, title: str) -> list[Path]:
    """`target`: a test accuracy, or a Target on another metric (its curves are drawn instead;
    the files keep their names)."""
    target = Target.of(target)
    what = "accuracy" if target.metric == "test_accuracy" else target.metric.replace("_", " ")
    paths = [out / "accuracy_vs_time.png", out / "accuracy_vs_trips.png", out / "staleness.png"]
    _curves(results, "virtual_time", "virtual time (s)", target, paths[0], f"{title}: {what} vs time")
    _curves(results, "trips_started", "client trips started", target, paths[1], f"{title}: {what} vs trips")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in results.items():
        if m.staleness:
            xs = sorted(m.staleness)
            ax.step(xs, [m.staleness[k] for k in xs], where="mid", label=name)
    ax.set_xlabel("staleness of accepted updates (server versions)")
    ax.set_ylabel("updates")
    ax.set_title(f"{title}: staleness histogram")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    private = {name: m for name, m in results.items() if any(r.get("epsilon") is not None for r in m.rows)}
    if private:
        paths.append(out / "epsilon_vs_time.png")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, m in private.items():
            rows = [r for r in m.rows if r.get("epsilon") is not None]
            ax.plot([r["virtual_time"] for r in rows], [r["epsilon"] for r in rows], label=name, lw=1.6)
        delta = next((m.extra.get("delta") for m in private.values() if m.extra.get("delta")), None)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("epsilon" + (f" (delta {delta:g})" if delta else ""))
        ax.set_title(f"{title}: privacy spent (RDP accountant)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
