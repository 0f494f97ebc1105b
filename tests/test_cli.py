import csv
import json

from asyncfl.cli import main

CONTRACT = {
    "name": str,
    "algorithm": str,
    "mode": str,
    "concurrency": int,
    "final_accuracy": float,
    "server_steps": int,
    "wall_seconds": float,
    "seed": int,
}


def test_simulate_writes_the_output_contract(tmp_path, capsys, torch_threads):
    out = tmp_path / "run"
    rc = main(
        [
            "simulate",
            "--preset",
            "quickstart",
            "--run",
            "fedbuff",
            "--seed",
            "5",
            "--threads",
            "1",
            "--set",
            "stop.max_time=120",
            "--set",
            "population.devices=60",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "quickstart" and summary["target_accuracy"] == 0.9 and summary["torch_threads"] == 1
    (run,) = summary["runs"]
    for field, kind in CONTRACT.items():
        assert isinstance(run[field], kind), field
    assert run["mode"] == "async" and run["seed"] == 5 and run["algorithm"] == "fedbuff"
    for field in ("time_to_target", "trips_to_target", "bytes_to_target"):
        assert field in run
    rows = list(csv.DictReader(open(out / "fedbuff" / "metrics.csv")))
    assert float(rows[-1]["virtual_time"]) == 120 and int(rows[-1]["version"]) == run["server_steps"]
    resolved = (out / "config.yaml").read_text()
    assert "devices: 60" in resolved and "seed: 5" in resolved
    for png in ("accuracy_vs_time.png", "accuracy_vs_trips.png", "staleness.png", "client_sizes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    sizes = summary["data"]  # the imbalance report: quickstart's Dirichlet partition of digits
    assert sizes["clients"] == 60 and sizes["min"] >= 1 and sizes["max"] > sizes["median"] and 0 < sizes["gini"] < 1
    assert "fedbuff" in capsys.readouterr().out


def test_bad_config_exits_2_with_the_field_named(tmp_path, capsys):
    rc = main(
        ["compare", "--preset", "quickstart", "--set", "runs.fedavg.scheduler.concurrency=-1", "--out", str(tmp_path)]
    )
    assert rc == 2
    err = capsys.readouterr().out
    assert "runs.0.scheduler.concurrency" in err
    assert not (tmp_path / "summary.json").exists()


def test_threads_below_one_are_refused(tmp_path, capsys, torch_threads):
    assert main(["compare", "--preset", "quickstart", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()


def test_unknown_run_is_reported(tmp_path, capsys):
    assert main(["simulate", "--preset", "quickstart", "--run", "nope", "--out", str(tmp_path)]) == 2
    assert "run 'nope' not in this config" in capsys.readouterr().out


def test_impossible_partition_is_a_config_error(tmp_path, capsys):
    rc = main(
        [
            "simulate",
            "--preset",
            "quickstart",
            "--set",
            "data.partition.kind=shards",
            "--set",
            "data.partition.classes_per_client=50",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "data.partition: shards: 5000 shards need at least as many examples" in capsys.readouterr().out
