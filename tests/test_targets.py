"""Metrics beyond accuracy: eval.metrics (perplexity, user functions) in rows, metrics.csv,
summary and table, and a target on any reported metric."""

import csv
import json
import math

import pytest
from conftest import small_config

import asyncfl
from asyncfl import config
from asyncfl.experiment import run_experiment
from asyncfl.report.table import summary_table
from asyncfl.sim.metrics import Metrics, Target


def top2(logits, y):
    """Top-2 accuracy: a user metric returning a dict."""
    return {"top2_accuracy": float((logits.topk(2, 1).indices == y[:, None]).any(1).float().mean())}


def test_target_rows_are_checked_by_metric_and_mode():
    m = Metrics()
    for t, loss in enumerate([2.0, 1.2, 0.9, 1.1]):
        m.record(float(t), t, 0.1 * t, loss, 0.0)
        m.rows[-1]["perplexity"] = math.exp(loss)
    target = Target("perplexity", "min", math.exp(1.0))
    assert m.first_at(target)["virtual_time"] == 2.0
    s = m.summary(target)
    assert s["time_to_target"] == 2.0 and s["final_perplexity"] == pytest.approx(math.exp(1.1))
    assert s["best_perplexity"] == pytest.approx(math.exp(0.9))
    assert m.first_at(0.15)["virtual_time"] == 2.0  # a float is still a target accuracy
    assert Target("test_loss", "min", 0.5).reached({"test_loss": float("nan")}) is False


def test_perplexity_target_and_a_user_metric_reach_csv_summary_and_table(tmp_path):
    cfg = small_config(
        sets=["eval.metrics=[perplexity, test_targets:top2]", "target={metric: perplexity, mode: min, value: 2.0}"]
    )
    summary = run_experiment(cfg, tmp_path, threads=1)
    assert summary["target"] == {"metric": "perplexity", "mode": "min", "value": 2.0}
    for run in summary["runs"]:
        rows = list(csv.DictReader(open(tmp_path / run["name"] / "metrics.csv")))
        assert {"perplexity", "top2_accuracy"} <= set(rows[0])
        for r in rows:
            assert float(r["perplexity"]) == pytest.approx(math.exp(float(r["test_loss"])))
            assert float(r["test_accuracy"]) <= float(r["top2_accuracy"]) <= 1.0
        hit = next((r for r in rows if float(r["perplexity"]) <= 2.0), None)
        assert run["time_to_target"] == (pytest.approx(float(hit["virtual_time"])) if hit else None)
        assert run["final_perplexity"] == pytest.approx(float(rows[-1]["perplexity"]))
    assert any(run["time_to_target"] is not None for run in summary["runs"])
    table = summary_table(summary)
    assert "perplexity ≤ 2" in table.title and "final perplexity" in [c.header for c in table.columns]
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["best_perplexity"] > 0


def test_api_metric_functions_are_named_by_module_path(tmp_path):
    cfg = small_config(sets=["stop.max_time=40"])
    result = asyncfl.simulate(cfg, metrics=[top2], out=tmp_path)
    rows = result.metrics if isinstance(result.metrics, list) else result.metrics.to_dict("records")
    assert all(r["test_accuracy"] <= r["top2_accuracy"] for r in rows)
    assert "test_targets:top2" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(config.ConfigError, match="module level"):
        asyncfl.simulate(cfg, metrics=[lambda logits, y: 0.0])


def test_targets_must_name_a_reported_metric():
    with pytest.raises(config.ConfigError, match="needs it in eval.metrics"):
        small_config(sets=["target={metric: perplexity, mode: min, value: 2}"])
    with pytest.raises(config.ConfigError, match="is not reported"):
        small_config(sets=["target={metric: auc, value: 0.8}"])
    cfg = small_config(sets=["target={metric: test_loss, mode: min, value: 0.5}"])
    assert Target.of_config(cfg) == Target("test_loss", "min", 0.5)
    assert Target.of_config(small_config()) == Target("test_accuracy", "max", 0.8)
