"""End to end on loopback: one server process and 8 client processes train the digits MLP to
0.90 test accuracy, asynchronously (FedBuff) and in sync rounds (FedAvg with over-selection,
FedNova with proximal clients); the dashboard of the FedBuff run is then opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest

from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_fleet, stop_all, wait_all

CLIENTS = 8


def experiment(run: dict) -> dict:
    return {
        "name": "e2e",
        "seed": 0,
        "target_accuracy": 0.9,
        "data": {"partition": {"kind": "dirichlet", "alpha": 1.0}, "num_clients": CLIENTS},
        "model": {"name": "mlp", "hidden": [64]},
        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 10},
        "stop": {"at_target": True},
        "server": {
            "lease_timeout": 60,
            "retry_after": 0.2,
            "eval_every_s": 0.25,
            "max_update_norm": 100,
            "rate_per_s": 200,
            "rate_burst": 400,
        },
        "runs": [run],
    }


def train(workdir, run: dict, timeout: float = 400.0) -> dict:
    """Start the server and 8 clients; wait until every client was told to stop."""
    server = ServerProcess(experiment(run), workdir)
    tokens = mint_tokens(server.state_dir, run["name"], [f"c{i}" for i in range(CLIENTS)])
    server.start()
    t0 = time.time()
    clients = spawn_fleet(server.url, tokens, workdir)
    try:
        wait_all(clients, t0 + timeout)
    finally:
        stop_all(clients)
    status = server.status()
    acks = [json.loads(line) for i in range(CLIENTS) for line in open(workdir / f"c{i}.acks.jsonl")]
    return {
        "server": server,
        "status": status,
        "acks": acks,
        "codes": [p.returncode for p in clients],
        "wall": time.time() - t0,
        "logs": [(workdir / f"c{i}.log").read_text() for i in range(CLIENTS)],
    }


def check_trained(result: dict) -> None:
    s = result["status"]
    assert result["codes"] == [0] * CLIENTS, result["logs"]
    assert s["reached_target"] and s["done"], s
    assert max(e["accuracy"] for e in result["server"].history()) >= 0.9
    accepted = [a for a in result["acks"] if a["http"] == 200]
    assert len(accepted) == s["updates"]["buffered"] + s["updates"]["stepped"]
    assert len({a["seq"] for a in accepted}) == len(accepted)
    assert sum(a["http"] >= 500 for a in result["acks"]) == 0


@pytest.fixture(scope="module")
def fedbuff_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fedbuff")
    result = train(
        workdir,
        {
            "name": "fedbuff",
            "algorithm": {"name": "fedbuff", "buffer_size": 4},
            "scheduler": {"mode": "async", "concurrency": CLIENTS},
        },
    )
    yield result
    result["server"].kill()


def test_fedbuff_eight_client_processes_reach_090(fedbuff_run):
    check_trained(fedbuff_run)
    s = fedbuff_run["status"]
    assert s["mode"] == "async" and s["version"] >= 1
    print(
        f"fedbuff: target in {fedbuff_run['wall']:.1f} s wall (incl. client start-up), version {s['version']}, "
        f"{s['leases']['issued']} trips"
    )


def test_fedavg_sync_rounds_reach_090(tmp_path):
    result = train(
        tmp_path,
        {
            "name": "fedavg",
            "algorithm": {"name": "fedavg"},
            "scheduler": {"mode": "sync", "concurrency": 6, "over_selection": 0.34, "round_timeout": 30},
        },
    )
    check_trained(result)
    s = result["status"]
    assert s["mode"] == "sync" and s["round"]["number"] >= s["version"]
    assert s["updates"]["stepped"] == 0  # FedAvg steps only at the round barrier
    print(
        f"fedavg: target in {result['wall']:.1f} s wall, {s['version']} rounds, "
        f"{s['leases']['ended']['cancelled']} over-selected trips cancelled"
    )
    result["server"].kill()


def test_fednova_sync_rounds_reach_090(tmp_path):
    result = train(
        tmp_path,
        {
            "name": "fednova",
            "algorithm": {"name": "fednova", "mu": 0.01},
            "scheduler": {"mode": "sync", "concurrency": 6, "round_timeout": 30, "straggler": "partial"},
        },
    )
    check_trained(result)
    s = result["status"]
    assert s["mode"] == "sync" and s["updates"]["stepped"] == 0 and s["version"] >= 1
    print(f"fednova: target in {result['wall']:.1f} s wall, {s['version']} rounds")
    result["server"].kill()


def test_dashboard_shows_accuracy_chart_in_headless_chromium(fedbuff_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian chromium is required (apt-get install -y chromium); see the Makefile's test set-up"
    url = fedbuff_run["server"].url + "/#token=" + fedbuff_run["server"].operator_token  # never sent to the server
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=4000",
    ]
    dom = subprocess.run(args + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    line = re.search(r'<polyline id="acc-line"[^>]*>', dom)
    assert line, dom[:2000]
    n = int(re.search(r'data-points="(\d+)"', line.group(0)).group(1))
    points = re.search(r' points="([^"]*)"', line.group(0)).group(1).split()
    assert n >= 2 and len(points) == n
    assert re.search(r'id="version">\d+<', dom) and re.search(r'id="accuracy">0\.\d{3}<', dom)
    subprocess.run(
        args + [f"--screenshot={tmp_path / 'dashboard.png'}", "--window-size=800,560", url],
        capture_output=True,
        timeout=120,
    )
    assert (tmp_path / "dashboard.png").stat().st_size > 5000
