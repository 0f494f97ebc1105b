"""The runs of a study or a robustness matrix as Ray tasks (`backend: ray`), behind the
interface the runners use of a process pool: `submit` gives a `concurrent.futures.Future`, so
`wait(..., FIRST_COMPLETED)` serves both. A task reserves one CPU and runs with one torch
thread, as a local worker process does, so results are the local backend's."""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import wait as wait_all

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from asyncfl.config import ConfigError
from asyncfl.sim.ray_executor import connect

# how long the cluster may take to free the CPUs `workers` asks for before that is an error
RESERVE_TIMEOUT_S = 60.0
# after an error, how long a cancelled run may take to end before it is cancelled again
CANCEL_AGAIN_S = 2.0


@ray.remote(num_cpus=1)
def _run(fn, *args):
    """`fn` is a module-level function (`tune`, `execute`): Ray ships it by name, and the
    worker imports it from its own asyncfl."""
    torch.set_num_threads(1)  # as a local worker process: thread counts change the last bits of floats
    return fn(*args)


class RayPool:
    """Tasks on the Ray cluster at `address` (None: Ray on this machine, see `connect`).
    `workers` caps the tasks in flight with a placement group of that many one-CPU bundles;
    None leaves it to Ray, which runs as many as the cluster has CPUs free."""

    def __init__(self, workers: int | None, address: str | None):
        connect(address)
        self.group = None
        self.options: dict = {}
        if workers is None:
            self.workers = int(ray.cluster_resources().get("CPU", 1))
        else:
            self.workers = workers
            self.group = placement_group([{"CPU": 1}] * workers, strategy="SPREAD")
            ready, _ = ray.wait([self.group.ready()], timeout=RESERVE_TIMEOUT_S)
            if not ready:
                remove_placement_group(self.group)
                raise ConfigError(
                    f"workers {workers}: the Ray cluster did not free {workers} CPUs in {RESERVE_TIMEOUT_S:.0f} s "
                    f"(it has {ray.cluster_resources().get('CPU', 0):g}); lower workers, or leave it unset to "
                    "use the cluster's CPUs"
                )
            self.options = {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group)}
        self.tasks: list[tuple[Future, ray.ObjectRef]] = []

    def submit(self, fn, *args) -> Future:
        ref = _run.options(**self.options).remote(fn, *args)
        future = ref.future()
        self.tasks.append((future, ref))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """`cancel_futures` (after an error): the runs not finished are cancelled, the queued
        ones before they start. The CPUs `workers` reserved go back to the cluster; Ray itself
        stays up until this process exits."""
        unfinished = [(future, ref) for future, ref in self.tasks if cancel_futures and not future.done()]
        while unfinished:  # a cancel can be lost to a task just starting: cancel again until each has ended
            for _, ref in unfinished:
                ray.cancel(ref, force=True)  # a running one too: its worker is ended
            wait_all([future for future, _ in unfinished], timeout=CANCEL_AGAIN_S)
            unfinished = [(future, ref) for future, ref in unfinished if not future.done()]
        if wait:
            wait_all([future for future, _ in self.tasks])
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
