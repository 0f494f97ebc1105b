"""Client training on a pool of Ray actors, each holding the data, the model and a batched executor.

A job is fixed when its trip starts, so it can be trained from then on: jobs are shipped as
batched passes as soon as they are a fraction of the jobs in flight, and the event loop runs on
while actors train; it blocks only on a result that is not back yet. A result needed before its
job was shipped (a short trip) is trained on the driver, with the jobs waiting with it: a round
trip would only add Ray's latency to the wait. The driver also keeps the jobs it would ship while
waiting for shipped passes has lately cost it more per job than training them (a small model on
a few cores); where a pass trains never changes its results. Each start model is put in the
object store once; models and replies travel as numpy arrays, which Ray moves without pickling.
A pass's composition is set by the event loop alone, never by which actor is free, so a run's
results do not depend on the number of actors or the order in which they finish; they equal the
local batched executor's (see `LocalPasses` and `min_width`).

What stays in memory is bounded: an actor holds the data, the model and its batched executor,
whose passes stay within `memory_mb` and whose buffers are reused; it caches no start model.
The driver keeps the last `MODELS_KEPT` start models in the object store and a reply until its
last row is taken (or its jobs cancelled), so the object store holds what the jobs in flight need.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import ray
import torch

import asyncfl
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.data.federated import FederatedDataset
from asyncfl.memory import process_peak_rss_mb
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import Executor, TrainJob

# jobs wait to be shipped until they are this fraction of the jobs in flight, and at least
# SHIP_MIN (a remote call costs about as much as training a few dozen small jobs; with fewer than
# 4 * SHIP_MIN in flight a quarter of them): early enough that most jobs are trained remotely
# before they are needed, the few needed sooner are trained on the driver
SHIP_FRACTION = 1 / 64
SHIP_MIN = 32
# a full outbox trains on the driver while, lately, waiting for shipped passes has cost the driver
# more per job than training them itself (a small model on few cores: Ray's round trip costs more
# than the training it carries); every EXPLORE-th is shipped regardless, to keep measuring
EXPLORE = 32
DECAY = 1 / 8  # weight of the newest pass in those per-job costs
# start models kept in the object store: async runs ship jobs of the newest few versions
MODELS_KEPT = 8


def decayed(average: float | None, sample: float) -> float:
    """A decayed average that starts at its first sample (no bias towards zero)."""
    return sample if average is None else average + DECAY * (sample - average)


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start Ray on this machine, unless Ray already runs in
    this process (a test's or a user's ray.init). Ray shuts down when the process exits."""
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **quiet)
    else:  # local workers import this very asyncfl (a source checkout included)
        source = str(Path(asyncfl.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
        # "local": a new Ray of our own, never a cluster that `ray start` left recorded in /tmp/ray
        ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": path}}, **quiet)


def train_pass(ex: BatchedExecutor, specs: list[tuple], min_width: int, bases: list[torch.Tensor]) -> tuple:
    """One pass on `ex`, its minibatch slots at least `min_width` wide: specs are (job id, client,
    version, index into bases, seed, steps, correction, flip labels). Returns the stacked deltas
    (numpy: Ray ships arrays without pickling them) and each update's other fields."""
    ex.min_width = min_width
    for job_id, client, version, b, seed, steps, correction, flip in specs:
        ex.submit(TrainJob(job_id, client, version, bases[b], seed, steps, correction=correction, flip_labels=flip))
    ex.run_pool()
    updates = [ex.result(spec[0]) for spec in specs]
    fields = [(u.n_examples, u.steps, u.loss, u.start_loss, u.planned_steps) for u in updates]
    return torch.stack([u.delta for u in updates]).numpy(), fields


@ray.remote
class TrainingActor:
    """Trains shipped passes with its own batched executor."""

    def __init__(self, shared: tuple[LocalTrainer, FederatedDataset], memory_mb: float, threads: int):
        torch.set_num_threads(threads)  # the driver's: thread counts change the last bits of floats
        trainer, data = shared
        self.executor = BatchedExecutor(trainer, data, memory_mb)  # the driver has vetted the model

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        return process_peak_rss_mb()

    def train(self, specs: list[tuple], min_width: int, *bases: np.ndarray) -> tuple:
        # start models arrive as read-only views of the object store: a copy each, per pass
        return train_pass(self.executor, specs, min_width, [torch.from_numpy(b.copy()) for b in bases])


class LocalPasses:
    """The passes the local batched executor would train (its pool rule: a missing result trains
    every pending job that reports, the one asked for first), replayed on job ids: they give a
    run's `client_updates` however far ahead the actors trained, and the minibatch width each
    job's pass had."""

    def __init__(self):
        self.pending: dict[int, TrainJob] = {}
        self.trained_steps: dict[int, int] = {}  # jobs the local executor would hold trained
        self.trained = 0

    def submit(self, job: TrainJob) -> None:
        self.pending[job.job_id] = job

    def cancel(self, job_id: int) -> None:
        self.pending.pop(job_id, None)
        self.trained_steps.pop(job_id, None)

    def set_steps(self, job: TrainJob, steps: int) -> None:
        if self.trained_steps.get(job.job_id, steps) != steps:  # trained ahead with more steps: again
            del self.trained_steps[job.job_id]
            self.pending[job.job_id] = job

    def result(self, job_id: int) -> list[TrainJob]:
        """The jobs the local executor trains now, in its order (none if it holds this one)."""
        trained = []
        if job_id not in self.trained_steps:
            everyone = not self.pending[job_id].reports
            trained = [j for j in self.pending.values() if everyone or j.reports or j.job_id == job_id]
            trained.sort(key=lambda j: j.job_id != job_id)
            for job in trained:
                del self.pending[job.job_id]
                self.trained_steps[job.job_id] = job.steps
            self.trained += len(trained)
        del self.trained_steps[job_id]
        return trained


class RayExecutor(Executor):
    def __init__(
        self,
        trainer: LocalTrainer,
        data: FederatedDataset,
        memory_mb: float = 512.0,
        actors: int = 2,
        address: str | None = None,
    ):
        super().__init__(trainer, data)
        # evaluates, and trains the passes needed before they could be shipped; raises NotVectorisable first
        self.local = BatchedExecutor(trainer, data, memory_mb)
        connect(address)
        self._shared = ray.put((trainer, data))
        self._actor_args = (memory_mb, torch.get_num_threads())
        self.actors = [self._new_actor() for _ in range(actors)]
        self.passes_of: dict[ray.ObjectRef, tuple[list[TrainJob], int]] = {}  # reply -> its pass and width
        self.replaced = 0  # actors that died and were replaced
        self.warm: set[int] = set()  # actors that answered a pass: their first one builds kernels
        self.in_flight = [0] * actors  # jobs shipped to each actor and not yet collected: the next
        # pass goes to the least loaded, so actors finish a burst of passes of unequal sizes together
        self.outbox: dict[int, TrainJob] = {}  # submitted, not shipped yet
        # job -> (its reply: an object ref, or a key of a pass trained here; row; steps; actor or None)
        self.shipped: dict[int, tuple[object, int, int, int | None]] = {}
        self.replies: dict[object, tuple] = {}  # fetched replies, until every row is taken
        self.rows_left: dict[object, int] = {}  # reply -> its jobs still waiting for it
        self.models: OrderedDict[int, tuple[torch.Tensor, ray.ObjectRef]] = OrderedDict()
        self.passes = LocalPasses()
        # the minibatch width of shipped passes: the local executor's large passes hold the client
        # with the most examples (a full minibatch, or all of its examples when every client has
        # fewer), and a pass's width changes the last bits of floats. Kernels that may mix examples
        # train each width apart (no padding), and so do epochs, slot by slot
        widest = int(min(trainer.batch_size, self.local.sizes.max(initial=0)))
        self.width = 0 if self.local.kernel.mixes_examples or trainer.local_epochs else widest
        self.shipped_jobs = 0  # jobs trained remotely, retrained ones included
        self.trained_here = 0  # jobs trained on the driver: needed before they were shipped
        self.models_put = 0  # start models put in the object store
        # the driver's seconds per job (decayed averages): blocked on shipped passes, training here
        # decayed per-collection averages: the driver's time blocked on a reply, the jobs a reply
        # brings, and the driver's time per job trained here
        self.blocked = self.jobs_back = self.here_per_job = None
        self.kept_flushes = 0  # full outboxes trained here since one was last shipped

    def submit(self, job):
        self.pending[job.job_id] = job
        self.passes.submit(job)
        if job.reports:  # a job that will not report is trained only if its result is asked for
            self.outbox[job.job_id] = job
            in_flight = len(self.pending)
            if len(self.outbox) >= max(SHIP_FRACTION * in_flight, min(SHIP_MIN, in_flight / 4)):
                self._flush()

    def cancel(self, job_id):
        self.pending.pop(job_id, None)
        self.outbox.pop(job_id, None)
        self.passes.cancel(job_id)
        self._forget(job_id)

    def set_steps(self, job_id, steps):
        job = self.pending[job_id]
        job.steps = steps
        self.passes.set_steps(job, steps)
        shipped = self.shipped.get(job_id)
        if shipped is not None and shipped[2] != steps:  # trained ahead with more steps: train it again
            self._forget(job_id)
            if job.reports:
                self.outbox[job_id] = job

    def result(self, job_id):
        if job_id in self.outbox:  # needed before it was shipped: a round trip would only add to the wait
            self._train_here([job for job in self.outbox.values() if job.reports], self.width)
        job = self.pending.pop(job_id)
        for chunk in self._narrow(self.passes.result(job_id)):  # trained as the local executor does
            self._train_here(chunk, 0)
        self.trained = self.passes.trained
        if job_id not in self.shipped:  # a job that was not expected to report
            self._train_here([job], self.width)
        if self.shipped[job_id][0] not in self.replies and self.outbox and not self._keeping():
            self._flush()  # work for the actors while this reply is awaited
        while (ref := self.shipped[job_id][0]) not in self.replies:
            try:
                t = time.perf_counter()
                self.replies[ref] = ray.get(ref)
                actor = self.shipped[job_id][3]
                if actor in self.warm:
                    self.blocked = decayed(self.blocked, time.perf_counter() - t)
                    self.jobs_back = decayed(self.jobs_back, len(self.passes_of[ref][0]))
                self.warm.add(actor)
            except ray.exceptions.RayActorError:  # its actor died: replace it, train its passes again
                self._replace(self.shipped[job_id][3])
        row = self.shipped[job_id][1]
        deltas, fields = self.replies[ref]
        self._forget(job_id)
        n, steps, loss, start_loss, planned = fields[row]
        delta = torch.from_numpy(deltas[row].copy())  # a remote reply is a read-only view of the object store
        return ClientUpdate(job.client, job.base_version, delta, n, steps, loss, start_loss, planned)

    def _new_actor(self):
        return TrainingActor.options(scheduling_strategy="SPREAD").remote(self._shared, *self._actor_args)

    def _replace(self, actor: int) -> None:
        """A new actor in a dead one's place, and every pass the dead one had not answered shipped
        to it again, the same jobs at the same width: jobs are deterministic, so the run's results
        do not change."""
        self.actors[actor] = self._new_actor()
        self.warm.discard(actor)
        self.replaced += 1
        lost: dict[ray.ObjectRef, list[tuple[int, int]]] = {}
        for job_id, (ref, row, _, where) in list(self.shipped.items()):
            if where == actor and ref not in self.replies:
                lost.setdefault(ref, []).append((row, job_id))
        for ref, rows in lost.items():
            jobs, width = self.passes_of[ref]
            self._ship([jobs[row] for row, _ in sorted(rows)], min_width=width, actor=actor)

    def actor_peak_rss_mb(self) -> list[float]:
        """Each live actor's peak resident memory so far (MB), in actor order."""
        return ray.get([actor.peak_rss_mb.remote() for actor in self.actors])

    def measured(self):
        return {"ray_actor_peak_rss_mb": self.actor_peak_rss_mb()}

    def evaluate_many(self, ws, x, y):
        return self.local.evaluate_many(ws, x, y)

    def _forget(self, job_id: int) -> None:
        """Drop a job's claim on its reply; the reply goes once no job waits on it."""
        entry = self.shipped.pop(job_id, None)
        if entry is None:
            return
        ref, _, _, actor = entry
        if actor is not None:
            self.in_flight[actor] -= 1
        self.rows_left[ref] -= 1
        if self.rows_left[ref] == 0:
            del self.rows_left[ref]
            self.replies.pop(ref, None)
            self.passes_of.pop(ref, None)

    def wait_per_job(self) -> float:
        """The driver's time blocked per job that actors trained, lately: replies of several actors
        that arrive during one wait all count, so it falls as actors train side by side."""
        return self.blocked / self.jobs_back if self.jobs_back else 0.0  # None (nothing back yet): 0

    def _keeping(self) -> bool:
        """Whether the next outbox trains on the driver (see EXPLORE)."""
        here = self.here_per_job
        return here is not None and self.wait_per_job() > here and self.kept_flushes < EXPLORE - 1

    def _flush(self) -> None:
        """Ship the waiting jobs, in passes of the local executor's size, or train them here while
        that has lately been cheaper for the driver (where a pass trains does not change its results)."""
        jobs = [job for job in self.outbox.values() if job.reports]
        self.outbox.clear()
        if self._keeping():
            self.kept_flushes += 1
            self._train_here(jobs, self.width)
            return
        self.kept_flushes = 0
        size = self.local.chunk_size()
        for s in range(0, len(jobs), size):
            self._ship(jobs[s : s + size])

    def _model_ref(self, w: torch.Tensor) -> ray.ObjectRef:
        """The object-store copy of a start model, put once (jobs of one version share the tensor)."""
        key = id(w)
        kept = self.models.get(key)
        if kept is not None and kept[0] is w:
            self.models.move_to_end(key)
            return kept[1]
        ref = ray.put(w.numpy())  # an array: Ray stores it without pickling
        self.models_put += 1
        self.models[key] = (w, ref)  # the tensor stays referenced, so its id is not reused meanwhile
        if len(self.models) > MODELS_KEPT:
            self.models.popitem(last=False)
        return ref

    def _narrow(self, jobs: list[TrainJob]) -> list[list[TrainJob]]:
        """The local executor's chunks of a pass whose minibatches are narrower than the width
        the actors pad to: none of its clients is as wide (rare; rounding differs)."""
        if not self.width:
            return []
        size = self.local.chunk_size()
        chunks = [jobs[s : s + size] for s in range(0, len(jobs), size)]
        return [c for c in chunks if max(int(self.local.sizes[job.client]) for job in c) < self.width]

    @staticmethod
    def _specs(jobs: list[TrainJob], name_of) -> tuple[list[tuple], list]:
        """A pass's job specs (see `train_pass`) and its distinct start models, each as `name_of` names it."""
        bases: list = []
        where: dict[int, int] = {}
        specs = []
        for job in jobs:
            key = id(job.base_w)
            if key not in where:
                where[key] = len(bases)
                bases.append(name_of(job.base_w))
            b = where[key]
            specs.append(
                (job.job_id, job.client, job.base_version, b, job.seed, job.steps, job.correction, job.flip_labels)
            )
        return specs, bases

    def _claim(self, reply: object, jobs: list[TrainJob], actor: int | None) -> None:
        """Each job's result is now row k of `reply`; an earlier one is not wanted."""
        self.rows_left[reply] = len(jobs)
        for row, job in enumerate(jobs):
            self.outbox.pop(job.job_id, None)
            self._forget(job.job_id)
            self.shipped[job.job_id] = (reply, row, job.steps, actor)

    def _ship(self, jobs: list[TrainJob], min_width: int | None = None, actor: int | None = None) -> None:
        specs, refs = self._specs(jobs, self._model_ref)
        if actor is None:
            actor = min(range(len(self.actors)), key=self.in_flight.__getitem__)
        width = self.width if min_width is None else min_width
        ref = self.actors[actor].train.remote(specs, width, *refs)
        self.in_flight[actor] += len(jobs)
        self.passes_of[ref] = (jobs, width)
        self._claim(ref, jobs, actor)
        self.shipped_jobs += len(jobs)

    def _train_here(self, jobs: list[TrainJob], min_width: int) -> None:
        """Train a pass on the driver, which would otherwise wait for it: the same executor code,
        width and thread count as an actor's, so the same results."""
        size = self.local.chunk_size()
        for s in range(0, len(jobs), size):
            chunk = jobs[s : s + size]
            key = object()  # the pass's reply, already here
            specs, bases = self._specs(chunk, lambda w: w)
            t = time.perf_counter()
            self.replies[key] = train_pass(self.local, specs, min_width, bases)
            self.here_per_job = decayed(self.here_per_job, (time.perf_counter() - t) / len(chunk))
            self._claim(key, chunk, None)
            self.trained_here += len(chunk)

    def close(self) -> None:
        """End the actors; Ray itself stays up for the process's next run and shuts down at exit."""
        super().close()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        kept_by_run = (self.outbox, self.shipped, self.replies, self.rows_left, self.passes_of, self.models)
        for kept in (*kept_by_run, self.passes.pending, self.passes.trained_steps):
            kept.clear()  # the object store frees what these referenced
