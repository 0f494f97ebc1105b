"""Evaluation of a task's newest model by its aggregator, as the single process evaluates it
(`server/evaluation.py`): every `eval_every_s`, and at least every 30 s while the model is
unchanged, a row in `evals`; reaching the target with `stop.at_target` marks the task done."""

from __future__ import annotations

import logging
import math
import time

import psycopg
import torch

from asyncfl.cluster.tasks import TaskObjects

log = logging.getLogger("asyncfl.cluster.aggregator")
UNCHANGED_EVERY_S = 30.0


class TaskEvaluation:
    def __init__(self, objects: TaskObjects):
        self.objects = objects
        self.every_s = objects.settings.eval_every_s
        self._at = -math.inf
        self._version: int | None = None
        self._non_finite: int | None = None  # a version evaluating to NaN/Inf: not retried

    def due(self, version: int) -> bool:
        since = time.monotonic() - self._at
        if version == self._non_finite or since < self.every_s:
            return False
        return version != self._version or since >= UNCHANGED_EVERY_S

    def evaluate(self, conn: psycopg.Connection, task: str, version: int, w: torch.Tensor) -> dict | None:
        """The row written (None for a non-finite model). The caller fences the target's
        state change; the row itself is history, harmless twice."""
        self._at, self._version = time.monotonic(), version
        o = self.objects
        acc, loss = o.model.evaluate(w, o.data.x_test, o.data.y_test)
        if not (math.isfinite(acc) and math.isfinite(loss)):
            self._non_finite = version
            log.warning("task %s: version %d evaluates to accuracy %s, loss %s: not recorded", task, version, acc, loss)
            return None
        conn.execute(
            "INSERT INTO evals(task, version, accuracy, loss) VALUES (%s, %s, %s, %s)", (task, version, acc, loss)
        )
        return {"version": version, "accuracy": acc, "loss": loss}

    def reached(self, row: dict | None) -> bool:
        """True when this row ends the task (stop.at_target and the target reached)."""
        cfg = self.objects.cfg
        return row is not None and cfg.stop.at_target and row["accuracy"] >= cfg.target_accuracy
