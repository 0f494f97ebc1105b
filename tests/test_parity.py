"""Runtime parity: the simulator and the real HTTP server, driven through the same schedule,
produce the same model.

The simulator runs a small digits experiment and its trace hook records every trip start
(trip number, device, partition, base version, seed) and report, in order. The same experiment
is then served by a real `asyncfl serve` process on loopback, and in-process `ClientRuntime`s
(one per simulated device, each training on its own partition `digits:client=K`) replay that
order: a trip start is a check-in as that device, a report is that lease's download, local
training and upload. Every lease must come back with the trip's base version and seed, every
upload must count, and every model version the server makes must equal the simulator's.
"""

from __future__ import annotations

import torch

from asyncfl import wire
from asyncfl.client.http import Backoff, ServerApi
from asyncfl.client.runtime import ClientRuntime
from asyncfl.config import validate
from asyncfl.experiment import build_simulation
from asyncfl.server.testing import ServerProcess, mint_tokens

DEVICES, PARTITIONS, COHORT = 20, 10, 5
TOLERANCE = 1e-5


def experiment(run: dict, max_trips: int) -> dict:
    return {
        "name": "parity",
        "seed": 3,
        "target_accuracy": 0.99,
        "executor": "sequential",
        "data": {"partition": {"kind": "dirichlet", "alpha": 1.0}, "num_clients": PARTITIONS},
        "model": {"name": "mlp", "hidden": [16]},
        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 5},
        "population": {"devices": DEVICES, "dropout": 0.0},
        "stop": {"max_trips": max_trips},
        # no lease may expire, no evaluation or rate limit may interfere, and every version stays
        # downloadable so each one can be compared
        "server": {
            "lease_timeout": 3600,
            "retry_after": 0.2,
            "eval_every_s": 3600,
            "rate_per_s": 10_000,
            "rate_burst": 10_000,
            "keep_versions": 1000,
        },
        "runs": [run],
    }


def simulate(tree: dict, perturb_trip: int | None = None):
    """(simulation after its run, trace of (event, trip, device, partition, base version, seed),
    model of every version). `perturb_trip` trains that trip with another seed."""
    cfg = validate(tree)
    sim = build_simulation(cfg, cfg.runs[0])
    trace, versions = [], {}

    def record(event, trip):
        if event == "start" and trip.job_id == perturb_trip:
            trip.seed += 1  # the trip is the executor's job: it trains (later) with this seed
        trace.append((event, trip.job_id, trip.device, trip.client, trip.base_version, trip.seed))
        if sim.state.version not in versions:
            versions[sim.state.version] = sim.state.w.clone()

    sim.trace = record
    sim.run()
    versions.setdefault(sim.state.version, sim.state.w.clone())
    return sim, trace, versions


def replay(tree: dict, trace: list, workdir) -> tuple[dict, dict[int, torch.Tensor]]:
    """Serve the experiment and replay the trace with real clients; (server status, every model
    version the server made)."""
    server = ServerProcess(tree, workdir)
    names = [f"device{d}" for d in range(DEVICES)]
    tokens = dict(zip(names, mint_tokens(server.state_dir, tree["runs"][0]["name"], names)))
    server.start()
    clients: dict[int, ClientRuntime] = {}

    def client(device: int) -> ClientRuntime:
        if device not in clients:
            api = ServerApi(server.url, tokens[f"device{device}"], backoff=Backoff(base=0.01, cap=0.1))
            clients[device] = ClientRuntime(api, f"digits:client={device % PARTITIONS}")
            clients[device].setup()
        return clients[device]

    try:
        leases = {}
        for event, trip, device, partition, base_version, seed in trace:
            assert partition == device % PARTITIONS
            if event == "start":
                task = client(device).check_in()
                assert task["action"] == "train", (trip, task)
                assert (task["base_version"], task["seed"]) == (base_version, seed), (trip, task)
                leases[trip] = (device, task)
            else:
                assert event == "report", (trip, event)  # no dropout, no over-selection: nothing else happens
                device, task = leases.pop(trip)
                ack = client(device).train_and_upload(task)
                assert ack is not None and ack["http"] == 200, (trip, ack)
        status = server.status()
        api = next(iter(clients.values())).api
        models = {}
        for v in range(status["version"] + 1):
            resp = api.request("GET", f"/v1/model/{v}")
            assert resp.status_code == 200, (v, resp.text)
            models[v] = wire.join_flat(wire.decode(resp.content, wire.ModelHeader).arrays)
        return status, models
    finally:
        for rt in clients.values():
            rt.api.close()
        server.kill()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check_parity(tree: dict, workdir, reports: int, steps: int) -> None:
    sim, trace, sim_models = simulate(tree)
    assert sum(e[0] == "report" for e in trace) == sim.metrics.completed == reports
    assert sum(e[0] == "start" for e in trace) == sim.metrics.started
    assert sim.state.version == steps == len(sim_models) - 1
    status, server_models = replay(tree, trace, workdir)

    assert status["version"] == sim.state.version
    assert sorted(server_models) == sorted(sim_models)
    for v, w in server_models.items():
        assert max_diff(w, sim_models[v]) <= TOLERANCE, f"version {v} differs"
    final = server_models[status["version"]]
    assert max_diff(final, sim.state.w) <= TOLERANCE
    # equality means something: the model moved far beyond the tolerance, and training one trip
    # with another seed moves the simulator's final model away from the server's
    assert max_diff(final, sim_models[0]) > 1000 * TOLERANCE
    first_report = next(e[1] for e in trace if e[0] == "report")
    perturbed, _, _ = simulate(tree, perturb_trip=first_report)
    assert perturbed.state.version == sim.state.version
    assert max_diff(final, perturbed.state.w) > 100 * TOLERANCE


def test_parity_fedbuff_async(tmp_path):
    """FedBuff K=5, concurrency 5: 65 trips started, 60 delivered, 12 server steps."""
    tree = experiment(
        {
            "name": "fedbuff",
            "algorithm": {"name": "fedbuff", "buffer_size": COHORT},
            "scheduler": {"mode": "async", "concurrency": COHORT},
        },
        max_trips=65,
    )
    check_parity(tree, tmp_path, reports=60, steps=12)


def test_parity_fedavg_sync(tmp_path):
    """FedAvg in rounds of 5: 12 rounds started, 11 closed (the run stops as the 12th starts)."""
    tree = experiment(
        {"name": "fedavg", "algorithm": {"name": "fedavg"}, "scheduler": {"mode": "sync", "concurrency": COHORT}},
        max_trips=60,
    )
    check_parity(tree, tmp_path, reports=55, steps=11)
