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
        r.pop("wall_seconds"), r.pop("peak_rss_mb")
    s.pop("peak_rss_mb"), s.pop("threads")
    return s


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    from conftest import small_config

    return summary_of(small_config(executor="batched"), tmp_path_factory.mktemp("batched"))


@pytest.mark.parametrize("actors", [1, 2, 3])
def test_same_summary_as_the_batched_executor(small, tmp_path, batched, actors):
    ours = summary_of(small(executor="ray", ray_actors=actors), tmp_path)
    assert ours == batched
