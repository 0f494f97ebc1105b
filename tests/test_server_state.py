"""The server's durable state: the policy persists through its own state_dict and timers, and a
state dir in an older layout is refused with a message, not a crash."""

from __future__ import annotations

import sqlite3

import pytest
from test_server_inputs import experiment

from asyncfl import config
from asyncfl.algorithms.seeds import trip_seed
from asyncfl.server.service import FLServer
from asyncfl.server.settings import ServerConfig


def sync_experiment() -> config.ExperimentConfig:
    scheduler = {"mode": "sync", "concurrency": 3, "round_timeout": 600, "straggler": "partial"}
    return experiment({"name": "fedavg"}, scheduler, seed=5)


def test_a_restart_keeps_the_round_its_deadline_and_the_lease_seeds(tmp_path):
    cfg, settings = sync_experiment(), ServerConfig()
    server = FLServer(cfg, settings, tmp_path / "state")
    leases = [server.checkin(c) for c in "abc"]
    assert [a["seed"] for a in leases] == trip_seed(5, [0, 1, 2]).tolist()
    assert 599 < leases[0]["round_deadline_in"] <= 600
    before = server.status()
    assert before["round"] == {"number": 1, "open": True, "arrived": 0}
    assert before["buffer"] == {"fill": 0, "size": None} and before["privacy"] is None
    server.close()

    again = FLServer(cfg, settings, tmp_path / "state")
    assert again.status()["round"] == before["round"]
    assert 598 < again.coordinator.round_deadline() <= 600
    held = again.checkin("a")  # the same lease, with its seed
    assert (held["lease_id"], held["seed"]) == (leases[0]["lease_id"], leases[0]["seed"])
    again.close()


def test_a_state_dir_of_the_previous_format_is_refused_clearly(tmp_path):
    cfg, settings = sync_experiment(), ServerConfig()
    FLServer(cfg, settings, tmp_path / "state").close()
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:  # what servers before state_format wrote
        db.execute("DELETE FROM meta WHERE key='state_format'")
    with pytest.raises(config.ConfigError, match="state format 1.*format 2.*fresh --state-dir"):
        FLServer(cfg, settings, tmp_path / "state")
