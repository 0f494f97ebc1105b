"""Task admin against a real PostgreSQL: what `cluster task add` writes and what it refuses."""

import pytest
import torch
from cluster_helpers import FEDASYNC, FEDBUFF, experiment, fetch

from asyncfl.build import build_data, build_flat_model
from asyncfl.cluster.members import session
from asyncfl.cluster.tasks import add_task, create_token, list_tasks
from asyncfl.config import ConfigError
from asyncfl.server.store import hash_token, tensor_load


def test_add_writes_slots_version_zero_and_state(pg_url):
    cfg = experiment(FEDBUFF, FEDASYNC)
    with session(pg_url) as conn:
        assert add_task(conn, cfg, "fedbuff") == "fedbuff"
        assert add_task(conn, cfg, "fedasync", task="other") == "other"
        listed = list_tasks(conn)
    assert [(t["task"], t["run"], t["concurrency"], t["version"], t["leased"]) for t in listed] == [
        ("fedbuff", "fedbuff", 8, 0, 0),
        ("other", "fedasync", 4, 0, 0),
    ]
    assert fetch(pg_url, "SELECT count(*) FROM slots WHERE task = 'fedbuff' AND lease_id IS NULL") == [(8,)]
    (weights,) = fetch(pg_url, "SELECT weights FROM versions WHERE task = 'fedbuff' AND version = 0")[0]
    expected = build_flat_model(cfg, build_data(cfg)).initial_weights()
    assert torch.equal(tensor_load(bytes(weights)), expected)
    (state,) = fetch(pg_url, "SELECT body FROM aggregator_state WHERE task = 'fedbuff' AND version = 0")[0]
    assert tensor_load(bytes(state))["count"] == 0


def test_a_taken_name_is_refused(pg_url):
    cfg = experiment(FEDBUFF)
    with session(pg_url) as conn:
        add_task(conn, cfg)
        with pytest.raises(ConfigError, match="exists already"):
            add_task(conn, cfg)


@pytest.mark.parametrize(
    "run, why",
    [
        ({"name": "sync", "algorithm": {"name": "fedavg"}, "scheduler": {"concurrency": 4}}, "synchronous rounds"),
        (
            {
                "name": "secagg",
                "algorithm": {"name": "fedavg"},
                "scheduler": {"mode": "sync", "concurrency": 4},
                "secure_aggregation": {"protocol": "secagg_plus", "clip_range": 0.5},
            },
            "secure aggregation 'secagg_plus'",
        ),
        ({"name": "kardam", "algorithm": {"name": "fedasync", "filter": {"kind": "kardam"}}}, "LipschitzFilter"),
    ],
)
def test_single_process_only_runs_are_refused(pg_url, run, why):
    with session(pg_url) as conn, pytest.raises(ConfigError, match=f"{why}.*single-process server only"):
        add_task(conn, experiment(run))
    assert fetch(pg_url, "SELECT count(*) FROM tasks") == [(0,)]


def test_a_noisy_run_without_a_sample_rate_is_refused_as_the_single_process_refuses_it(pg_url):
    run = {
        "name": "dp",
        "algorithm": {"name": "fedbuff", "buffer_size": 4},
        "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0},
    }
    with session(pg_url) as conn, pytest.raises(ConfigError, match="privacy.sample_rate is required"):
        add_task(conn, experiment(run))
    assert fetch(pg_url, "SELECT count(*) FROM tasks") == [(0,)]


def test_tokens_are_stored_hashed_as_the_single_process_stores_them(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
        token = create_token(conn, "alice", "fedbuff")
        with pytest.raises(ConfigError, match="no task 'nope'"):
            create_token(conn, "bob", "nope")
    assert token.startswith("afl_")
    assert fetch(pg_url, "SELECT hash, client, task, role FROM tokens") == [
        (hash_token(token), "alice", "fedbuff", "client")
    ]


def test_cli_adds_lists_and_mints(pg_url, tmp_path, capsys):
    import yaml

    from asyncfl.cli import main

    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(experiment(FEDBUFF, FEDASYNC).model_dump(mode="json")))
    assert main(["cluster", "task", "add", "--database-url", pg_url, "--config", str(path), "--run", "fedasync"]) == 0
    assert main(["cluster", "task", "list", "--database-url", pg_url]) == 0
    args = ["token", "create", "--database-url", pg_url, "--task", "fedasync", "--client", "c1"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "task 'fedasync' added (run 'fedasync')"
    assert out[2].split("\t") == ["fedasync", "fedasync", "running", "0", "0/4", "- (0)", "-"]
    assert fetch(pg_url, "SELECT hash, client FROM tokens") == [(hash_token(out[3]), "c1")]
    sync = ["--set", "runs.fedbuff.scheduler.mode=sync", "--task", "t2"]
    assert main(["cluster", "task", "add", "--database-url", pg_url, "--config", str(path), *sync]) == 2
    assert "synchronous rounds" in capsys.readouterr().err
    assert main(["cluster", "task", "finish", "--database-url", pg_url, "--task", "fedasync"]) == 0
    assert fetch(pg_url, "SELECT state FROM tasks") == [("done",)]
    assert main(["cluster", "task", "finish", "--database-url", pg_url, "--task", "nope"]) == 2
