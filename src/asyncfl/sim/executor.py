"""Deferred client execution.

A client's result depends only on its start model, its data and its seed, all fixed when the
trip starts. The simulator submits a job at trip start and asks for the result only when the
trip reports, so an executor is free to train many pending jobs together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.attacks import flip_labels
from asyncfl.data.federated import FederatedDataset


@dataclass(slots=True)
class TrainJob:
    job_id: int
    client: int  # index of the client's data partition
    base_version: int
    base_w: torch.Tensor
    seed: int
    steps: int  # may be lowered before the result is asked for (partial work)
    # False: its result will most likely never be asked for (the trip drops, or its round closes
    # before it reports), so a batched executor trains it only if asked
    reports: bool = True
    # added to every local gradient of this client (e.g. SCAFFOLD's c - c_i); flat, like base_w.
    # Keyword-only, so that subclasses (the simulator's Trip) keep their positional fields
    correction: torch.Tensor | None = field(default=None, kw_only=True)
    # a label-flipping attacker's job: it trains on flip_labels(y) (`asyncfl.attacks`)
    flip_labels: bool = field(default=False, kw_only=True)


class Executor(ABC):
    def __init__(self, trainer: LocalTrainer, data: FederatedDataset):
        self.trainer = trainer
        self.data = data
        self.pending: dict[int, TrainJob] = {}
        self.trained = 0  # client updates computed, for throughput figures

    def submit(self, job: TrainJob) -> None:
        self.pending[job.job_id] = job

    def cancel(self, job_id: int) -> None:
        self.pending.pop(job_id, None)

    def set_steps(self, job_id: int, steps: int) -> None:
        self.pending[job_id].steps = steps

    def evaluate_many(self, ws: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, float]]:
        """(accuracy, loss) of several global-model snapshots; batched executors vectorise it."""
        return [self.trainer.model.evaluate(w, x, y) for w in ws]

    def measured(self) -> dict:
        """Summary fields measured on the executor's workers by the run's end (none in-process)."""
        return {}

    def close(self) -> None:
        """The run is over: drop the jobs still pending (remote executors also end their workers)."""
        self.pending.clear()

    @abstractmethod
    def result(self, job_id: int) -> ClientUpdate:
        """Train (at least) this job and return its update; the job leaves the pool."""


class SequentialExecutor(Executor):
    """Reference executor: trains each job alone, when its result is needed."""

    def result(self, job_id):
        job = self.pending.pop(job_id)
        x, y = self.data.client_data(job.client)
        if job.flip_labels:
            y = flip_labels(y, self.data.num_classes)
        self.trained += 1
        return self.trainer.train(
            job.base_w,
            x,
            y,
            seed=job.seed,
            client_id=job.client,
            base_version=job.base_version,
            steps=job.steps,
            correction=job.correction,
        )
