"""The multi-process server end to end: every role a real process, real `asyncfl client`
processes training over two selectors. Training advances; active leases never exceed the
task's concurrency; kill -9 of the aggregator hands the task to the other one, kill -9 of
the coordinator stops nothing, kill -9 of a selector loses nothing its clients were told, and afterwards every update a client was told was accepted is in
the update log once and in exactly one folded partial sum."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import yaml
from cluster_helpers import fetch

from asyncfl.cluster.members import session
from asyncfl.cluster.postgres import free_port
from asyncfl.cluster.tasks import add_task, create_token
from asyncfl.config import validate

CONCURRENCY, K, CLIENTS = 4, 3, 6
EXPERIMENT = {
    "name": "e2e",
    "seed": 0,
    "target_accuracy": 0.99,
    "data": {"num_clients": CLIENTS, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
    "server": {"lease_timeout": 20, "eval_every_s": 1, "keep_versions": 1000, "rate_per_s": 100, "rate_burst": 100},
    "runs": [
        {
            "name": "fedbuff",
            "algorithm": {"name": "fedbuff", "buffer_size": K},
            "scheduler": {"concurrency": CONCURRENCY},
        }
    ],
}


class Cluster:
    """Roles and clients as child processes, their output in files under `dir`."""

    def __init__(self, url, dir):
        self.url, self.dir = url, dir
        self.env = os.environ | {"ASYNCFL_DATABASE_URL": url, "OMP_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name, *argv):
        out = open(self.dir / f"{name}-{len(self.procs)}.log", "w")
        p = subprocess.Popen(
            [sys.executable, "-m", "asyncfl.cli", *argv], env=self.env, stdout=out, stderr=subprocess.STDOUT
        )
        self.procs.append(p)
        return p

    def role(self, role, *extra):
        return self.spawn(role, "serve", "--role", role, "--log-level", "info", "--member-timeout", "2", *extra)

    def stop_clients(self):
        """End the clients, then leave the last uploads' group commits and folds time to land."""
        for p in self.procs:
            if "client" in p.args:
                p.terminate()
        time.sleep(2)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def _until(what, why, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {why}")


def _healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _served_by(url) -> int:
    """Uploads logged by the newest selector process (members ids end with the pid)."""
    return fetch(
        url,
        "SELECT count(*) FROM updates WHERE selector = "
        "(SELECT id FROM members WHERE role = 'selector' ORDER BY started_at DESC LIMIT 1)",
    )[0][0]


def _task(url):
    return fetch(url, "SELECT owner, owner_epoch, version FROM tasks WHERE task = 'fedbuff'")[0]


def kill_the_owner(url, aggregators) -> None:
    """kill -9 of the aggregator that owns the task; back once another one has taken it over
    (the next epoch) and stepped three more versions."""
    owner, epoch, version = _task(url)
    victim = next(p for p in aggregators if p.pid == int(owner.split("-")[-2]))
    victim.send_signal(signal.SIGKILL)
    _until(lambda: _task(url)[1] == epoch + 1, "the other aggregator to take over")
    _until(lambda: _task(url)[2] >= version + 3, "training to go on after the takeover")


@pytest.mark.slow
def test_cluster_trains_and_survives_kill_9(pg_url, tmp_path):
    with session(pg_url) as conn:
        add_task(conn, validate(EXPERIMENT))
        tokens = [create_token(conn, f"c{i}", "fedbuff") for i in range(CLIENTS)]
    cluster = Cluster(pg_url, tmp_path)
    most_leases, watching = [0], threading.Event()

    def watch():
        while not watching.wait(0.05):
            n = fetch(pg_url, "SELECT count(*) FROM leases WHERE task = 'fedbuff' AND state = 'active'")[0][0]
            most_leases[0] = max(most_leases[0], n)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        aggregators = [cluster.role("aggregator"), cluster.role("aggregator")]
        coordinator = cluster.role("coordinator")
        ports = [free_port(), free_port()]
        selectors = [cluster.role("selector", "--port", str(port)) for port in ports]
        _until(lambda: all(_healthy(p) for p in ports), "the selectors")
        for i, token in enumerate(tokens):
            cluster.spawn(
                f"client{i}",
                "client",
                "--server",
                f"http://127.0.0.1:{ports[i % 2]}",
                "--token",
                token,
                "--data",
                f"digits:client={i}",
                "--ack-log",
                str(tmp_path / f"acks{i}.jsonl"),
                "--backoff-cap",
                "1",
            )
        _until(lambda: _task(pg_url)[2] >= 4, "version 4")

        kill_the_owner(pg_url, aggregators)

        coordinator.send_signal(signal.SIGKILL)
        version = _task(pg_url)[2]
        _until(lambda: _task(pg_url)[2] >= version + 3, "training to go on without a coordinator")
        cluster.role("coordinator")
        version = _task(pg_url)[2]
        _until(lambda: _task(pg_url)[2] >= version + 2, "training with the coordinator back")

        # kill -9 of a selector amid its clients' uploads: the other selector's clients go on,
        # and its own re-send to it once it is back on its port (acknowledged ones are durable)
        selectors[1].send_signal(signal.SIGKILL)
        version = _task(pg_url)[2]
        _until(lambda: _task(pg_url)[2] >= version + 2, "training to go on with one selector")
        cluster.role("selector", "--port", str(ports[1]))
        _until(lambda: _healthy(ports[1]), "the restarted selector")
        served = _served_by(pg_url)
        _until(lambda: _served_by(pg_url) > served, "uploads through the restarted selector")
        cluster.stop_clients()
    finally:
        watching.set()
        watcher.join()
        cluster.stop()

    assert 0 < most_leases[0] <= CONCURRENCY
    acks = [json.loads(line) for i in range(CLIENTS) for line in open(tmp_path / f"acks{i}.jsonl")]
    accepted = {a["key"] for a in acks if a["http"] == 200}
    assert len(accepted) > 4 * K
    logged = fetch(pg_url, "SELECT idem_key, partial_id FROM updates WHERE task = 'fedbuff' AND status = 200")
    assert accepted <= {key for key, _ in logged}  # every acknowledged update is in the log
    assert len(logged) == len({key for key, _ in logged})  # once
    in_partials = fetch(pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE task = 'fedbuff'")[0][0]
    assert sum(1 for _, pid in logged if pid is not None) == in_partials
    folded = fetch(pg_url, "SELECT coalesce(sum(count - discarded), 0) FROM partials WHERE folded_version IS NOT NULL")[
        0
    ][0]
    waiting = fetch(pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE folded_version IS NULL")[0][0]
    in_versions = fetch(pg_url, "SELECT coalesce(sum(updates), 0) FROM versions WHERE task = 'fedbuff'")[0][0]
    assert in_versions == folded and waiting < K  # each folded update in exactly one version


@pytest.mark.slow
def test_cluster_up_runs_every_role_and_tears_down(tmp_path):
    """`asyncfl cluster up` with its own PostgreSQL: clients train through its selector; SIGTERM
    stops every role and removes the database server."""
    config_file, tokens_file = tmp_path / "x.yaml", tmp_path / "tokens.txt"
    config_file.write_text(yaml.safe_dump(EXPERIMENT))
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    env.pop("ASYNCFL_DATABASE_URL", None)
    argv = ["cluster", "up", "--config", str(config_file), "--selectors", "1", "--aggregators", "1"]
    argv += ["--port", str(port), "--clients", "2", "--tokens-file", str(tokens_file)]
    log = open(tmp_path / "up.log", "w+")
    up = subprocess.Popen([sys.executable, "-m", "asyncfl.cli", *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    clients = []
    try:
        _until(lambda: _healthy(port), "the selector")
        tokens = [line.split("\t") for line in tokens_file.read_text().splitlines()]
        assert [c for c, _ in tokens] == ["client-0", "client-1"] and oct(tokens_file.stat().st_mode)[-3:] == "600"
        for i, (_, token) in enumerate(tokens):
            command = ["client", "--server", f"http://127.0.0.1:{port}", "--token", token]
            command += ["--data", f"digits:client={i}", "--ack-log", str(tmp_path / f"up-acks{i}.jsonl")]
            clients.append(subprocess.Popen([sys.executable, "-m", "asyncfl.cli", *command], env=env))

        def accepted():
            paths = [tmp_path / f"up-acks{i}.jsonl" for i in range(2)]
            return sum(line.count('"http": 200') for p in paths if p.exists() for line in open(p)) >= 2 * K

        _until(accepted, "uploads through the cluster")
    finally:
        for c in clients:
            c.terminate()
            c.wait(15)
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    text = (tmp_path / "up.log").read_text()
    assert code == 0, text
    pg_port = int(text.split("local PostgreSQL on port ")[1].split()[0])
    for prefix in ("aggregator-1 |", "coordinator |", "selector-1 |"):
        assert prefix in text
    with pytest.raises(OSError):  # the local PostgreSQL is gone
        socket.create_connection(("127.0.0.1", pg_port), timeout=2).close()


@pytest.mark.slow
def test_cluster_rides_out_a_postgresql_restart(postgres, pg_url, tmp_path):
    """PostgreSQL down for a few seconds mid-training: selectors answer 503 meanwhile (clients
    back off and re-send), every role reconnects, training goes on, and the accounting holds:
    every acknowledged update logged once and in exactly one partial sum."""
    clients = 3
    with session(pg_url) as conn:
        add_task(conn, validate(EXPERIMENT))
        tokens = [create_token(conn, f"c{i}", "fedbuff") for i in range(clients)]
    cluster = Cluster(pg_url, tmp_path)
    try:
        cluster.role("aggregator")
        cluster.role("coordinator")
        port = free_port()
        selector = cluster.role("selector", "--port", str(port))
        _until(lambda: _healthy(port), "the selector")
        for i, token in enumerate(tokens):
            cluster.spawn(
                f"client{i}",
                *("client", "--server", f"http://127.0.0.1:{port}", "--token", token),
                *("--data", f"digits:client={i}", "--ack-log", str(tmp_path / f"acks{i}.jsonl"), "--backoff-cap", "1"),
            )
        _until(lambda: _task(pg_url)[2] >= 2, "version 2")
        # every client running before the outage (one slow to start had no answer, hence no ack log, by the end)
        _until(
            lambda: all((tmp_path / f"acks{i}.jsonl").exists() for i in range(clients)), "every client's first answer"
        )
        postgres.shutdown("fast")
        time.sleep(3)
        postgres.start()
        version = _task(pg_url)[2]
        _until(lambda: _task(pg_url)[2] >= version + 3, "training to go on after the restart")
        assert selector.poll() is None
        cluster.stop_clients()
    finally:
        cluster.stop()
    acks = [json.loads(line) for i in range(clients) for line in open(tmp_path / f"acks{i}.jsonl")]
    accepted = {a["key"] for a in acks if a["http"] == 200}
    assert len(accepted) > 3 * K and not [a for a in acks if a["http"] >= 500]
    logged = fetch(pg_url, "SELECT idem_key, partial_id FROM updates WHERE task = 'fedbuff' AND status = 200")
    assert accepted <= {key for key, _ in logged} and len(logged) == len({key for key, _ in logged})
    in_partials = fetch(pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE task = 'fedbuff'")[0][0]
    assert sum(1 for _, pid in logged if pid is not None) == in_partials
    selector_log = next(tmp_path.glob("selector-*.log")).read_text()
    assert "unavailable" in selector_log or "selector refresh" in selector_log  # it did see the outage
