"""Crash test: while 6 client processes train, the server process is SIGKILLed at random
moments (12 times; 50 in `make test-slow`) and restarted on the same state dir. After each
restart every update a client saw acknowledged is in the update log once; at the end it is in
the version history, versions never went back, no update was counted twice, and training
still reaches the target. Each run leaves a summary of what it checked (crash-summary.json)."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import threading
import time
from contextlib import closing

import httpx
import pytest

from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_fleet, stop_all

CLIENTS, KILLS, K = 6, 12, 4


def experiment(target_stop: bool) -> dict:
    return {
        "name": "crash",
        "seed": 3,
        "target_accuracy": 0.9,
        "data": {"partition": {"kind": "dirichlet", "alpha": 1.0}, "num_clients": CLIENTS},
        "model": {"name": "mlp", "hidden": [64]},
        "trainer": {"lr": 0.05, "batch_size": 16, "local_steps": 10},
        "stop": {"at_target": target_stop},
        "server": {"lease_timeout": 60, "retry_after": 0.1, "eval_every_s": 0.25, "rate_per_s": 500, "rate_burst": 500},
        "runs": [
            {
                "name": "crashy",
                "algorithm": {"name": "fedbuff", "buffer_size": K},
                "scheduler": {"mode": "async", "concurrency": CLIENTS},
            }
        ],
    }


class Watcher(threading.Thread):
    """Polls /status; records every version seen, across restarts."""

    def __init__(self, server: ServerProcess):
        super().__init__(daemon=True)
        self.server, self.seen, self.stop = server, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.seen.append(self.server.status()["version"])
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.02)


def acknowledged(workdir) -> list[dict]:
    """Every answer the clients logged that the server counted (accepted, or discarded as
    stale); a line a client is still writing is not one yet."""
    acks = []
    for i in range(CLIENTS):
        path = workdir / f"c{i}.acks.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                a = json.loads(line)
            except ValueError:
                continue
            if a["http"] == 200 or a.get("error") == "stale":
                acks.append(a | {"client": f"c{i}"})
    return acks


def check_logged_once(state_dir, acks: list[dict]) -> None:
    """Each acknowledged update is in the update log once, with the number and verdict its
    client was told."""
    with closing(sqlite3.connect(state_dir / "state.db")) as db:
        rows = {
            (c, k): (seq, verdict)
            for c, k, seq, verdict in db.execute("SELECT client, idem_key, seq, verdict FROM updates")
        }
    for a in acks:
        assert rows[(a["client"], a["key"])] == (a["seq"], a.get("verdict", "discarded"))
    assert len({(a["client"], a["key"]) for a in acks}) == len(acks) == len({a["seq"] for a in acks})


def kill_and_restart(tmp_path, kills: int, seed: int) -> None:
    """Train 6 client processes against a server SIGKILLed `kills` times at random moments,
        checking after each restart that every update acknowledged so far is logged once and the
        version did not go back; the last restart runs to the target. Writes what it checked to
    crash-summary.json."""
    rng = random.Random(seed)
    server = ServerProcess(experiment(target_stop=False), tmp_path)  # no stopping while we kill it
    tokens = mint_tokens(server.state_dir, "crashy", [f"c{i}" for i in range(CLIENTS)])
    server.start()
    watcher = Watcher(server)
    watcher.start()
    clients = spawn_fleet(server.url, tokens, tmp_path)
    checks = 0
    try:
        deadline = time.monotonic() + 120
        while server.status()["updates"]["buffered"] == 0:  # the clients are training
            assert time.monotonic() < deadline, "clients never started training"
            time.sleep(0.1)
        versions_at_kill = []
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 0.6))
            server.kill()
            versions_at_kill.append(max(watcher.seen))
            acks = acknowledged(tmp_path)
            check_logged_once(server.state_dir, acks)
            checks += len(acks)
            if len(versions_at_kill) == kills:
                server.write_config(experiment(target_stop=True))  # last restart: run to the target
            server.start()
            assert server.status()["version"] >= versions_at_kill[-1]
        for p in clients:
            p.wait(timeout=300)
    finally:
        stop_all(clients)
        watcher.stop.set()
        watcher.join()
    status = server.status()
    server.kill()
    assert [p.returncode for p in clients] == [0] * CLIENTS
    assert status["reached_target"] and status["done"]

    # versions never went back, as seen from outside
    assert watcher.seen == sorted(watcher.seen)
    assert server.starts == kills + 1

    acks = [json.loads(line) for i in range(CLIENTS) for line in open(tmp_path / f"c{i}.acks.jsonl")]
    counted = [a for a in acks if a["http"] == 200 or a.get("error") == "stale"]
    db = sqlite3.connect(server.state_dir / "state.db")
    rows = {
        (c, k): (seq, verdict, applied)
        for c, k, seq, verdict, applied in db.execute(
            "SELECT client, idem_key, seq, verdict, applied_version FROM updates"
        )
    }
    seq_client = {seq: c for (c, _), (seq, _, _) in rows.items()}
    # every acknowledged update is in the log, with the answer the client got
    for i in range(CLIENTS):
        for a in (json.loads(line) for line in open(tmp_path / f"c{i}.acks.jsonl")):
            if a["http"] == 200 or a.get("error") == "stale":
                seq, verdict, applied = rows[(f"c{i}", a["key"])]
                assert seq == a["seq"] and seq_client[seq] == f"c{i}"
                assert verdict == a.get("verdict", "discarded")
    # nothing counted twice: one log row per acknowledged key, K updates per FedBuff version
    assert len({a["key"] for a in counted}) == len(counted) == len({a["seq"] for a in counted})
    history = db.execute("SELECT version, created_at, updates FROM versions ORDER BY version").fetchall()
    final = status["version"]
    assert [v for v, _, _ in history] == list(range(final + 1))
    assert [t for _, t, _ in history] == sorted(t for _, t, _ in history)
    in_versions = [s for _, _, ups in history for s in json.loads(ups)]
    assert len(in_versions) == len(set(in_versions)) == K * final
    assert all(len(json.loads(ups)) == K for v, _, ups in history if v > 0)
    pending = sorted(seq for seq, verdict, applied in rows.values() if verdict != "discarded" and applied is None)
    assert len(pending) == status["buffer"]["fill"] < K
    accepted = sorted(seq for seq, verdict, _ in rows.values() if verdict != "discarded")
    assert sorted(in_versions + pending) == accepted
    for a in counted:
        if a["http"] == 200:  # reflected in the version history (or still in the buffer)
            assert a["seq"] in set(in_versions) | set(pending)
    db.close()
    replays = sum(1 for a in acks if a.get("replayed"))
    retries = sum(
        int(re.search(r"\((\d+) retries\)", (tmp_path / f"c{i}.log").read_text()).group(1)) for i in range(CLIENTS)
    )
    summary = {
        "kills": server.starts - 1,
        "final_version": final,
        "acknowledged": len(counted),
        "acknowledged_checks_after_restarts": checks,
        "replayed": replays,
        "status_polls": len(watcher.seen),
        "client_retries": retries,
    }
    (tmp_path / "crash-summary.json").write_text(json.dumps(summary))
    print(
        f"crash test: {summary['kills']} SIGKILLs, final version {final}, {len(counted)} acknowledged uploads "
        f"(checked {checks} times after restarts), {replays} answered by idempotent replay, "
        f"{len(watcher.seen)} status polls, {retries} client retries"
    )


def check_summary(tmp_path, kills: int) -> None:
    """The summary a run leaves in its directory says how much was checked."""
    summary = json.loads((tmp_path / "crash-summary.json").read_text())
    assert summary["kills"] == kills
    assert summary["acknowledged"] > 0 and summary["final_version"] > 0
    assert summary["acknowledged_checks_after_restarts"] > 0


def test_sigkill_restarts_lose_nothing_and_count_nothing_twice(tmp_path):
    kill_and_restart(tmp_path, KILLS, seed=7)
    check_summary(tmp_path, KILLS)


@pytest.mark.slow
def test_fifty_sigkill_restarts_lose_nothing_and_count_nothing_twice(tmp_path):
    kill_and_restart(tmp_path, 50, seed=8)
    check_summary(tmp_path, 50)
