"""Real attacking client processes against a real server with default settings: 2 of 10 clients
send -10x their update (`asyncfl client --attack sign_flip`). The default norm guard refuses
them, and the honest clients still take FedBuff to 0.90 test accuracy."""

from __future__ import annotations

import json
import time

from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_fleet, stop_all, wait_all
from tests.test_server_e2e import experiment

CLIENTS, ATTACKERS = 10, 2


def test_sign_flipping_client_processes_are_refused_by_the_default_guard(tmp_path):
    exp = experiment(
        {
            "name": "fedbuff",
            "algorithm": {"name": "fedbuff", "buffer_size": 4},
            "scheduler": {"mode": "async", "concurrency": CLIENTS},
        }
    )
    exp["data"]["num_clients"] = CLIENTS
    # the defences (norm guard, reported-value bounds) at their defaults: no absolute norm bound
    del exp["server"]["max_update_norm"]
    server = ServerProcess(exp, tmp_path)
    tokens = mint_tokens(server.state_dir, "fedbuff", [f"c{i}" for i in range(CLIENTS)])
    server.start()
    t0 = time.time()
    attack = ("--attack", "sign_flip", "--attack-factor", "10")
    clients = spawn_fleet(server.url, tokens, tmp_path, lambda i: attack if i < ATTACKERS else ())
    try:
        wait_all(clients, t0 + 400)
    finally:
        stop_all(clients)
    try:
        status = server.status()
        assert status["reached_target"] and max(e["accuracy"] for e in server.history()) >= 0.9
        acks = [[json.loads(line) for line in open(tmp_path / f"c{i}.acks.jsonl")] for i in range(CLIENTS)]
        malicious = [a for i in range(ATTACKERS) for a in acks[i]]
        honest = [a for i in range(ATTACKERS, CLIENTS) for a in acks[i]]
        refused = [a for a in malicious if a["http"] == 422 and a["error"] == "norm_rejected"]
        # the attackers start first (spawned first), so some of their first uploads may slip in
        # while the guard has seen mostly theirs; once honest norms fill its window, none does
        slipped = [a["seq"] for a in malicious if a["http"] == 200]
        assert len(malicious) >= 10 and len(refused) + len(slipped) == len(malicious)
        last = max(a["seq"] for a in malicious + honest)
        late = [a for a in malicious if a["seq"] > last / 2]
        assert late and all(a["http"] == 422 for a in late), slipped
        assert len(slipped) <= len(malicious) / 3, slipped
        assert sum(a["http"] == 200 for a in honest) >= 0.95 * len(honest)
        assert status["norm_guard"]["rejected"] >= len(refused)
        assert not any(a["http"] >= 500 for a in malicious + honest)
        print(
            f"byzantine e2e: target in {time.time() - t0:.1f} s, {len(refused)}/{len(malicious)} attacker "
            f"uploads refused, {len(honest)} honest uploads"
        )
    finally:
        server.kill()
