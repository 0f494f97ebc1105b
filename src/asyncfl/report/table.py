"""The printed comparison table."""

from __future__ import annotations

from rich.table import Table


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _bytes(v) -> str:
    if v is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1000:
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} TB"


def summary_table(summary: dict) -> Table:
    goal = summary.get("target")
    aim = f"{goal['metric']} {'≥' if goal['mode'] == 'max' else '≤'} {goal['value']:g}" if goal else None
    t = Table(title=f"{summary['preset']}: target " + (aim or f"accuracy {summary['target_accuracy']:g}"))
    # codec and epsilon columns only when some run compresses or is differentially private
    codec = any(r.get("codec") is not None for r in summary["runs"])
    eps = any(r.get("epsilon") is not None for r in summary["runs"])
    spread = any(r.get("client_accuracy") for r in summary["runs"])  # per-device test splits
    other = goal["metric"] if goal and goal["metric"] != "test_accuracy" else None  # the target's own metric
    cols = (
        ["run", "mode", "C"]
        + (["codec"] if codec else [])
        + ["final acc"]
        + ([f"final {other}"] if other else [])
        + ["time to target (s)", "trips to target", "bytes to target", "server steps", "mean staleness"]
        + (["epsilon"] if eps else [])
        + (["device acc mean", "device acc std", "device acc p10"] if spread else [])
        + ["wall (s)"]
    )
    for col in cols:
        t.add_column(col, justify="left" if col in ("run", "mode", "codec") else "right")
    for r in summary["runs"]:
        cells = [r["name"], r["mode"], str(r["concurrency"])]
        if codec:
            cells.append((r.get("codec") or "dense") + (" +EF" if r.get("error_feedback") else ""))
        cells.append(f"{r['final_accuracy']:.3f}")
        if other:
            cells.append(_fmt(r.get(f"final_{other}"), ".4g"))
        cells += [
            _fmt(r["time_to_target"], ".0f"),
            _fmt(r["trips_to_target"], "d"),
            _bytes(r["bytes_to_target"]),
            str(r["server_steps"]),
            _fmt(r["mean_staleness"], ".1f"),
        ]
        if eps:
            cells.append(_fmt(r.get("epsilon"), ".2f"))
        if spread:
            c = r.get("client_accuracy") or {}
            cells += [_fmt(c.get(k), ".3f") for k in ("mean", "std", "p10")]
        cells.append(f"{r['wall_seconds']:.1f}")
        t.add_row(*cells)
    return t
