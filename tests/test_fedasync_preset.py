"""The fedasync-staleness preset (docs/experiments/fedasync.md): it holds the FedAsync paper's
grid, and a shortened run of three of its runs realises the staleness bounds and learns."""

import importlib.util
import itertools
import json
from pathlib import Path

from asyncfl import config
from asyncfl.experiment import run_experiment

PRESET = "fedasync-staleness"
PLOTS = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "fedasync_plots.py"


def _fedasync(cfg):
    return [r for r in cfg.runs if r.algorithm.name == "fedasync" and r.algorithm.max_staleness is not None]


def test_preset_holds_the_papers_grid():
    cfg = config.load(preset=PRESET)
    assert cfg.population.devices == 100 and cfg.data.partition.kind == "iid"
    assert cfg.executor == "batched" and cfg.stop.max_trips is not None  # one gradient budget for all

    grid = set()
    for r in _fedasync(cfg):
        a = r.algorithm
        grid.add((a.staleness.kind, a.alpha, a.max_staleness))
        if a.staleness.kind == "polynomial":
            assert a.staleness.a == 0.5
        if a.staleness.kind == "hinge":
            assert (a.staleness.a, a.staleness.b) == (10, 4)
        # staleness comes from concurrency: about C - 1 on average, so C must stay below the bound
        assert 1 < r.scheduler.concurrency <= a.max_staleness
    assert grid == set(itertools.product(("constant", "polynomial", "hinge"), (0.6, 0.9), (4, 16)))
    assert len(_fedasync(cfg)) == 12

    sgd = [r for r in cfg.runs if r.algorithm.name == "fedasync" and r.algorithm.max_staleness is None]
    assert len(sgd) == 1  # single-thread SGD: one client at a time, its model replaces the server's
    assert sgd[0].scheduler.concurrency == 1
    assert sgd[0].algorithm.alpha == 1.0 and sgd[0].algorithm.staleness.kind == "constant"

    fedavg = [r for r in cfg.runs if r.algorithm.name == "fedavg"]
    assert len(fedavg) == 1 and fedavg[0].scheduler.mode == "sync" and fedavg[0].scheduler.concurrency == 10
    assert len(cfg.runs) == 14


def test_shortened_runs_respect_staleness_bounds_and_learn(tmp_path, torch_threads):
    torch_threads(1)  # tiny models: one intra-op thread avoids oversubscription on a shared machine
    names = ["sgd", "s4-poly-a0.9", "s16-const-a0.9"]
    cfg = config.load(preset=PRESET, overrides=["stop.max_trips=150"])
    run_experiment(cfg, tmp_path, runs=names)
    runs = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    assert set(runs) == set(names)

    assert runs["sgd"]["staleness_histogram"] == {"0": runs["sgd"]["trips"]["completed"]}
    for name, bound in (("s4-poly-a0.9", 4), ("s16-const-a0.9", 16)):
        r = runs[name]
        hist = {int(k): v for k, v in r["staleness_histogram"].items()}
        assert max(hist) <= bound and r["p99_staleness"] <= bound, name
        assert r["mean_staleness"] >= 0.25 * bound, f"{name}: staleness {r['mean_staleness']} barely realised"
    assert runs["s16-const-a0.9"]["mean_staleness"] > 2 * runs["s4-poly-a0.9"]["mean_staleness"]

    # the plotting script reads the output: gradients applied, and accuracy well above the start
    spec = importlib.util.spec_from_file_location("fedasync_plots", PLOTS)
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    loaded = plots.load(tmp_path)
    for name in names:
        run = loaded[name]
        steps = cfg.trainer.local_steps
        trips = runs[name]["trips"]
        assert run["grads"][-1] == (trips["completed"] - trips["discarded"]) * steps
        assert run["acc"][0] < 0.3, "the initial model should be near chance"
        assert runs[name]["final_accuracy"] > run["acc"][0] + 0.4, name
    assert "| s16-const-a0.9 |" in plots.table([loaded], [0.9])
