"""Crash test with secure aggregation: while 6 client processes train FedBuff with masked uploads,
the server process or the TSA process (at random) is SIGKILLed at random moments and restarted
on its state dir (8 times; 30 in `make test-slow`). After each restart every acknowledged upload
is in the update log once; at the end every acknowledged upload is in exactly one step or still
buffered, the TSA used each contribution in exactly one step (never a seed twice) and only
seeds it had verified for those uploads, and training still reaches the target."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from contextlib import closing

import pytest
from test_server_crash import CLIENTS, K, Watcher, acknowledged, check_logged_once
from test_server_crash import experiment as plain_experiment

from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_fleet, stop_all
from asyncfl.tsa.testing import TsaProcess


def experiment(target_stop: bool, tsa: TsaProcess | None = None) -> dict:
    """test_server_crash's run with its uploads masked for a TSA."""
    tree = plain_experiment(target_stop)
    tree["server"] |= tsa.server_settings() if tsa is not None else {}
    tree["runs"][0]["secure_aggregation"] = {"protocol": "tsa", "clip_range": 1.0}
    return tree


def kill_and_restart(tmp_path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    server = ServerProcess(experiment(False), tmp_path)
    tsa = TsaProcess(tmp_path, "crashy", server.config_path)
    server.write_config(experiment(False, tsa))
    tokens = mint_tokens(server.state_dir, "crashy", [f"c{i}" for i in range(CLIENTS)])
    tsa.start()
    server.start()
    watcher = Watcher(server)
    watcher.start()
    extra = ("--tsa-key", tsa.public_key)
    clients = spawn_fleet(server.url, tokens, tmp_path, lambda i: extra)
    killed, stops = {"server": 0, "tsa": 0}, False
    try:
        deadline = time.monotonic() + 120
        while server.status()["version"] == 0:  # the clients are training and the TSA answering
            assert time.monotonic() < deadline, "no step within 120 s"
            time.sleep(0.1)
        for n in range(kills):
            time.sleep(rng.uniform(0.05, 0.6))
            victim = rng.choice(["server", "tsa"])
            killed[victim] += 1
            if victim == "tsa":
                tsa.kill()
                time.sleep(rng.uniform(0.0, 0.5))  # the server keeps taking uploads meanwhile
                tsa.start()
                continue
            before = max(watcher.seen)
            server.kill()
            check_logged_once(server.state_dir, acknowledged(tmp_path))
            if n == kills - 1:
                server.write_config(experiment(True, tsa))  # last restart: run to the target
                stops = True
            server.start()
            assert server.status()["version"] >= before
        if not stops:  # the last kill hit the TSA: the server still has to learn to stop
            server.kill()
            server.write_config(experiment(True, tsa))
            server.start()
        for p in clients:
            p.wait(timeout=300)
        deadline = time.monotonic() + 60
        while (status := server.status())["secure_aggregation"]["waiting_buffers"] and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop_all(clients)
        watcher.stop.set()
        watcher.join()
        server.kill()
        tsa.kill()
    assert [p.returncode for p in clients] == [0] * CLIENTS
    assert status["reached_target"] and status["done"], status
    assert status["secure_aggregation"]["waiting_buffers"] == 0 and watcher.seen == sorted(watcher.seen)

    acks = acknowledged(tmp_path)
    check_logged_once(server.state_dir, acks)
    with closing(sqlite3.connect(server.state_dir / "state.db")) as db:
        accepted = dict(db.execute("SELECT lease_id, seq FROM updates WHERE verdict IN ('buffered', 'stepped')"))
    with closing(sqlite3.connect(tsa.state_dir / "used.db")) as db:
        used_by = db.execute("SELECT key, step_id FROM used").fetchall()
        reserved = dict(db.execute("SELECT seed, update_id FROM reserved"))
        steps = db.execute("SELECT count(*) FROM steps").fetchone()[0]
    used = [key for key, _ in used_by]
    # the server folded vetted uploads only: each step's seeds were reserved to that step's ids
    for step in {step for _, step in used_by}:
        ids = {k.removeprefix("id:") for k, s in used_by if s == step and k.startswith("id:")}
        assert {reserved.get(k) for k, s in used_by if s == step and k.startswith("seed:")} == ids
    used_ids = [k.removeprefix("id:") for k in used if k.startswith("id:")]
    final = status["version"]
    # each step unmasked K fresh contributions, each an acknowledged upload, none used twice
    assert steps == final and len(used_ids) == len(set(used_ids)) == K * final
    assert len([k for k in used if k.startswith("seed:")]) == K * final
    assert set(used_ids) <= set(accepted)
    # every acknowledged upload is in exactly one step or in the open buffer
    assert len(accepted) == K * final + status["buffer"]["fill"]
    summary = {"kills": killed, "final_version": final, "acknowledged": len(acks), "tsa_steps": steps}
    (tmp_path / "crash-summary.json").write_text(json.dumps(summary))
    print(f"tsa crash test: {summary}")


def test_sigkill_of_server_or_tsa_loses_nothing_and_uses_no_seed_twice(tmp_path):
    kill_and_restart(tmp_path, 8, seed=11)


@pytest.mark.slow
def test_thirty_sigkills_of_server_or_tsa_lose_nothing_and_use_no_seed_twice(tmp_path):
    kill_and_restart(tmp_path, 30, seed=12)
