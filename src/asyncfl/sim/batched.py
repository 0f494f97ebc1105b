"""Batched client execution: many simulated clients trained in one vectorised pass.

A job's result is fixed when it starts (start model, data partition, seed), so every job whose
result is not yet needed waits in a pool; the first `result` call trains the whole pool at
once, with per-client stacked parameters, and caches the other updates. The minibatch order
comes from `LocalTrainer.batch_indices`, so each update equals the sequential one up to float
rounding. Clients with fewer steps or fewer examples than the batch size share the pass: their
extra steps are masked (w unchanged) and their missing examples weigh zero. With
`local_epochs` batch sizes vary by step (an epoch's last batch may be short), so the example
weights are per step, [batch slots, J, B], and each slot reads only as wide as its widest batch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import vmap

from asyncfl.algorithms.shuffle import minibatches, mix
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.attacks import flip_labels
from asyncfl.config.base import ConfigError
from asyncfl.data.federated import FederatedDataset
from asyncfl.sim.executor import Executor, SequentialExecutor, TrainJob
from asyncfl.sim.kernels import Kernel, NotVectorisable, activation_floats, build_kernel
from asyncfl.sim.unfused import unfused


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors (and storage wrappers) hold t's memory; a large number when torch does
    not expose the count, so that nothing is reused blindly."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(t.untyped_storage()._cdata) if count is not None else 1 << 30


# ---- the executor ---------------------------------------------------------------------------
class BatchedExecutor(Executor):
    def __init__(
        self, trainer: LocalTrainer, data: FederatedDataset, memory_mb: float = 512.0, kernel: Kernel | None = None
    ):
        super().__init__(trainer, data)
        sample_x = data.x_test[:8]
        self.kernel = kernel or build_kernel(trainer, sample_x)
        self.done: dict[int, tuple[TrainJob, ClientUpdate]] = {}
        self._slabs: dict[int, tuple[torch.Tensor, set[int], int]] = {}  # pass -> (buffer, jobs in done, rows)
        self._slab_of: dict[int, int] = {}  # job -> the pass whose tensor holds its delta
        self.memory_mb = memory_mb
        # minibatch slots of every pass at least this wide (fixed-size batches only): the examples
        # a pass sums over change the last bits of floats, so the ray executor's actors pad their
        # small passes as wide as the local executor's large ones are
        self.min_width = 0
        self.train_seconds = 0.0  # inside the vectorised passes
        self.gather_seconds = 0.0  # minibatch indices, stacking start models, writing deltas
        self.passes = 0
        self._scratch: dict[str, torch.Tensor] = {}  # per-pass working memory, reused across passes
        self._spare: list[torch.Tensor] = []  # delta tensors of finished passes, reusable once unreferenced
        self.sizes = np.asarray(data.client_sizes(), dtype=np.int64)
        # stored data: client k's examples are flat_index[offsets[k]:]; generated data (no
        # client_indices) is fetched per pass for the clients in it
        self.stored = hasattr(data, "client_indices")
        if self.stored:
            self.flat_index = np.concatenate(data.client_indices)
            self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self._act = activation_floats(trainer.model.module, sample_x)
        self._fwd_eval = vmap(self._forward_unfused, in_dims=(0, None))

    def _forward_unfused(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with unfused(self.trainer.model.module):
            return self.trainer.model.forward(w, x)

    # pool bookkeeping
    def _take(self, job_id: int) -> tuple[TrainJob, ClientUpdate]:
        """Remove a trained job. Its delta is a row of its pass's tensor; once fewer than a
        quarter of a pass's rows wait, they get their own storage, so stragglers pin at most 4x
        their size while the pass paid no copy per row."""
        job, upd = self.done.pop(job_id)
        p = self._slab_of.pop(job_id, None)
        if p is not None:
            buffer, waiting, size = self._slabs[p]
            waiting.discard(job_id)
            if 4 * len(waiting) < size:
                for other in waiting:
                    held = self.done[other][1]
                    held.delta = held.delta.clone()
                    del self._slab_of[other]
                del self._slabs[p]
                self._spare = [buffer, *self._spare][:3]
        return job, upd

    def cancel(self, job_id):
        self.pending.pop(job_id, None)
        if job_id in self.done:
            self._take(job_id)

    def set_steps(self, job_id, steps):
        if job_id in self.pending:
            self.pending[job_id].steps = steps
            return
        job, upd = self.done[job_id]
        if upd.steps != steps:  # trained ahead with more steps: train it again, shorter
            self._take(job_id)
            job.steps = steps
            self.pending[job_id] = job

    def result(self, job_id):
        if job_id not in self.done:
            self.run_pool(first=job_id)
        return self._take(job_id)[1]

    def chunk_size(self) -> int:
        """Clients per pass so that one pass stays within `memory_mb`."""
        p = self.trainer.model.numel
        b = self.trainer.batch_size
        steps = self.trainer.local_steps or 64
        per_client = 4 * (8 * p + 4 * b * (self._act + self.data.num_features)) + 16 * steps * b
        return max(1, int(self.memory_mb * 2**20 // per_client))

    def run_pool(self, first: int | None = None) -> None:
        if first is None or self.pending[first].reports:
            jobs = [j for j in self.pending.values() if j.reports or j.job_id == first]
        else:  # a result nobody expected (a round short of reports, partial work): the others may follow, train all
            jobs = list(self.pending.values())
        if first is not None:  # the job asked for goes in the first pass
            jobs.sort(key=lambda j: j.job_id != first)
        for j in jobs:
            del self.pending[j.job_id]
        if self.kernel.mixes_examples:  # no padding: group by the sequence of batch sizes
            epochs = self.trainer.local_epochs is not None  # sizes follow n, else min(B, n)
            groups: dict[int, list[TrainJob]] = {}
            for job in jobs:
                n = int(self.sizes[job.client])
                groups.setdefault(n if epochs else min(self.trainer.batch_size, n), []).append(job)
            batches = list(groups.values())
        else:
            batches = [jobs]
        size = self.chunk_size()
        for group in batches:
            for s in range(0, len(group), size):
                self._train(group[s : s + size])

    def _examples(self, jobs: list[TrainJob]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """(x, y, index, offsets): the examples a pass reads, and where each job's client starts."""
        clients = np.array([job.client for job in jobs])
        if self.stored:
            return self.data.x, self.data.y, self.flat_index, self.offsets[clients]
        unique, where = np.unique(clients, return_inverse=True)
        parts = [self.data.client_data(int(c)) for c in unique]
        starts = np.concatenate([[0], np.cumsum([len(y) for _, y in parts])[:-1]])
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return x, y, np.arange(len(y)), starts[where]

    def _minibatches(
        self,
        jobs: list[TrainJob],
        ns: np.ndarray,
        batches: np.ndarray,
        bs: np.ndarray,
        index: np.ndarray,
        offsets: np.ndarray,
    ) -> np.ndarray:
        """[batches, J, B] indices into the pass's examples of every job's minibatches, zero-padded."""
        tr = self.trainer
        if tr.local_epochs is None and type(tr).batch_indices is LocalTrainer.batch_indices:  # one vectorised call
            local = minibatches(ns, batches, bs, mix(np.array([job.seed for job in jobs], dtype=np.uint64)))
        else:  # epochs mode, or a trainer with its own order: ask it job by job
            local = np.zeros((int(batches.max(initial=0)), len(jobs), int(bs.max(initial=0))), dtype=np.int64)
            for k, job in enumerate(jobs):
                local[: batches[k], k, : bs[k]] = tr.batch_indices(int(ns[k]), int(batches[k]), job.seed)
        return index[offsets[None, :, None] + local]

    def _buffer(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The first `numel` elements of a named scratch buffer that only ever grows: passes reuse
        pages already mapped instead of faulting in fresh ones (their outputs never live here)."""
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._scratch[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def _deltas(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(buffer, [j, P] view of it) in which a pass trains and leaves its deltas, which outlive
        the pass: the buffer of an earlier pass whose rows nobody references any more (the
        storage's reference count says so, views included), or a fresh one with room for a power
        of two of rows, so that passes of varying size can take it over later. Fresh pages cost
        a fault each, about as much as copying the start models in."""
        p = self.trainer.model.numel
        fits = [k for k, spare in enumerate(self._spare) if spare.numel() >= j * p]
        for k in sorted(fits, key=lambda k: self._spare[k].numel()):
            # references: the buffer itself and the wrapper made by untyped_storage(); more are views
            if _storage_users(self._spare[k]) == 2:
                buffer = self._spare.pop(k)
                return buffer, buffer[: j * p].view(j, p)
        rows = max(j, min(1 << (j - 1).bit_length(), self.chunk_size()))
        buffer = torch.empty(rows * p)
        return buffer, buffer[: j * p].view(j, p)

    def _layers(self, name: str, j: int) -> list[torch.Tensor]:
        """Per-layer [j, *shape] tensors, each contiguous, carved from one scratch buffer."""
        flat = self._buffer(name, j * self.trainer.model.numel)
        return [
            t.view(j, *shape)
            for t, shape in zip(torch.split(flat, [j * n for n in self.trainer.model.sizes]), self.trainer.model.shapes)
        ]

    def _full_losses(
        self,
        segments: list[tuple[int, int, torch.Tensor]],
        ns: np.ndarray,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        index: np.ndarray,
        offsets: np.ndarray,
        flipped: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each job's mean loss over all its client's examples at its start model: per start model,
        one forward over its jobs' examples, in chunks, summed per job."""
        out = torch.empty(len(ns), dtype=torch.float64)
        chunk = max(1, (64 * 2**20) // (4 * self._act))
        for a, b, base in segments:
            counts = ns[a:b]
            ends = np.cumsum(counts)
            ex = index[np.arange(ends[-1]) + np.repeat(offsets[a:b] - (ends - counts), counts)]
            owner = torch.from_numpy(np.repeat(np.arange(b - a), counts))
            sums = torch.zeros(b - a, dtype=torch.float64)
            for s in range(0, len(ex), chunk):
                e = torch.from_numpy(ex[s : s + chunk])
                ye = y_all[e]
                if flipped is not None:
                    ye = torch.where(flipped[a:b][owner[s : s + chunk]], flip_labels(ye, self.data.num_classes), ye)
                ce = nn.functional.cross_entropy(self.trainer.model.forward(base, x_all[e]), ye, reduction="none")
                sums.index_add_(0, owner[s : s + chunk], ce.double())
            out[a:b] = sums / torch.from_numpy(counts)
        return out

    def _flipped(self, jobs: list[TrainJob]) -> torch.Tensor | None:
        """[J] which jobs train on flipped labels (a label-flipping attacker's), or None if none does."""
        if not any(job.flip_labels for job in jobs):
            return None
        return torch.tensor([job.flip_labels for job in jobs])

    def _corrections(self, jobs: list[TrainJob]) -> list[torch.Tensor] | None:
        """Per-layer [J, *shape] gradient corrections of the jobs (zero for a job without one), or
        None when no job has one."""
        if all(job.correction is None for job in jobs):
            return None
        flat = torch.zeros(len(jobs), self.trainer.model.numel)
        for k, job in enumerate(jobs):
            if job.correction is not None:
                flat[k] = job.correction
        model = self.trainer.model
        return [t.unflatten(1, shape) for t, shape in zip(torch.split(flat, model.sizes, 1), model.shapes)]

    @torch.no_grad()
    def _train(self, jobs: list[TrainJob]) -> None:
        t0 = time.perf_counter()
        tr, model = self.trainer, self.trainer.model
        # a pool shares few start models: order jobs by it, so each is one broadcast slice
        jobs = sorted(jobs, key=lambda job: (job.base_version, id(job.base_w)))
        segments: list[tuple[int, int, torch.Tensor]] = []  # (first row, end row, flat start model)
        for k, job in enumerate(jobs):
            if segments and job.base_w is jobs[k - 1].base_w:
                segments[-1] = (segments[-1][0], k + 1, segments[-1][2])
            else:
                segments.append((k, k + 1, job.base_w))
        j = len(jobs)
        steps = np.array([job.steps for job in jobs])
        ns = self.sizes[[job.client for job in jobs]]
        bs = np.minimum(tr.batch_size, ns)
        x_all, y_all, index, offsets = self._examples(jobs)
        flipped = self._flipped(jobs)
        batches = steps * tr.batches_per_step
        gidx_t = torch.from_numpy(self._minibatches(jobs, ns, batches, bs, index, offsets))
        if tr.local_epochs is None and gidx_t.shape[2] < self.min_width:  # zero-weight slots: any example
            gidx_t = nn.functional.pad(gidx_t, (0, self.min_width - gidx_t.shape[2]))
        s_max, b_max = int(steps.max(initial=0)), gidx_t.shape[2]
        if tr.local_epochs is None:  # every batch full: one [J, B] weight for the whole pass
            widths = None
            weight = torch.from_numpy(np.where(np.arange(b_max) < bs[:, None], 1.0 / bs[:, None], 0.0)).float()
        else:  # [slots, J, B]: each step's mean over its own batch; 0 past a job's batches
            sizes = np.zeros((gidx_t.shape[0], j), dtype=np.int64)
            for c, (n, count) in enumerate(zip(ns.tolist(), batches.tolist())):
                sizes[:count, c] = tr.batch_sizes(n, count)
            widths = sizes.max(1, initial=0).tolist()
            share = np.where(np.arange(b_max) < sizes[..., None], 1.0 / np.maximum(sizes, 1)[..., None], 0.0)
            weight = torch.from_numpy(share).float()
        active = torch.from_numpy(np.arange(s_max)[:, None] < steps[None, :])  # [S, J]
        lr_mask = active.float() * tr.lr
        # per-layer start models, for the proximal term's pull
        starts = [(a, b, list(model.unflatten(base).values())) for a, b, base in segments] if tr.step.prox_mu else []
        # the pass trains in its deltas' buffer, a row per job, and turns each row w into
        # w0 - w at the end: per-layer views of the rows multiply as fast as contiguous layers
        buffer, flat = self._deltas(j)
        for a, b, base in segments:
            flat[a:b] = base
        ws = [t.unflatten(1, shape) for t, shape in zip(torch.split(flat, model.sizes, 1), model.shapes)]
        t1 = time.perf_counter()
        losses = torch.zeros(j)
        start_losses = (
            self._full_losses(segments, ns, x_all, y_all, index, offsets, flipped)
            if tr.start_loss == "full"
            else torch.full((j,), float("nan"))
        )
        gbuf = self._layers("g", j)
        xbuf = self._buffer("x", j * b_max * x_all.shape[1], x_all.dtype).view(j * b_max, x_all.shape[1])
        k = tr.batches_per_step
        corrections = self._corrections(jobs)

        def grads(params, slot):
            if widths is None:
                width, gi, a = b_max, gidx_t[slot].view(-1), weight
            else:
                width = widths[slot]
                gi, a = gidx_t[slot, :, :width].reshape(-1), weight[slot, :, :width]
            xb = torch.index_select(x_all, 0, gi, out=xbuf[: len(gi)]).view(j, width, -1)
            # a step's first gradient goes to the reused buffer: the step consumes it
            yb = y_all[gi].view(j, width)
            if flipped is not None:
                yb = torch.where(flipped[:, None], flip_labels(yb, self.data.num_classes), yb)
            return self.kernel.grads(params, xb, yb, a, out=gbuf if slot % k == 0 else None)

        for h in range(s_max):
            per, first = tr.step(ws, grads, h, lr_mask[h], starts, corrections)
            if h == 0 and tr.start_loss == "first_batch":
                start_losses = first.clone()
            losses += torch.where(active[h], per, 0.0)
        t2 = time.perf_counter()
        for a, b, base in segments:  # delta = w0 - w (see _take for the rows' lifetime)
            torch.sub(base, flat[a:b], out=flat[a:b])
        ids = [job.job_id for job in jobs]
        self._slabs[self.passes] = (buffer, set(ids), j)
        self._slab_of.update(dict.fromkeys(ids, self.passes))
        loss_mean = (losses / torch.from_numpy(np.maximum(steps, 1))).tolist()
        planned = [tr.num_steps(n) for n in ns.tolist()] if tr.local_steps is None else [tr.local_steps] * j
        # one pass over the jobs in C: a view per row (unbind), an update per job (map)
        updates = map(
            ClientUpdate,
            [job.client for job in jobs],
            [job.base_version for job in jobs],
            flat.unbind(0),
            ns.tolist(),
            steps.tolist(),
            loss_mean,
            start_losses.tolist(),
            planned,
        )
        self.done.update(zip(ids, zip(jobs, updates)))
        self.trained += j
        self.passes += 1
        self.gather_seconds += t1 - t0 + time.perf_counter() - t2
        self.train_seconds += t2 - t1

    @torch.no_grad()
    def evaluate_many(self, ws: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, float]]:
        if len(ws) == 1:
            return super().evaluate_many(ws, x, y)
        out = []
        per = max(1, (64 * 2**20) // (4 * len(y) * max(self._act, 1)))  # snapshots per pass
        for s in range(0, len(ws), per):
            with self.trainer.model.evaluating():
                logits = self._fwd_eval(torch.stack(ws[s : s + per]), x)  # [K, N, C]
            k, n, c = logits.shape
            ce = nn.functional.cross_entropy(logits.reshape(-1, c), y.repeat(k), reduction="none").view(k, n)
            correct = (logits.argmax(2) == y).sum(1).tolist()
            loss = ce.double().sum(1).tolist()  # summed like FlatModel.evaluate, then divided
            out += [(c_ / n, l_ / n) for c_, l_ in zip(correct, loss)]
        return out


def make_executor(
    kind: str,
    trainer: LocalTrainer,
    data: FederatedDataset,
    memory_mb: float = 512.0,
    notify: Callable[[str], None] | None = None,
    ray_actors: int = 2,
    ray_address: str | None = None,
) -> Executor:
    """The executor a config names; a model the batched one cannot train faithfully falls back
    to the sequential reference with a one-line notice rather than a wrong result. `ray` trains
    on Ray actors (`asyncfl.sim.ray_executor`, the optional extra asyncfl[ray])."""
    if kind == "sequential":
        return SequentialExecutor(trainer, data)
    if kind not in ("batched", "ray"):
        raise ValueError(f"unknown executor {kind!r}; use 'sequential', 'batched' or 'ray'")
    try:
        if kind == "ray":
            try:
                from asyncfl.sim.ray_executor import RayExecutor
            except ImportError as missing:
                raise ConfigError("executor ray needs Ray: pip install 'asyncfl[ray]'") from missing
            return RayExecutor(trainer, data, memory_mb, ray_actors, ray_address)
        return BatchedExecutor(trainer, data, memory_mb)
    except NotVectorisable as why:
        msg = f"{kind} executor unavailable for {trainer.model.name} ({why}); using sequential"
        (notify or (lambda m: print(m, file=sys.stderr)))(msg)
        return SequentialExecutor(trainer, data)
