"""Where many independent runs execute: a pool of worker processes (spawn, one torch thread
each), this process, or Ray tasks (`asyncfl.study.ray_pool`), and the progress bar that counts
them."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from asyncfl.config import ConfigError


def _init_worker() -> None:
    torch.set_num_threads(1)


class Inline:
    """The ProcessPoolExecutor interface in this process (workers = 1): a task runs when its
    result is first asked for, in submission order."""

    class _Done:
        def __init__(self, fn, args):
            self._call, self._value = (fn, args), None

        def result(self):
            if self._call is not None:
                fn, args = self._call
                self._value, self._call = fn(*args), None
            return self._value

    def submit(self, fn, *args):
        return self._Done(fn, args)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def make_pool(workers: int | None, backend: str = "local", ray_address: str | None = None):
    """The pool of a study's or a matrix's `backend` and `workers` (None on Ray: the cluster's CPUs)."""
    if backend == "ray":
        try:
            from asyncfl.study.ray_pool import RayPool
        except ImportError as missing:
            raise ConfigError("backend ray needs Ray: pip install 'asyncfl[ray]'") from missing
        return RayPool(workers, ray_address)
    if workers == 1:
        return Inline()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)


def finished(pool, pending) -> list:
    """Tasks of `pending` that are done, at least one; in this process, all of them (each runs
    when its result is asked for)."""
    if isinstance(pool, Inline):
        return list(pending)
    return list(wait(list(pending), return_when=FIRST_COMPLETED).done)


def on_ray(backend: str) -> str:
    """What the runners' opening line adds about where the workers are."""
    return " (Ray tasks)" if backend == "ray" else ""


def run_progress(console: Console) -> Progress:
    """A bar of runs done out of all planned (drawn only on a terminal)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
