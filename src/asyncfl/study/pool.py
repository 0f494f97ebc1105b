"""Where many independent runs execute: a pool of worker processes (spawn, one torch thread
each) or this process, and the progress bar that counts them."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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


def make_pool(workers: int) -> Inline | ProcessPoolExecutor:
    if workers == 1:
        return Inline()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)


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
