"""`--threads auto`: the thread count is measured on the run's own work, and more threads are
kept only when clearly faster."""

import time

import pytest
import torch

from asyncfl.sim import threads


def _slow_with(n_slow: int):
    """A workload that takes 20 ms under `n_slow` threads and 2 ms otherwise."""
    def run():
        time.sleep(0.02 if torch.get_num_threads() == n_slow else 0.002)
    return run


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_choose_prefers_fewer_threads_within_margin():
    assert threads.choose({1: 1.0, 2: 0.95}) == 1
    assert threads.choose({1: 1.0, 2: 0.5}) == 2
    assert threads.choose({1: 0.2, 2: 1.0}) == 1


def test_auto_avoids_threads_that_wait_on_a_loaded_machine(two_threads):
    choice = threads.resolve("auto", _slow_with(2))
    assert choice.threads == 1 and torch.get_num_threads() == 1
    assert choice.seconds[2] > 5 * choice.seconds[1]
    assert choice.summary()["mode"] == "auto"


def test_auto_keeps_threads_that_pay_off(two_threads):
    choice = threads.resolve("auto", _slow_with(1))
    assert choice.threads == 2 and torch.get_num_threads() == 2


def test_fixed_count_and_bad_values(two_threads):
    assert threads.resolve(1, None).threads == 1 and torch.get_num_threads() == 1
    for bad in (0, -2, "many"):
        with pytest.raises(ValueError, match="threads"):
            threads.resolve(bad, None)


def test_measure_restores_the_thread_count(two_threads):
    threads.measure(_slow_with(1), [1, 2], repeats=1)
    assert torch.get_num_threads() == 2
