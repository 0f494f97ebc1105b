"""Choosing torch's intra-op thread count for a simulation.

torch's default, one thread per core, is the right choice for large passes on a quiet machine
and a catastrophic one for small models on a busy one: OpenMP threads that wait for each other
on tiny operations slowed a quickstart run from 0.3 s to 20 s on a loaded 2-core machine. No
fixed rule on the model's size covers both (a 5,000-parameter MLP trained 10^4 clients at a
time gains from two threads), so `auto` measures: it times the run's own training work, a pass
of the clients that will train together, with one thread and with the default, interleaved, and
keeps more threads only when they pay off clearly. The costs are lopsided: one thread loses at
most a factor of the core count on a quiet machine, while threads that wait for a busy core lost
a factor of 48 on the quickstart's sequential run (`bench/threads.py`); so more threads must
be at least MIN_SPEEDUP times faster, which a loaded machine never shows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from asyncfl.sim.executor import Executor, TrainJob

# more threads must beat one by this factor: they are the fragile choice when load changes
MIN_SPEEDUP = 1.5


@dataclass
class ThreadChoice:
    threads: int
    mode: str  # "auto" (measured) or "fixed" (asked for)
    seconds: dict[int, float] = field(default_factory=dict)  # best probe time per thread count

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "threads": self.threads,
            "probe_seconds": {str(k): round(v, 6) for k, v in self.seconds.items()},
        }


def measure(
    workload: Callable[[], None], candidates: list[int], repeats: int = 3, min_seconds: float = 0.02
) -> list[dict[int, float]]:
    """Wall time of `workload` under each thread count, per round, the counts interleaved so that
    a change of load hits them alike. A timing repeats the workload until it spans about
    `min_seconds` (a millisecond's timing is mostly noise); a round in which one thread is the
    fastest ends the probe, and a timing of more threads stops as soon as it is slower than one
    thread's (the answer is one thread then; threads that wait are what would make a probe
    expensive). Leaves torch's thread count as it found it."""
    before = torch.get_num_threads()
    rounds: list[dict[int, float]] = []
    try:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        workload()  # warm-up (first-call allocations, kernel choices) and a first estimate
        reps = min(100, max(1, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))
        for _ in range(repeats):
            times: dict[int, float] = {}
            for n in candidates:
                torch.set_num_threads(n)
                t0, done = time.perf_counter(), 0
                while done < reps:  # more threads stop once they are slower than one thread was
                    workload()
                    done += 1
                    if n > 1 and time.perf_counter() - t0 > times.get(1, math.inf) * reps:
                        break
                times[n] = (time.perf_counter() - t0) / done
            rounds.append(times)
            if min(times, key=times.get) == 1:
                break
    finally:
        torch.set_num_threads(before)
    return rounds


def choose(rounds: list[dict[int, float]]) -> int:
    """The most threads that were at least MIN_SPEEDUP times faster than one thread in every
    round, else one: a single lucky timing must not pick the fragile setting."""
    return max(n for n in rounds[0] if n == 1 or all(r[1] >= MIN_SPEEDUP * r[n] for r in rounds))


def training_probe(
    make: Callable[[], Executor], w0: torch.Tensor, clients: int, num_clients: int, seed: int = 0
) -> Callable[[], None]:
    """A workload of what a run repeats: one training pass (`clients` jobs from w0 submitted to a
    fresh executor and the first result asked for: a batched executor trains them all in one
    pass, the sequential one that client alone, as in a run) and one evaluation of the model on
    the test set, whose larger operations are where waiting threads cost most."""
    picks = np.random.default_rng(seed).integers(0, num_clients, size=clients)

    def run() -> None:
        executor = make()
        sizes = executor.data.client_sizes()
        for k, client in enumerate(picks.tolist()):
            executor.submit(TrainJob(k, client, 0, w0, seed + k, executor.trainer.num_steps(int(sizes[client]))))
        executor.result(0)
        executor.evaluate_many([w0], executor.data.x_test, executor.data.y_test)

    return run


def resolve(threads: int | str, workload: Callable[[], None] | None) -> ThreadChoice:
    """Apply `threads` (a count, or "auto": measure `workload`) and say what was chosen."""
    if threads != "auto":
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
        torch.set_num_threads(threads)
        return ThreadChoice(threads, "fixed")
    default = torch.get_num_threads()
    if default <= 1 or workload is None:
        torch.set_num_threads(1)
        return ThreadChoice(1, "auto")
    rounds = measure(workload, sorted({1, default}))
    n = choose(rounds)
    torch.set_num_threads(n)
    return ThreadChoice(n, "auto", {k: min(r[k] for r in rounds) for k in rounds[0]})
