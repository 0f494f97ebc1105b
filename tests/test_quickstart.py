"""The demo's claim, checked on the real preset: every method reaches 0.90, async first."""

import json

from asyncfl import config
from asyncfl.experiment import run_experiment


def test_quickstart_every_run_reaches_target_and_async_is_faster(tmp_path):
    run_experiment(config.load(preset="quickstart"), tmp_path)
    runs = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    assert set(runs) == {"fedavg", "fedprox", "fedasync", "fedbuff"}
    for r in runs.values():
        assert r["time_to_target"] is not None, f"{r['name']} never reached 0.90"
        assert r["final_accuracy"] >= 0.9, r["name"]
    for fast in ("fedbuff", "fedasync"):
        assert runs[fast]["time_to_target"] < runs["fedavg"]["time_to_target"], fast
