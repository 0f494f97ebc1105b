"""A robustness matrix's report: results.csv (one row per run), summary.json, table.md and a
heatmap per run of mean final accuracy; the tables are also printed."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from asyncfl.robustness.planning import NO_ATTACK, Cell, applies  # noqa: E402


def columns(cfg) -> list[str]:
    rb = cfg.robustness
    return [NO_ATTACK] + [f"{a.name} @ {f:.0%}" for a in rb.attacks for f in rb.fractions]


def matrix(cfg, cells: list[Cell], entries: list[dict]) -> list[dict]:
    """One block per (run, defence, column): per-seed final accuracy, mean, std, and the cost
    in accuracy points against the same run and defence without attack."""
    groups: dict[tuple, list[tuple[Cell, dict]]] = {}
    for c, e in zip(cells, entries):
        groups.setdefault((c.run, c.defence, c.column), []).append((c, e))
    blocks = []
    for (run, defence, column), members in groups.items():
        accs = [e["final_accuracy"] for _, e in members]
        c0 = members[0][0]
        blocks.append(
            {
                "run": run,
                "defence": defence,
                "attack": c0.attack,
                "fraction": c0.fraction,
                "column": column,
                "seeds": [c.seed for c, _ in members],
                "final_accuracy": accs,
                "mean": statistics.mean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "refused_trips": sum(e["trips"]["discarded"] for _, e in members),
                "trips": sum(e["trips"]["completed"] for _, e in members),
            }
        )
    clean = {(b["run"], b["defence"]): b["mean"] for b in blocks if b["attack"] is None}
    for b in blocks:
        b["cost_points"] = 100 * (clean[(b["run"], b["defence"])] - b["mean"])
    return blocks


def goal_check(cfg, blocks: list[dict]) -> dict | None:
    """The configured claim, run by run: the cost of each named attack at the fraction, behind
    the defence, against no attack at all (no defence)."""
    g = cfg.robustness.goal
    if g is None:
        return None
    undefended = {b["run"]: b["mean"] for b in blocks if b["attack"] is None and b["defence"] == _none(cfg)}
    rows = []
    for b in blocks:
        if b["defence"] == g["defence"] and b["attack"] in g["attacks"] and b["fraction"] == g["fraction"]:
            base = undefended.get(b["run"], None)
            cost = 100 * (base - b["mean"]) if base is not None else b["cost_points"]
            rows.append({"run": b["run"], "attack": b["attack"], "cost_points": cost, "met": cost < g["max_cost"]})
    return {**g, "against": "no attack, no defence", "results": rows, "met": all(r["met"] for r in rows)}


def _none(cfg) -> str | None:
    """The defence that sets nothing (the baseline of the goal), if any."""
    return next((d.name for d in cfg.robustness.defences if not d.set), None)


def _cell(b: dict | None, with_cost: bool) -> str:
    if b is None:
        return "n/a"
    text = f"{b['mean']:.3f}"
    if with_cost and b["attack"] is not None:
        text += f" ({-b['cost_points']:+.1f})"
    return text


def tables(cfg, blocks: list[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per run: header and rows (defences) of mean final accuracy, each attacked cell with its
    change in points against no attack behind the same defence."""
    cols = columns(cfg)
    index = {(b["run"], b["defence"], b["column"]): b for b in blocks}
    out = {}
    for spec in cfg.runs:
        rows = []
        for d in cfg.robustness.defences:
            if not applies(d, spec.name):
                rows.append([d.name] + ["n/a"] * len(cols))
                continue
            rows.append([d.name] + [_cell(index.get((spec.name, d.name, c)), True) for c in cols])
        out[spec.name] = (["defence"] + cols, rows)
    return out


def markdown(cfg, blocks: list[dict], goal: dict | None) -> str:
    rb = cfg.robustness
    lines = [
        f"# {cfg.name}: final test accuracy, mean over seeds {', '.join(map(str, rb.seeds))}",
        "",
        "Each attacked cell: mean final accuracy (change in points against no attack behind the same defence).",
        "",
    ]
    for run, (header, rows) in tables(cfg, blocks).items():
        lines += [f"## {run}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        for d in rb.defences:
            if not applies(d, run) and d.why_not:
                lines.append(f"\nn/a: {d.name}: {d.why_not}")
        lines.append("")
    if goal is not None:
        lines.append(
            f"Goal: behind `{goal['defence']}`, {goal['fraction']:.0%} attackers of "
            f"{', '.join(goal['attacks'])} cost less than {goal['max_cost']:g} points against no attack: "
            + ("met" if goal["met"] else "NOT met")
            + " ("
            + "; ".join(f"{r['run']} {r['attack']}: {r['cost_points']:.1f}" for r in goal["results"])
            + ")."
        )
    return "\n".join(lines) + "\n"


def heatmap(cfg, blocks: list[dict], run: str, path: Path) -> None:
    cols = columns(cfg)
    defences = [d.name for d in cfg.robustness.defences]
    index = {(b["defence"], b["column"]): b["mean"] for b in blocks if b["run"] == run}
    grid = [[index.get((d, c), float("nan")) for c in cols] for d in defences]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 1.2 + 0.45 * len(defences)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(defences)), defences, fontsize=8)
    ax.set_title(f"{cfg.name}: {run}, mean final accuracy")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(
    cfg, cells: list[Cell], entries: list[dict], out: Path, wall: float, rss: dict, console: Console
) -> dict:
    blocks = matrix(cfg, cells, entries)
    goal = goal_check(cfg, blocks)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "defence", "attack", "fraction", "seed", "final_accuracy", "best_accuracy", "refused_trips"])
        for c, e in zip(cells, entries):
            w.writerow(
                [c.run, c.defence, c.attack or "", c.fraction, c.seed]
                + [e["final_accuracy"], e["best_accuracy"], e["trips"]["discarded"]]
            )
    summary = {
        "preset": cfg.name,
        "robustness": cfg.robustness.model_dump(mode="json"),
        "matrix": blocks,
        "goal": goal,
        "wall_seconds": wall,
        "peak_rss_mb": rss,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(markdown(cfg, blocks, goal))
    for run, (header, rows) in tables(cfg, blocks).items():
        heatmap(cfg, blocks, run, out / f"{cfg.name}-{run}.png")
        t = Table(title=f"{cfg.name}: {run}, mean final accuracy (change against no attack, points)")
        for col in header:
            t.add_column(col, justify="left" if col == "defence" else "right")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    if goal is not None:
        console.print(markdown(cfg, blocks, goal).rstrip().splitlines()[-1], highlight=False)
    console.print(f"results in {out} ({wall:.0f} s)", highlight=False)
    return summary
