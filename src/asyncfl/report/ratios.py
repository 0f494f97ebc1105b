"""A study's statistics: spreads over seeds and the baseline / method ratios per concurrency.

Pure numbers from the runs' summary entries, shared by the study runner and its report.
"""

from __future__ import annotations

import numpy as np

from asyncfl.config import StudyConfig


def spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "geomean": None, "n": 0}
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero (or negative) value: geomean 0 (or nan)
        geomean = float(np.exp(np.log(a).mean()))
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "geomean": geomean,
        "n": int(a.size),
    }


METRICS = {"time": "time_to_target", "trips": "trips_to_target", "bytes": "bytes_to_target"}


def ratios(study: StudyConfig, finals: dict[tuple[str, int, int], dict]) -> list[dict]:
    """baseline / method per concurrency both run at, per seed, for time, trips and bytes to
    target; a seed where either run missed the target has no ratio (and is counted)."""
    out = []
    for pair in study.ratios:
        cs = sorted({c for (m, c, _) in finals if m == pair.baseline} & {c for (m, c, _) in finals if m == pair.method})
        for c in cs:
            block = {"concurrency": c, "baseline": pair.baseline, "method": pair.method, "per_seed": []}
            values: dict[str, list[float]] = {k: [] for k in METRICS}
            for s in study.seeds:
                b, m = finals.get((pair.baseline, c, s)), finals.get((pair.method, c, s))
                if b is None or m is None:
                    continue
                b, m = b["entry"], m["entry"]
                row = {"seed": s, "baseline_reached": b["reached_target"], "method_reached": m["reached_target"]}
                for k, f in METRICS.items():
                    ok = b[f] is not None and m[f] is not None and m[f] > 0
                    row[k] = b[f] / m[f] if ok else None
                    if ok:
                        values[k].append(row[k])
                block["per_seed"].append(row)
            for k in METRICS:
                block[k] = spread(values[k])
            block["seeds_both_reached"] = sum(
                1 for r in block["per_seed"] if r["baseline_reached"] and r["method_reached"]
            )
            out.append(block)
    return out
