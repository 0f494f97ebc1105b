"""Crash test: while 6 client processes train, the server process is SIGKILLed at random
moments (12 times) and restarted on the same state dir. Afterwards every update a client saw
acknowledged is in the update log and in the version history, versions never went back, no
update was counted twice, and training still reaches the target."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import threading
import time

import httpx

from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_client, stop_all

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

    def __init__(self, url, headers):
        super().__init__(daemon=True)
        self.url, self.headers, self.seen, self.stop = url, headers, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.seen.append(httpx.get(self.url + "/status", headers=self.headers, timeout=1).json()["version"])
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.02)


def test_sigkill_restarts_lose_nothing_and_count_nothing_twice(tmp_path):
    rng = random.Random(7)
    server = ServerProcess(experiment(target_stop=False), tmp_path)  # no stopping while we kill it
    tokens = mint_tokens(server.state_dir, "crashy", [f"c{i}" for i in range(CLIENTS)])
    server.start()
    watcher = Watcher(server.url, server.operator)
    watcher.start()
    clients = [spawn_client(server.url, tok, f"digits:client={i}", tmp_path, f"c{i}") for i, tok in enumerate(tokens)]
    try:
        deadline = time.monotonic() + 120
        while server.status()["updates"]["buffered"] == 0:  # the clients are training
            assert time.monotonic() < deadline, "clients never started training"
            time.sleep(0.1)
        versions_at_kill = []
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.6))
            server.kill()
            versions_at_kill.append(max(watcher.seen))
            if len(versions_at_kill) == KILLS:
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
    assert server.starts == KILLS + 1

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
    print(
        f"crash test: {KILLS} SIGKILLs, final version {final}, {len(counted)} acknowledged uploads, "
        f"{replays} answered by idempotent replay, {len(watcher.seen)} status polls, {retries} client retries"
    )
