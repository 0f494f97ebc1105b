"""The papaya preset end to end: its --quick variant through the command line, and
determinism of a tiny study whatever the number of worker processes."""

import csv
import json
import math

import pytest

from asyncfl import config
from asyncfl.cli import main
from asyncfl.study import run_study

ENTRY_FIELDS = {
    "name",
    "algorithm",
    "mode",
    "concurrency",
    "final_accuracy",
    "time_to_target",
    "trips_to_target",
    "bytes_to_target",
    "server_steps",
    "wall_seconds",
    "seed",
    "mean_staleness",
    "p99_staleness",
    "trips",
    "staleness_histogram",
    "method",
    "params",
    "reached_target",
    "steps_per_hour",
}


def test_full_preset_is_the_study_the_issue_asks_for():
    cfg = config.load(preset="papaya")
    st = cfg.study
    assert cfg.population.devices == 1_000_000 and cfg.data.dataset == "synthetic" and cfg.model.name == "logreg"
    assert cfg.population.dropout == 0.1 and cfg.population.compute_per_example.kind == "pareto"
    assert cfg.population.availability.on_fraction < 1
    assert st.concurrency == [100, 1000, 10000] and st.seeds == [0, 1, 2] and st.round_timeout_percentile == 95
    runs = {r.name: r for r in cfg.runs}
    assert runs["fedavg"].scheduler.mode == "sync" and runs["fedavg"].scheduler.over_selection == 0.3
    assert runs["fedavg"].algorithm.server_opt.momentum == 0
    fb = runs["fedbuff"].algorithm
    assert runs["fedbuff"].scheduler.mode == "async" and fb.staleness.kind == "inverse_sqrt"
    assert fb.server_opt.name == "sgd" and fb.server_opt.momentum > 0
    assert runs["fedasync"].algorithm.staleness.kind == "hinge" and runs["fedavgm"].algorithm.server_opt.momentum > 0
    methods = {m.name: m for m in st.methods}
    assert methods["fedavgm"].concurrency == methods["fedasync"].concurrency == [1000]
    # the same search budget for every method: 6 grid points at every concurrency
    for m in st.methods:
        for c in st.method_concurrency(m):
            assert math.prod(len(v) for v in m.grid_for(c).values()) == 6, (m.name, c)
    pairs = {(r.baseline, r.method) for r in st.ratios}
    assert pairs == {("fedavg", "fedbuff"), ("fedavgm", "fedbuff"), ("fedasync", "fedbuff")}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("papaya-quick")
    assert main(["compare", "--preset", "papaya", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_quick_reaches_the_target_and_reports_ratios(quick):
    out, s = quick
    assert s["preset"] == "papaya" and s["target_accuracy"] == 0.55 and s["seed"] == 0
    keys = {(r["method"], r["concurrency"], r["seed"]) for r in s["runs"]}
    expected = {
        (m, c, seed)
        for m, cs in (("fedavg", (30, 300)), ("fedbuff", (30, 300)), ("fedavgm", (300,)), ("fedasync", (300,)))
        for c in cs
        for seed in (0, 1)
    }
    assert keys == expected and len(s["runs"]) == len(expected)
    for r in s["runs"]:
        assert ENTRY_FIELDS <= set(r), r["name"]
        assert r["reached_target"] and r["final_accuracy"] >= 0.55, r["name"]
        assert r["time_to_target"] > 0 and r["trips_to_target"] > 0 and r["bytes_to_target"] > 0
        if r["mode"] == "sync":
            # every trip counts, over-selected and cancelled ones included: ceil(1.3 C) per round
            assert r["trips_to_target"] == r["server_steps"] * math.ceil(1.3 * r["concurrency"]), r["name"]
            assert r["trips"]["cancelled"] > 0 and r["round_timeout"] > 0
            assert r["mean_staleness"] == 0
        else:
            assert r["round_timeout"] is None and r["mean_staleness"] > 0 and r["p99_staleness"] >= r["mean_staleness"]
    blocks = {(b["baseline"], b["method"], b["concurrency"]): b for b in s["ratios"]}
    assert set(blocks) == {
        ("fedavg", "fedbuff", 30),
        ("fedavg", "fedbuff", 300),
        ("fedavgm", "fedbuff", 300),
        ("fedasync", "fedbuff", 300),
    }
    for b in blocks.values():
        assert b["seeds_both_reached"] == 2
        for k in ("time", "trips", "bytes"):
            assert b[k]["n"] == 2 and b[k]["min"] <= b[k]["mean"] <= b[k]["max"] and b[k]["std"] >= 0
    # the honest outcome at this scale: FedBuff reaches the target sooner and with fewer trips
    b = blocks[("fedavg", "fedbuff", 300)]
    assert b["time"]["min"] > 1 and b["trips"]["min"] > 1
    by = {(r["method"], r["concurrency"], r["seed"]): r for r in s["runs"]}
    r = by[("fedavg", 300, 1)]
    assert b["per_seed"][1]["time"] == pytest.approx(r["time_to_target"] / by[("fedbuff", 300, 1)]["time_to_target"])


def test_quick_reports_every_grid_point_and_the_choice(quick):
    out, s = quick
    assert len(s["grid"]) == 10
    for method, c in {(g["method"], g["concurrency"]) for g in s["grid"]}:
        points = [g for g in s["grid"] if (g["method"], g["concurrency"]) == (method, c)]
        (chosen,) = [g for g in points if g["chosen"]]
        reached = [g["time_to_target"] for g in points if g["time_to_target"] is not None]
        assert chosen["time_to_target"] == min(reached)
        run = next(r for r in s["runs"] if (r["method"], r["concurrency"], r["seed"]) == (method, c, 0))
        assert run["params"] == chosen["params"] and run["time_to_target"] == chosen["time_to_target"]
        best = None
        for g in sorted(points, key=lambda g: g["grid_index"]):  # capped at 1.01 x the best time before it
            assert g["grid_cap"] == (None if best is None else pytest.approx(1.01 * best))
            assert g["virtual_time"] <= (g["grid_cap"] or math.inf) + 1e-6
            if g["time_to_target"] is not None:
                best = min(best or math.inf, g["time_to_target"])
    assert {c["method"] for c in s["chosen"]} == {"fedavg", "fedbuff", "fedavgm", "fedasync"}
    assert s["study"]["methods"]["fedbuff"]["grid"]["30"] == {
        "runs.fedbuff.algorithm.buffer_size": [3],
        "runs.fedbuff.algorithm.server_opt.lr": [0.3, 1.0],
    }
    assert s["study"]["peak_rss_mb"]["main"] > 0 and s["study"]["wall_seconds"] > 0
    assert all(0 < e["peak_rss_mb"] <= s["study"]["peak_rss_mb"]["main"] for e in s["runs"] + s["grid"])
    assert s["data"]["clients"] == 100_000 and 0.5 < s["data"]["common_model_accuracy"] < 0.8


def test_quick_writes_tables_curves_and_plots(quick):
    out, s = quick
    for name in (
        "summary.json",
        "study.md",
        "config.yaml",
        "accuracy_vs_time.png",
        "accuracy_vs_trips.png",
        "steps_per_hour.png",
        "to_target.png",
        "client_sizes.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for r in s["runs"]:
        rows = list(csv.DictReader(open(out / r["name"] / "metrics.csv")))
        hit = next(row for row in rows if float(row["test_accuracy"]) >= 0.55)
        assert float(hit["virtual_time"]) == r["time_to_target"] and int(hit["trips_started"]) == r["trips_to_target"]
    for g in s["grid"]:
        assert (out / "grid" / g["name"] / "metrics.csv").exists()
    from asyncfl.report.study import replot

    before = (out / "to_target.png").stat().st_mtime_ns
    replot(out)  # the plots can be redrawn from what the study wrote
    assert (out / "to_target.png").stat().st_mtime_ns >= before
    md = (out / "study.md").read_text()
    assert "| 300 | fedavg / fedbuff |" in md and "**chosen**" in md
    assert config.validate(__import__("yaml").safe_load((out / "config.yaml").read_text())).study.seeds == [0, 1]


def _tiny(workers: int) -> config.ExperimentConfig:
    tree = config.preset_dict("papaya")
    config.apply_quick(tree, True)
    for s in (
        "population.devices=3000",
        "study.concurrency=[20]",
        "study.at_concurrency={}",
        "study.methods.fedavgm.concurrency=[20]",
        "study.methods.fedasync.concurrency=[20]",
        "stop.max_trips=6000",
        "target_accuracy=0.45",
        "data.synthetic.test_size=2000",
        f"study.workers={workers}",
        "study.ratios=[{baseline: fedavg, method: fedbuff}]",
    ):
        config.apply_override(tree, s)
    return config.validate(tree)


def _strip(s: dict) -> dict:
    s = json.loads(json.dumps(s))
    s["study"].pop("wall_seconds"), s["study"].pop("peak_rss_mb"), s["study"].pop("workers"), s["study"].pop("threads")
    for e in s["runs"] + s["grid"]:
        e.pop("wall_seconds"), e.pop("peak_rss_mb")  # measured, not computed
    return s


def test_a_study_is_deterministic_for_its_seeds_and_any_worker_count(tmp_path):
    a = run_study(_tiny(1), tmp_path / "a")
    b = run_study(_tiny(2), tmp_path / "b")
    assert _strip(a) == _strip(b)
    assert len(a["runs"]) == 8 and len(a["grid"]) == 6
    rows = lambda d: [{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(open(d))]  # noqa: E731
    assert rows(tmp_path / "a" / "fedbuff-C20-s1" / "metrics.csv") == rows(
        tmp_path / "b" / "fedbuff-C20-s1" / "metrics.csv"
    )
