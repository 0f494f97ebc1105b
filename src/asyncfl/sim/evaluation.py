"""The simulator's evaluation of the global model: rows recorded now, scored later in batches."""

from __future__ import annotations

import math
import time

import torch

from asyncfl.sim.executor import Executor
from asyncfl.sim.metrics import Metrics, Target
from asyncfl.sim.scores import Scores


class Evaluations:
    """Records a metrics row per evaluation and scores the rows' model snapshots together, in one
    batched pass per `batch` of them, unless stopping at the target needs each accuracy at once.
    Models are never modified in place, so holding a version's tensor is a snapshot."""

    def __init__(
        self,
        metrics: Metrics,
        executor: Executor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        target: float | Target,
        at_once: bool,
        batch: int = 32,
        scores: Scores | None = None,
    ):
        """`scores`: metrics beyond accuracy and loss (`eval.metrics`), added to every row."""
        self.metrics, self.executor, self.x_test, self.y_test = metrics, executor, x_test, y_test
        self.target, self.at_once, self.batch = Target.of(target), at_once, batch
        self.scores = scores
        self.queue: list[tuple[dict, torch.Tensor]] = []
        self.reached_target = False
        self.last_version = 0
        self.seconds = 0.0  # spent scoring
        self.wall0 = time.perf_counter()

    def record(self, clock: float, version: int, w: torch.Tensor, epsilon: float | None) -> None:
        self.last_version = version
        self.metrics.record(clock, version, math.nan, math.nan, time.perf_counter() - self.wall0)
        row = self.metrics.rows[-1]
        if epsilon is not None:
            row["epsilon"] = epsilon
        self.queue.append((row, w))
        if self.at_once or len(self.queue) >= self.batch:
            self.score()

    def score(self) -> None:
        if not self.queue:
            return
        t0 = time.perf_counter()
        scores = self.executor.evaluate_many([w for _, w in self.queue], self.x_test, self.y_test)
        for (row, w), (acc, loss) in zip(self.queue, scores):
            row["test_accuracy"], row["test_loss"] = acc, loss
            if self.scores is not None:
                self.scores.add(row, w, self.x_test, self.y_test)
            if self.target.reached(row):
                self.reached_target = True
        self.queue.clear()
        self.seconds += time.perf_counter() - t0
