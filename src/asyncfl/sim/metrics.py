"""A simulated run's metrics: counters of trips and bytes, evaluation rows, staleness of accepted
updates; `write_rows` writes them as CSV (the study reuses it)."""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asyncfl.algorithms.types import Verdict

COLUMNS = [
    "virtual_time",
    "version",
    "trips_started",
    "trips_completed",
    "trips_dropped",
    "trips_discarded",
    "trips_cancelled",
    "bytes_down",
    "bytes_up",
    "test_accuracy",
    "test_loss",
    "wall_time",
]
OPTIONAL_COLUMNS = ["epsilon"]  # written when some row has it (differentially private runs), then eval.metrics


@dataclass(frozen=True)
class Target:
    """A run's goal: the metrics row column `metric` at least (mode "max") or at most ("min") `value`."""

    metric: str = "test_accuracy"
    mode: str = "max"
    value: float = 0.9

    @classmethod
    def of(cls, target: float | Target) -> Target:
        """A Target as given, or a target accuracy."""
        return target if isinstance(target, Target) else cls(value=float(target))

    @classmethod
    def of_config(cls, cfg) -> Target:
        """The experiment's `target:` section, else its target_accuracy."""
        t = getattr(cfg, "target", None)
        return cls(t.metric, t.mode, t.value) if t is not None else cls(value=cfg.target_accuracy)

    def reached(self, row: dict) -> bool:
        v = row.get(self.metric)
        if v is None or math.isnan(v):
            return False
        return v >= self.value if self.mode == "max" else v <= self.value


class Metrics:
    def __init__(self):
        self.started = self.completed = self.dropped = self.discarded = self.cancelled = 0
        self.bytes_down = self.bytes_up = 0
        self.staleness: Counter[int] = Counter()
        self.rows: list[dict] = []
        self.wall_seconds = self.virtual_time = 0.0
        self.server_steps = self.client_updates = 0
        self.extra: dict = {}  # further summary fields set by the runtime (codecs, privacy)

    def on_verdict(self, verdict: Verdict, staleness: int) -> None:
        if verdict == Verdict.DISCARDED:
            self.discarded += 1
        else:
            self.staleness[staleness] += 1

    def record(self, t: float, version: int, acc: float, loss: float, wall: float) -> None:
        self.rows.append(
            {
                "virtual_time": t,
                "version": version,
                "trips_started": self.started,
                "trips_completed": self.completed,
                "trips_dropped": self.dropped,
                "trips_discarded": self.discarded,
                "trips_cancelled": self.cancelled,
                "bytes_down": self.bytes_down,
                "bytes_up": self.bytes_up,
                "test_accuracy": acc,
                "test_loss": loss,
                "wall_time": wall,
            }
        )

    def first_at(self, target: float | Target) -> dict | None:
        """The first row that reaches `target` (a Target, or a test accuracy)."""
        target = Target.of(target)
        return next((r for r in self.rows if target.reached(r)), None)

    def staleness_quantile(self, q: float) -> float | None:
        if not self.staleness:
            return None
        values = np.array(sorted(self.staleness))
        counts = np.array([self.staleness[v] for v in values])
        cdf = np.cumsum(counts) / counts.sum()
        return float(values[np.searchsorted(cdf, q)])

    def summary(self, target: float | Target) -> dict:
        target = Target.of(target)
        hit = self.first_at(target)
        last = self.rows[-1]
        total = sum(self.staleness.values())
        reported = {}  # the target's metric, when it is not accuracy
        if target.metric != "test_accuracy":
            values = [r[target.metric] for r in self.rows if r.get(target.metric) is not None]
            reported = {
                f"final_{target.metric}": last.get(target.metric),
                f"best_{target.metric}": (max if target.mode == "max" else min)(values) if values else None,
            }
        return {
            "final_accuracy": last["test_accuracy"],
            "final_loss": last["test_loss"],
            "best_accuracy": max(r["test_accuracy"] for r in self.rows),
            **reported,
            "time_to_target": hit["virtual_time"] if hit else None,
            "trips_to_target": hit["trips_started"] if hit else None,
            "bytes_to_target": hit["bytes_down"] + hit["bytes_up"] if hit else None,
            "server_steps": self.server_steps,
            "virtual_time": self.virtual_time,
            "wall_seconds": self.wall_seconds,
            "client_updates": self.client_updates,
            "trips": {
                "started": self.started,
                "completed": self.completed,
                "dropped": self.dropped,
                "discarded": self.discarded,
                "cancelled": self.cancelled,
            },
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "mean_staleness": sum(k * v for k, v in self.staleness.items()) / total if total else None,
            "p99_staleness": self.staleness_quantile(0.99),
            **self.extra,
        }

    def write_csv(self, path: Path) -> None:
        write_rows(self.rows, path)

    def staleness_histogram(self) -> dict[str, int]:
        return {str(k): self.staleness[k] for k in sorted(self.staleness)}


def write_rows(rows: list[dict], path: Path) -> None:
    """Evaluation rows as metrics.csv: the fixed columns, then the optional ones any row has,
    then any further ones (eval.metrics), in the order they first appear."""
    with open(path, "w", newline="") as f:
        extra = [c for c in OPTIONAL_COLUMNS if any(c in r for r in rows)]
        extra += [c for c in dict.fromkeys(k for r in rows for k in r) if c not in COLUMNS + extra]
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra)
        writer.writeheader()
        writer.writerows(rows)
