"""Studies and robustness matrices on Ray (`backend: ray`): the local backend's files, the grid
cap applied, the progress bar counting every run, and the refusals."""

import csv
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'asyncfl[ray]'")

from conftest import small_config  # noqa: E402
from rich.console import Console  # noqa: E402

from asyncfl import config  # noqa: E402
from asyncfl.robustness.runner import run_robustness  # noqa: E402
from asyncfl.study import run_study  # noqa: E402

MEASURED = {"wall_seconds", "peak_rss_mb", "threads", "workers", "backend"}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One small local Ray for the module: its start-up is most of these tests' time."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def tiny_study(**study) -> config.ExperimentConfig:
    """Two methods at C = 8, seeds 0 and 1; FedBuff's grid of two buffer sizes, whose second
    point is capped at the first's time to target (80 s, so stopped at 80.8 s)."""
    methods = [{"name": "fedbuff", "grid": {"runs.fedbuff.algorithm.buffer_size": [2, 4]}}, {"name": "fedavg"}]
    return small_config(study={"concurrency": [8], "seeds": [0, 1], "methods": methods, **study})


def tiny_matrix(**robustness) -> config.ExperimentConfig:
    """Both runs, undefended and behind the coordinate median, without attack and with a quarter
    of the devices flipping signs: 8 runs."""
    defences = [{"name": "none"}, {"name": "median", "set": {"algorithm.aggregation": "median"}}]
    attacks = [{"name": "sign flip", "kind": "sign_flip"}]
    block = {"attacks": attacks, "fractions": [0.25], "defences": defences, "seeds": [0], **robustness}
    return small_config(robustness=block)


def without_measured(value):
    """A summary or entry without what is measured rather than computed."""
    if isinstance(value, dict):
        return {k: without_measured(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [without_measured(v) for v in value]
    return value


def run_files(out: Path) -> dict:
    """Every run's entry.json and metrics.csv (less the wall clock column), by directory."""
    files = {}
    for entry in sorted(out.rglob("entry.json")):
        with (entry.parent / "metrics.csv").open() as f:
            rows = [{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(f)]
        files[str(entry.parent.relative_to(out))] = (without_measured(json.loads(entry.read_text())), rows)
    return files


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return run_study(tiny_study(), out, threads=1), out


def terminal() -> Console:
    """A console that draws the progress bar into a buffer."""
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def drawn(console: Console) -> str:
    """What the console wrote, less the terminal's control codes."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())


def last_count(console: Console, bar: str) -> str:
    """The bar's last drawn 'done/total'."""
    return re.findall(bar + r" .*?(\d+/\d+)", drawn(console))[-1]


@pytest.mark.parametrize("workers", [None, 1])
def test_a_study_on_ray_writes_the_local_backends_files(local_study, tmp_path, workers):
    """workers unset: as many tasks as Ray's 2 CPUs; 1: a placement group of one CPU."""
    local, local_out = local_study
    console = terminal()
    ours = run_study(tiny_study(backend="ray", workers=workers), tmp_path, console, threads=1)
    assert without_measured(ours) == without_measured(local)
    assert run_files(tmp_path) == run_files(local_out)
    assert len(run_files(tmp_path)) == 3 + 2 + 2  # grid runs, seed runs, the tuning seed's runs
    assert ours["study"]["workers"] == (2 if workers is None else 1)
    assert ours["study"]["threads"] == {"mode": "fixed", "threads": 1}
    assert last_count(console, "study runs") == "5/5"  # 3 grid runs and 2 seed runs
    assert "worker(s) (Ray tasks)" in drawn(console)


def test_the_grid_cap_stops_a_point_on_ray_as_it_does_locally(local_study, tmp_path):
    local, _ = local_study
    ours = run_study(tiny_study(backend="ray"), tmp_path, threads=1)
    grid = {e["name"]: e for e in ours["grid"]}
    first, capped = grid["fedbuff-C8-g0"], grid["fedbuff-C8-g1"]
    assert first["time_to_target"] == 80.0 and first["grid_cap"] is None and first["stop_max_time"] == 200
    assert capped["grid_cap"] == pytest.approx(80.8) and capped["stop_max_time"] == capped["grid_cap"]
    assert capped["time_to_target"] is None and capped["virtual_time"] <= capped["grid_cap"]
    for e in local["grid"]:
        for key in ("grid_cap", "stop_max_time", "virtual_time", "time_to_target", "server_steps"):
            assert grid[e["name"]][key] == e[key]


def test_a_robustness_matrix_on_ray_writes_the_local_backends_files(tmp_path):
    local = run_robustness(tiny_matrix(), tmp_path / "local", threads=1)
    console = terminal()
    ours = run_robustness(tiny_matrix(backend="ray"), tmp_path / "ray", console, threads=1)
    assert without_measured(ours) == without_measured(local)
    assert run_files(tmp_path / "ray") == run_files(tmp_path / "local")
    assert len(run_files(tmp_path / "ray")) == 8
    assert (tmp_path / "ray" / "results.csv").read_text() == (tmp_path / "local" / "results.csv").read_text()
    assert last_count(console, "matrix runs") == "8/8"


@pytest.mark.parametrize(
    "block, message",
    [
        ({"study": {"concurrency": [8], "methods": [{"name": "fedbuff"}], "backend": "dask"}}, "study.backend"),
        (
            {"robustness": {"attacks": [{"name": "a", "kind": "scale"}], "defences": [{"name": "none"}], "backend": 1}},
            "robustness.backend",
        ),
    ],
)
def test_a_bad_backend_is_a_config_error_naming_the_choices(block, message):
    with pytest.raises(config.ConfigError, match=rf"{message}: Input should be 'local' or 'ray'"):
        small_config(**block)


def test_workers_default_to_one_locally_and_to_the_cluster_on_ray():
    assert tiny_study().study.workers == 1 and tiny_matrix().robustness.workers == 1
    assert tiny_study(backend="ray").study.workers is None and tiny_matrix(backend="ray").robustness.workers is None
    with pytest.raises(config.ConfigError, match="study.workers: Input should be greater than or equal to 1"):
        tiny_study(backend="ray", workers=0)


def test_the_ray_executor_within_runs_on_ray_is_refused():
    with pytest.raises(config.ConfigError, match="executor ray within study.backend ray: each run is already a Ray"):
        small_config(executor="ray", study=tiny_study(backend="ray").study.model_dump())
    with pytest.raises(config.ConfigError, match="executor ray within robustness.backend ray"):
        small_config(executor="ray", robustness=tiny_matrix(backend="ray").robustness.model_dump())
    assert small_config(executor="ray", study=tiny_study().study.model_dump()).study.backend == "local"


def test_more_workers_than_the_cluster_has_cpus_is_a_config_error(monkeypatch):
    from asyncfl.study import ray_pool

    monkeypatch.setattr(ray_pool, "RESERVE_TIMEOUT_S", 2.0)
    with pytest.raises(config.ConfigError, match=r"did not free 3 CPUs in 2 s \(it has 2\)"):
        ray_pool.RayPool(3, None)
    ray_pool.RayPool(2, None).shutdown()  # the failed reservation left the cluster's CPUs free


def test_a_failed_run_raises_its_error_and_cancels_the_runs_not_finished():
    """What a run raises reaches the runner as itself; after it, shutdown(cancel_futures=True)
    cancels the queued and running tasks instead of waiting for them."""
    import math

    from asyncfl.study.ray_pool import RayPool

    pool = RayPool(1, None)
    with pytest.raises(ValueError, match="math domain error"):
        pool.submit(math.sqrt, -1).result()
    slow = [pool.submit(time.sleep, 60) for _ in range(3)]
    t0 = time.perf_counter()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.perf_counter() - t0 < 30
    assert all(isinstance(f.exception(), ray.exceptions.TaskCancelledError) for f in slow)


@pytest.mark.slow
def test_a_study_on_a_two_node_cluster_joined_from_the_command_line(local_study, tmp_path):
    """Its runs on two one-CPU nodes, each importing this checkout's asyncfl: the local files."""
    import subprocess

    from ray_cluster import node_env, two_node_cluster

    local, local_out = local_study
    config_file = tmp_path / "study.yaml"
    config_file.write_text(json.dumps(tiny_study(backend="ray").model_dump(mode="json")))
    out = tmp_path / "out"
    with two_node_cluster() as address:
        command = [sys.executable, "-m", "asyncfl.cli", "compare", "--config", str(config_file), "--threads", "1"]
        command += ["--ray-address", address, "--out", str(out)]
        subprocess.run(command, env=node_env(), check=True, timeout=300, capture_output=True)
    ours = json.loads((out / "summary.json").read_text())
    assert ours["study"]["workers"] == 2  # the cluster's CPUs
    assert without_measured(ours) == without_measured(local)
    assert run_files(out) == run_files(local_out)


def test_ray_address_applies_to_a_study_on_ray_only(tmp_path, capsys):
    from asyncfl.cli import main

    config_file = tmp_path / "study.yaml"
    config_file.write_text(json.dumps(tiny_study().model_dump(mode="json")))
    rc = main(["compare", "--config", str(config_file), "--ray-address", "auto", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "backend ray (--set study.backend=ray)" in capsys.readouterr().out


def test_without_ray_backend_ray_asks_for_the_extra(monkeypatch):
    from asyncfl.study.pool import make_pool

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "asyncfl.study.ray_pool", raising=False)
    with pytest.raises(config.ConfigError, match=r"pip install 'asyncfl\[ray\]'"):
        make_pool(None, "ray")
