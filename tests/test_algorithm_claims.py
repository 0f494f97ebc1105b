"""The algorithm zoo's claims on small runs: robust rules resist attackers, Per-FedAvg
personalises, q-FedAvg evens out per-device accuracy, and every algorithm trains in the modes
the README lists."""

import numpy as np
import pytest

from asyncfl import config
from asyncfl.build import build_data
from asyncfl.experiment import run_one


def sync_run(name, **algorithm):
    return {
        "name": name,
        "algorithm": {"name": algorithm.pop("kind", name), **algorithm},
        "scheduler": {"concurrency": 10},
    }


def test_robust_aggregation_keeps_accuracy_under_attack(small):
    runs = [
        sync_run("mean", kind="fedavg"),
        sync_run("median", kind="fedavg", aggregation="median"),
        sync_run("trimmed", kind="fedavg", aggregation="trimmed_mean", trim_fraction=0.25),
    ]
    sets = ["data.partition.kind=iid", "stop.max_time=300", "population.attack.factor=4"]
    clean = small(runs=runs, executor="batched", sets=sets)
    attacked = small(runs=runs, executor="batched", sets=sets + ["population.attack.fraction=0.2"])
    data = build_data(clean)
    acc = {
        (spec.name, cfg is attacked): run_one(cfg, spec, data).rows[-1]["test_accuracy"]
        for cfg in (clean, attacked)
        for spec in cfg.runs
    }
    assert acc["mean", False] > 0.75
    assert acc["mean", True] < acc["mean", False] - 0.2  # 20% sign-flipping clients wreck the plain mean
    for rule in ("median", "trimmed"):
        assert acc[rule, True] > acc[rule, False] - 0.08  # the robust rules barely notice them
        assert acc[rule, True] > acc["mean", True] + 0.2


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_per_fedavg_personalised_accuracy_beats_the_global_model(small, variant):
    runs = [sync_run("per", kind="perfedavg", variant=variant, meta_lr=0.05)]
    cfg = small(
        runs=runs,
        executor="batched",
        sets=[
            "data.client_test_fraction=0.3",
            "data.partition.kind=shards",
            "data.partition.classes_per_client=2",
            "stop.max_time=300",
            "data.num_clients=40",
        ],
    )
    m = run_one(cfg, cfg.runs[0])
    glob, pers = m.extra["client_accuracy"], m.extra["personalized_accuracy"]
    assert pers["clients"] == glob["clients"] == 40
    assert pers["mean"] > glob["mean"] + 0.15  # two classes per client: one local step adapts a lot


@pytest.mark.parametrize(
    "run",
    [
        sync_run("fedavg"),
        sync_run("fedprox", mu=0.01),
        sync_run("qfedavg", q=1.0),
        {
            "name": "qfedavg-async",
            "algorithm": {"name": "qfedavg", "q": 1.0, "buffer_size": 5},
            "scheduler": {"concurrency": 10},
        },
        {
            "name": "fedbuff-adam",
            "algorithm": {"name": "fedbuff", "buffer_size": 5, "server_opt": {"name": "adam", "lr": 0.01}},
        },
        {"name": "fedavg-yogi", "algorithm": {"name": "fedavg", "server_opt": {"name": "yogi", "lr": 0.01}}},
        {"name": "fedavg-adagrad", "algorithm": {"name": "fedavg", "server_opt": {"name": "adagrad", "lr": 0.05}}},
    ],
)
def test_every_algorithm_learns(small, run):
    cfg = small(runs=[run], executor="batched", sets=["stop.max_time=300"])
    m = run_one(cfg, cfg.runs[0])
    assert m.rows[0]["test_accuracy"] < 0.3
    assert m.rows[-1]["test_accuracy"] > 0.6, run["name"]


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_per_fedavg_global_model_learns_too(small, variant):
    """Its steps cost two (FO) or four (HF) gradients, so it gets more virtual time."""
    cfg = small(
        runs=[sync_run("per", kind="perfedavg", variant=variant, meta_lr=0.02)],
        executor="batched",
        sets=["stop.max_time=1200"],
    )
    m = run_one(cfg, cfg.runs[0])
    assert m.rows[0]["test_accuracy"] < 0.3
    assert m.rows[-1]["test_accuracy"] > 0.6, variant


def test_qfedavg_q1_evens_out_per_device_accuracy():
    """The qfedavg-fairness preset on three seeds: q = 1 lowers the std and raises the 10th
    percentile of per-device test accuracy against q = 0, averaged over the seeds, without
    giving up mean accuracy (q-FFL's claim, Li et al. 2020, Table 1)."""
    spread = {"q0": [], "q1": []}
    for seed in (0, 1, 2):
        cfg = config.load(preset="qfedavg-fairness", seed=seed)
        data = build_data(cfg)
        for spec in cfg.runs:
            spread[spec.name].append(run_one(cfg, spec, data).extra["client_accuracy"])
    mean = {q: {k: np.mean([s[k] for s in runs]) for k in ("mean", "std", "p10")} for q, runs in spread.items()}
    assert mean["q1"]["std"] < mean["q0"]["std"] - 0.005, mean
    assert mean["q1"]["p10"] > mean["q0"]["p10"] + 0.01, mean
    assert mean["q1"]["mean"] > mean["q0"]["mean"] - 0.01, mean
