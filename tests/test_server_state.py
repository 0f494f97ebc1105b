"""The server's durable state: the policy persists through its own state_dict and timers, and a
state dir in an older layout is refused with a message, not a crash."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest
from test_server_inputs import Harness, experiment

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


def modes_under(root) -> dict[str, int]:
    """Permission bits of every file and directory under root, by relative path."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.fixture
def open_umask():
    """The most permissive umask: every mode below is the one the server asked for."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_state_files_are_private_to_the_server_user(tmp_path, open_umask):
    with Harness(tmp_path, eval_every_s=0.01) as h:
        for c in "abcd":  # K = 3: one step, a buffered update, a model version file
            assert h.upload(c, h.frame(h.checkin(c))).status_code == 200
        h.server.tick()  # an evaluation and model.afl
        found = modes_under(h.server.store.dir)
    assert {"state.db", "state.db-wal", "state.db-shm", "model.afl", "tensors", "tensors/slot-a.bin"} <= set(found)
    assert any(name.startswith("tensors/model-") for name in found)
    dirs = {".", "tensors"}
    assert {name: mode for name, mode in found.items() if name in dirs} == dict.fromkeys(dirs, 0o700)
    assert {name: mode for name, mode in found.items() if name not in dirs} == {
        name: 0o600 for name in found if name not in dirs
    }


def test_an_older_world_readable_state_dir_is_made_private_when_opened(tmp_path, open_umask):
    cfg, settings = sync_experiment(), ServerConfig()
    state = tmp_path / "state"
    FLServer(cfg, settings, state).close()
    assert len(modes_under(state)) > 3
    for path in [state, *state.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    FLServer(cfg, settings, state).close()
    assert modes_under(state) == {name: 0o700 if (state / name).is_dir() else 0o600 for name in modes_under(state)}
