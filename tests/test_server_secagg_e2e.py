"""End to end on loopback: a real `asyncfl serve` and 8 `asyncfl client` processes run the same
sync FedAvg config for the same number of rounds without and with SecAgg+; the late models'
test accuracies agree within 1 point, and the secure run's rounds all completed through the
secure phases (no update reached the server in the clear)."""

from __future__ import annotations

import time

from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_fleet, stop_all, wait_all

CLIENTS = 8
ROUNDS = 60
LATE = 20  # accuracy: the mean over the evaluations of the last LATE versions (one model's is noisier)


def experiment(secure: dict | None) -> dict:
    run = {
        "name": "fedavg",
        "algorithm": {"name": "fedavg"},
        "scheduler": {"mode": "sync", "concurrency": CLIENTS, "round_timeout": 60},
    }
    if secure is not None:
        run["secure_aggregation"] = secure
    return {
        "name": "e2e-secagg",
        "seed": 0,
        "data": {"partition": {"kind": "iid"}, "num_clients": CLIENTS},
        "model": {"name": "mlp", "hidden": [64]},
        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
        "stop": {"max_trips": CLIENTS * ROUNDS},
        "server": {  # no norm guard: the secure run cannot have one (the server sees no update's norm)
            "norm_guard": None,
            "lease_timeout": 120,
            "retry_after": 0.2,
            "eval_every_s": 0.25,
            "rate_per_s": 200,
            "rate_burst": 400,
        },
        "runs": [run],
    }


def train(workdir, secure: dict | None, timeout: float = 400.0) -> dict:
    """ROUNDS rounds of all 8 clients; the mean accuracy of the last LATE versions' evaluations."""
    server = ServerProcess(experiment(secure), workdir)
    tokens = mint_tokens(server.state_dir, "fedavg", [f"c{i}" for i in range(CLIENTS)])
    server.start()
    t0 = time.time()
    clients = spawn_fleet(server.url, tokens, workdir)
    try:
        wait_all(clients, t0 + timeout)
        wall = time.time() - t0
        status = server.status()
        while not [e for e in server.history() if e["version"] == status["version"]]:
            assert time.time() < t0 + timeout, "the last version was never evaluated"
            time.sleep(0.2)
        late = [e["accuracy"] for e in server.history() if e["version"] > ROUNDS - LATE]
    finally:
        stop_all(clients)
        server.kill()
    logs = [(workdir / f"c{i}.log").read_text() for i in range(CLIENTS)]
    assert [p.returncode for p in clients] == [0] * CLIENTS, logs
    return {"status": status, "accuracy": sum(late) / len(late), "wall": wall}


def test_fedavg_with_secagg_plus_matches_plaintext_accuracy(tmp_path):
    plain = train(tmp_path / "plain", None)
    secure = train(tmp_path / "secure", {"protocol": "secagg_plus", "clip_range": 2.0, "threshold": 0.5})
    p, s = plain["status"], secure["status"]
    assert p["version"] == ROUNDS and s["version"] == ROUNDS, (p, s)
    sa = s["secure_aggregation"]
    assert sa["completed_rounds"] == ROUNDS and sa["failed_rounds"] == {}
    assert sa["neighbours"] == 6 and sa["threshold"] == 4  # k = 2 ceil(log2 8) = 6, t = ceil(0.5 x 7)
    assert s["updates"] == {"buffered": ROUNDS, "stepped": 0, "discarded": 0}  # one decoded sum per round
    assert s["compression"]["bytes"]["uploads_decoded"] == 0  # no plain update was ever read
    assert p["rejected"].get("norm_rejected", 0) == 0
    assert abs(plain["accuracy"] - secure["accuracy"]) <= 0.01, (plain["accuracy"], secure["accuracy"])
    assert plain["accuracy"] >= 0.85
    print(
        f"sync fedavg, {CLIENTS} clients x {ROUNDS} rounds, mean acc of the last {LATE}: plaintext {plain['accuracy']:.3f} in "
        f"{plain['wall']:.1f} s wall; secagg+ {secure['accuracy']:.3f} in {secure['wall']:.1f} s wall"
    )


def test_kill_9_mid_run_aborts_the_open_round_and_the_run_continues(tmp_path):
    """SIGKILL the server while secure rounds run, restart it on the same state dir: the round
    that was open fails as 'restart', no version is lost or taken twice (one version per
    completed round), and the clients carry on to the end."""
    clients_n, rounds = 4, 16
    cfg = experiment({"protocol": "secagg_plus", "clip_range": 2.0, "threshold": 0.5})
    cfg["runs"][0]["scheduler"]["concurrency"] = clients_n
    cfg["stop"]["max_trips"] = clients_n * rounds
    server = ServerProcess(cfg, tmp_path)
    tokens = mint_tokens(server.state_dir, "fedavg", [f"c{i}" for i in range(clients_n)])
    server.start()
    clients = spawn_fleet(server.url, tokens, tmp_path)
    try:
        deadline = time.time() + 300
        while server.status()["version"] < 3:
            assert time.time() < deadline, "no progress before the kill"
            time.sleep(0.05)
        server.kill()
        before = server.starts
        server.start()
        assert server.starts == before + 1
        wait_all(clients, deadline)
        s = server.status()
    finally:
        stop_all(clients)
        server.kill()
    logs = [(tmp_path / f"c{i}.log").read_text() for i in range(clients_n)]
    assert [p.returncode for p in clients] == [0] * clients_n, logs
    sa = s["secure_aggregation"]
    assert sa["failed_rounds"].get("restart") == 1, sa
    assert s["version"] == sa["completed_rounds"] >= 3
    assert s["round"]["number"] >= s["version"] + 1
