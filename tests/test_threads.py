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
def two_threads(torch_threads):
    torch_threads(2)


def test_more_threads_only_when_clearly_faster_in_every_round():
    assert threads.choose([{1: 1.0, 2: 0.95}]) == 1
    assert threads.choose([{1: 1.0, 2: 0.7}]) == 1  # 1.43x: not worth the risk of waiting threads
    assert threads.choose([{1: 1.0, 2: 0.5}]) == 2
    assert threads.choose([{1: 1.0, 2: 0.6, 4: 0.3}]) == 4
    assert threads.choose([{1: 0.2, 2: 1.0}]) == 1
    assert threads.choose([{1: 1.0, 2: 0.5}, {1: 1.0, 2: 0.9}, {1: 1.0, 2: 0.5}]) == 1  # one lucky round


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


def test_measure_restores_the_thread_count_and_times_long_enough(two_threads):
    (times,) = threads.measure(_slow_with(2), [1, 2], repeats=3, min_seconds=0.02)
    assert torch.get_num_threads() == 2
    assert times[1] == pytest.approx(0.002, rel=0.5) and times[2] > 5 * times[1]


@pytest.mark.parametrize("executor", ["sequential", "batched"])
def test_auto_probes_the_runs_own_training_pass(small, two_threads, executor):
    from asyncfl.build import build_data
    from asyncfl.experiment import choose_threads

    cfg = small(executor=executor)
    choice = choose_threads(cfg, cfg.runs[1], build_data(cfg), "auto")
    assert set(choice.seconds) == {1, 2} and all(0 < s < 5 for s in choice.seconds.values())
    assert choice.threads in (1, 2)
    assert choice.threads == torch.get_num_threads()


def test_summary_records_the_choice(tmp_path, two_threads):
    import json

    from asyncfl.cli import main

    assert (
        main(
            [
                "simulate",
                "--preset",
                "quickstart",
                "--run",
                "fedbuff",
                "--set",
                "stop.max_time=100",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["threads"]["mode"] == "auto" and set(summary["threads"]["probe_seconds"]) == {"1", "2"}
    assert summary["torch_threads"] == summary["threads"]["threads"]
    assert main(["simulate", "--preset", "quickstart", "--threads", "x", "--out", str(tmp_path)]) == 2
