"""The ray executor: the batched executor's results, trained on Ray actors ahead of need."""

import json

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'asyncfl[ray]'")

from asyncfl.experiment import run_experiment  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One small local Ray for the module: its start-up is most of these tests' time."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def summary_of(cfg, out) -> dict:
    """summary.json without what is measured rather than computed."""
    run_experiment(cfg, out, threads=1)
    s = json.loads((out / "summary.json").read_text())
    for r in s["runs"]:
        r.pop("wall_seconds"), r.pop("peak_rss_mb"), r.pop("ray_actor_peak_rss_mb", None)
    s.pop("peak_rss_mb"), s.pop("threads")
    return s


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    from conftest import small_config

    return summary_of(small_config(executor="batched"), tmp_path_factory.mktemp("batched"))


@pytest.mark.parametrize("actors,ship_always", [(1, True), (2, True), (3, True), (2, False)])
def test_same_summary_as_the_batched_executor(small, tmp_path, batched, actors, ship_always, monkeypatch):
    """`ship_always`: every waiting pass goes to the actors (the driver keeps none, whatever the
    round trips cost), so the remote path is what is compared; else the driver's own choice."""
    from asyncfl.sim import ray_executor

    if ship_always:
        monkeypatch.setattr(ray_executor, "EXPLORE", 1)
    ours = summary_of(small(executor="ray", ray_actors=actors), tmp_path)
    assert ours == batched


def test_each_update_equals_the_batched_executors_in_any_order(torch_threads):
    """Jobs of three start models, small clients among them (narrow minibatches), partial work,
    a cancelled job and one nobody expected to report: every update is the batched executor's,
    bit for bit, asked for in a shuffled order, and the client update count is the same."""
    import random

    import numpy as np
    import torch
    from conftest import digits_clients

    from asyncfl.algorithms.trainer import LocalTrainer
    from asyncfl.models import FlatModel, build_model
    from asyncfl.sim.batched import BatchedExecutor
    from asyncfl.sim.executor import TrainJob
    from asyncfl.sim.ray_executor import RayExecutor

    torch_threads(1)
    data = digits_clients(60)
    torch.manual_seed(0)
    trainer = LocalTrainer(
        FlatModel(build_model("mlp", data.num_features, data.num_classes, hidden=(32,))), 0.1, 16, local_steps=5
    )
    w0 = trainer.model.initial_weights()
    bases = [w0 + 0.01 * v for v in range(3)]

    small = np.flatnonzero(data.client_sizes() < 16).tolist()
    # jobs 7 (not expected to report) and 11, 12 (cut short after training) train again alone,
    # on small clients: a pass without a full minibatch
    clients = {7: small[0], 11: small[1], 12: small[2]}

    def jobs():
        return [
            TrainJob(k, clients.get(k, (7 * k) % 60), k % 3, bases[k % 3], 100 + k, 1 + k % 5, reports=k != 7)
            for k in range(40)
        ]

    local, remote = BatchedExecutor(trainer, data), RayExecutor(trainer, data, actors=2)
    order = [k for k in range(40) if k != 3]
    random.Random(0).shuffle(order)
    got = {}
    for ex in (local, remote):
        for job in jobs():
            ex.submit(job)
        ex.cancel(3)
        ex.set_steps(11, 1)
        ex.set_steps(12, 2)
        got[ex] = {k: ex.result(k) for k in order}
    for k in order:
        u, v = got[local][k], got[remote][k]
        assert torch.equal(u.delta, v.delta), k
        assert (u.client_id, u.base_version, u.n_examples, u.steps, u.loss, u.start_loss, u.planned_steps) == (
            v.client_id,
            v.base_version,
            v.n_examples,
            v.steps,
            v.loss,
            v.start_loss,
            v.planned_steps,
        )
    assert remote.trained == local.trained
    assert remote.models_put == 3  # each start model once
    peaks = remote.actor_peak_rss_mb()  # an actor holds torch, the data and its passes: not GBs
    assert len(peaks) == 2 and all(100 < p < 2000 for p in peaks), peaks
    remote.close()


@pytest.mark.slow
def test_a_two_node_cluster_joined_from_the_command_line(tmp_path, batched):
    """`ray start --head` and a second `ray start --address` on this machine: the command line
    joins them with --ray-address, and the summary is the batched executor's."""
    import subprocess
    import sys

    import yaml
    from conftest import small_config
    from ray_cluster import node_env, two_node_cluster

    with two_node_cluster() as address:
        config_file = tmp_path / "small.yaml"
        config_file.write_text(yaml.safe_dump(small_config(executor="ray").model_dump(mode="json")))
        out = tmp_path / "out"
        command = [sys.executable, "-m", "asyncfl.cli", "compare", "--config", str(config_file), "--threads", "1"]
        command += ["--ray-address", address, "--set", "ray_actors=2", "--out", str(out)]
        subprocess.run(command, env=node_env(), check=True, timeout=300, capture_output=True)
        s = json.loads((out / "summary.json").read_text())
        for r in s["runs"]:
            r.pop("wall_seconds"), r.pop("peak_rss_mb"), r.pop("ray_actor_peak_rss_mb")
        s.pop("peak_rss_mb"), s.pop("threads")
        assert s == batched


def test_ray_address_applies_to_the_ray_executor_only(tmp_path, capsys):
    from asyncfl.cli import main

    rc = main(["simulate", "--preset", "quickstart", "--ray-address", "auto", "--out", str(tmp_path)])
    assert rc == 2
    assert "--ray-address applies to executor ray" in capsys.readouterr().out


def test_without_ray_the_ray_executor_asks_for_the_extra(small, tmp_path, monkeypatch):
    import sys

    from asyncfl.config import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "asyncfl.sim.ray_executor")
    with pytest.raises(ConfigError, match=r"pip install 'asyncfl\[ray\]'"):
        run_experiment(small(executor="ray"), tmp_path, threads=1)


def test_a_killed_actor_is_replaced_and_the_result_is_unchanged(small, tmp_path, batched, monkeypatch):
    """kill -9 of one actor's process mid-run: a new actor takes its place, the passes it had
    not answered are trained again (jobs are deterministic), and summary.json is unchanged."""
    import os
    import signal

    from asyncfl.sim import ray_executor

    seen, result = [], ray_executor.RayExecutor.result

    def killing_result(self, job_id):
        seen.append(self)
        if len(seen) == 30:  # mid-run, with passes in flight
            os.kill(ray.get(self.actors[0].pid.remote()), signal.SIGKILL)
        return result(self, job_id)

    monkeypatch.setattr(ray_executor.RayExecutor, "result", killing_result)
    monkeypatch.setattr(ray_executor, "EXPLORE", 1)  # passes keep going to the actors after the kill
    ours = summary_of(small(executor="ray", ray_actors=2), tmp_path)
    assert len(seen) > 30 and seen[29].replaced >= 1  # the executor of the run it was killed in
    assert ours == batched


def test_a_run_reports_its_actors_memory_and_the_driver_keeps_little(small, tmp_path, monkeypatch):
    """Over a run of a thousand server versions: summary.json gives each actor's peak RSS, the
    driver keeps at most MODELS_KEPT start models and a reply only for jobs in flight, and the
    object references it holds (the object store's entries it owns) do not grow."""
    from asyncfl.sim import ray_executor

    core_worker = ray._private.worker.global_worker.core_worker  # the driver's reference counts
    kept, result = [], ray_executor.RayExecutor.result

    def sampling_result(self, job_id):
        update = result(self, job_id)
        refs = len(core_worker.get_all_reference_counts())
        kept.append((len(self.models), len(self.rows_left), len(self.shipped), len(self.passes.trained_steps), refs))
        return update

    monkeypatch.setattr(ray_executor.RayExecutor, "result", sampling_result)
    held_before = len(core_worker.get_all_reference_counts())
    cfg = small(executor="ray", ray_actors=2, sets=["stop.max_time=600", "runs.fedbuff.algorithm.buffer_size=1"])
    run_experiment(cfg, tmp_path, runs=["fedbuff"], threads=1)
    run = json.loads((tmp_path / "summary.json").read_text())["runs"][0]
    assert run["server_steps"] > 1000
    peaks = run["ray_actor_peak_rss_mb"]  # an actor holds torch, the data and its passes: not GBs
    assert len(peaks) == 2 and all(100 < p < 2000 for p in peaks), peaks
    concurrency = cfg.run("fedbuff").scheduler.concurrency
    models, replies, shipped, replayed, refs = (max(column) for column in zip(*kept))
    assert models == ray_executor.MODELS_KEPT
    assert max(replies, shipped, replayed) <= concurrency
    assert refs - held_before <= ray_executor.MODELS_KEPT + concurrency + 1  # models, replies, the shared data
    assert len(core_worker.get_all_reference_counts()) <= held_before  # the run is over: all freed


@pytest.mark.slow
def test_a_million_devices_with_ten_thousand_in_flight_train_on_two_actors():
    """bench/scale.py's run (10^6 devices as arrays on the driver, 10^4 training at once, FedBuff
    K=100), cut to 20,000 trips, on 2 actors: updates are applied, the actors trained jobs, none
    was trained twice, and each actor holds far less than the population or the jobs in flight."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    sim = scale.build(1_000_000, 10_000, 20_000, 512.0, executor="ray", ray_actors=2)
    try:
        m = sim.run()
        peaks = sim.executor.actor_peak_rss_mb()
        here, shipped, trained = sim.executor.trained_here, sim.executor.shipped_jobs, sim.executor.trained
    finally:
        sim.executor.close()
    assert m.server_steps >= 80 and m.completed >= 8_000
    assert m.rows[-1]["test_accuracy"] > 0.5
    assert shipped > 0 and here + shipped <= trained + 10_000  # beyond it: jobs in flight at the stop
    assert len(peaks) == 2 and all(p < 1500 for p in peaks), peaks  # torch, the data, one pass


def test_clients_all_smaller_than_a_batch_give_the_batched_executors_summary(small, tmp_path, monkeypatch):
    """100 iid clients of about 14 digits each, batches of 16: passes are padded as wide as the
    widest client, not the batch, as in the local executor, so none is trained twice."""
    from asyncfl.sim import ray_executor

    counts, close = [], ray_executor.RayExecutor.close

    def counting_close(self):
        counts.append((self.shipped_jobs + self.trained_here, self.trained))
        close(self)

    monkeypatch.setattr(ray_executor.RayExecutor, "close", counting_close)
    sets = ["data.num_clients=100", "data.partition.kind=iid"]
    theirs = summary_of(small(executor="batched", sets=sets), tmp_path / "batched")
    assert summary_of(small(executor="ray", ray_actors=2, sets=sets), tmp_path / "ray") == theirs
    trained_by_us, trained_locally = counts[1]  # fedbuff's (fedavg's also trains trips its rounds drop)
    assert trained_by_us <= trained_locally + 8, counts  # beyond it: the 8 jobs in flight at the stop
