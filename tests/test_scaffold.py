"""SCAFFOLD against hand-computed values, in the simulator and over the network."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from asyncfl import config, wire
from asyncfl.algorithms.client_step import ClientStep
from asyncfl.algorithms.defs.registry import definition
from asyncfl.algorithms.scaffold import CONTROL, CONTROL_DELTA, ControlVariates, ScaffoldAggregator
from asyncfl.algorithms.server_opt import SGD
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict
from asyncfl.build import build_aggregator, build_client_rule
from asyncfl.experiment import build_simulation

ETA, K, N = 0.5, 2, 4  # local rate, local steps, users


def local_sgd(x: torch.Tensor, a: torch.Tensor, correction: torch.Tensor) -> ClientUpdate:
    """K steps of the shared client step on f(y) = |y - a|^2 / 2 (gradient y - a)."""
    step = ClientStep()
    y = x.clone().view(1, -1)
    for h in range(K):
        step(
            [y],
            lambda p, slot: ([p[0] - a.view(1, -1)], torch.zeros(1)),
            h,
            torch.tensor([ETA]),
            correction=[correction.view(1, -1)],
        )
    return ClientUpdate(client_id=0, base_version=0, delta=x - y[0], n_examples=1, steps=K, loss=0.0)


def trip(rule: ControlVariates, agg: ScaffoldAggregator, state: ServerState, a, own):
    """One client trip: (correction, update with its control delta, c_i+)."""
    downloaded = agg.downloads(state.w)
    corr = rule.correction(downloaded, own)
    update = local_sgd(state.w, torch.tensor(a), corr)
    update.extras = rule.uploads(downloaded, own, update)
    return corr, update, rule.advanced(own, update.extras)


def t(*v):
    return torch.tensor(v)


def test_two_rounds_by_hand():
    rule, agg = ControlVariates(ETA), ScaffoldAggregator(SGD(1.0), N)
    state = ServerState(torch.zeros(2))
    # round 1, c = c_i = 0: client 1 (a = (2, 0)) steps y = (1, 0), (1.5, 0); client 2 (a = (0, 4)) (0, 2), (0, 3)
    corr1, u1, c1 = trip(rule, agg, state, [2.0, 0.0], None)
    corr2, u2, c2 = trip(rule, agg, state, [0.0, 4.0], None)
    assert torch.equal(corr1, t(0.0, 0.0)) and torch.equal(corr2, t(0.0, 0.0))
    assert torch.equal(u1.delta, t(-1.5, 0.0)) and torch.equal(u2.delta, t(0.0, -3.0))
    # dc_i = delta / (K eta) - c = delta here; c_i+ = dc_i
    assert torch.equal(u1.extras[CONTROL_DELTA], t(-1.5, 0.0)) and torch.equal(c1, t(-1.5, 0.0))
    assert torch.equal(u2.extras[CONTROL_DELTA], t(0.0, -3.0)) and torch.equal(c2, t(0.0, -3.0))
    assert agg.submit(state, u1, state.w) == Verdict.BUFFERED and agg.submit(state, u2, state.w) == Verdict.BUFFERED
    assert state.version == 0 and agg.pending == 2
    assert agg.flush(state) and state.version == 1 and agg.pending == 0
    # x = 0 - mean(delta) = (0.75, 1.5); c = 0 + (dc_1 + dc_2) / N = (-0.375, -0.75)
    assert torch.equal(state.w, t(0.75, 1.5))
    assert torch.equal(agg.downloads(state.w)[CONTROL], t(-0.375, -0.75))
    # round 2, client 1: correction c - c_1 = (1.125, -0.75); steps y = (0.8125, 1.125), (0.84375, 0.9375)
    corr, u, c1_next = trip(rule, agg, state, [2.0, 0.0], c1)
    assert torch.equal(corr, t(1.125, -0.75))
    assert torch.equal(u.delta, t(-0.09375, 0.5625))
    assert torch.equal(u.extras[CONTROL_DELTA], t(0.28125, 1.3125))  # delta / (K eta) - c
    assert torch.equal(c1_next, t(-1.21875, 1.3125))  # c_1 - c + delta / (K eta)
    agg.submit(state, u, state.w)
    agg.flush(state)
    assert torch.equal(state.w, t(0.84375, 0.9375))  # one update: x - delta
    assert torch.equal(agg.downloads(state.w)[CONTROL], t(-0.375 + 0.28125 / 4, -0.75 + 1.3125 / 4))


def test_server_optimizer_steps_with_the_uniform_mean():
    agg, state = ScaffoldAggregator(SGD(0.5), 2), ServerState(torch.zeros(2))
    for delta, n in ((t(1.0, 0.0), 1), (t(0.0, 2.0), 100)):  # example counts do not weigh
        agg.submit(state, ClientUpdate(0, 0, delta, n, 1, 0.0, extras={CONTROL_DELTA: t(2.0, 4.0)}), state.w)
    agg.flush(state)
    assert torch.equal(state.w, t(-0.25, -0.5))
    assert torch.equal(agg.control, t(2.0, 4.0))  # (2 + 2) / N, (4 + 4) / N


def test_an_update_without_its_control_delta_is_refused():
    agg, state = ScaffoldAggregator(SGD(1.0), 2), ServerState(torch.zeros(2))
    with pytest.raises(ValueError, match="control_delta"):
        agg.submit(state, ClientUpdate(0, 0, t(1.0, 0.0), 1, 1, 0.0), state.w)
    with pytest.raises(ValueError, match="control_delta"):
        agg.submit(state, ClientUpdate(0, 0, t(1.0, 0.0), 1, 1, 0.0, extras={CONTROL_DELTA: t(1.0)}), state.w)


def test_state_dict_round_trip_mid_round():
    rule = ControlVariates(ETA)
    a, state_a = ScaffoldAggregator(SGD(1.0, momentum=0.5), N), ServerState(torch.zeros(2))
    for client in ([2.0, 0.0], [0.0, 4.0]):  # a first round, so that c and the momentum are non-zero
        a.submit(state_a, trip(rule, a, state_a, client, None)[1], state_a.w)
    a.flush(state_a)
    a.submit(state_a, trip(rule, a, state_a, [1.0, 1.0], None)[1], state_a.w)
    b, state_b = ScaffoldAggregator(SGD(1.0, momentum=0.5), N), ServerState(state_a.w.clone(), state_a.version)
    b.load_state_dict(a.state_dict())
    assert b.pending == 1 and torch.equal(b.control, a.control)
    last = trip(rule, a, state_a, [3.0, -1.0], None)[1]
    for agg, state in ((a, state_a), (b, state_b)):
        agg.submit(state, last, state.w)
        agg.flush(state)
    assert torch.equal(state_a.w, state_b.w) and torch.equal(a.control, b.control) and state_b.version == 2


def test_definition_declares_state_and_refuses_what_it_does_not_cover():
    d = definition("scaffold")
    assert d.modes == ("sync",) and d.client_state == CONTROL and d.upload_fields == (CONTROL_DELTA,)
    assert not d.private and not d.compression
    spec = config.RunSpec.model_validate({"name": "s", "algorithm": {"name": "scaffold"}})
    assert spec.scheduler.mode == "sync"
    with pytest.raises(ValueError, match="scheduler.mode 'async' is not valid for scaffold"):
        config.RunSpec.model_validate({"name": "s", "algorithm": {"name": "scaffold"}, "scheduler": {"mode": "async"}})
    with pytest.raises(ValueError, match="compression is not supported for algorithm 'scaffold'"):
        config.RunSpec.model_validate(
            {"name": "s", "algorithm": {"name": "scaffold"}, "compression": {"upload": "int8"}}
        )
    with pytest.raises(ValueError, match="privacy is not supported for algorithm 'scaffold'"):
        config.RunSpec.model_validate(
            {"name": "s", "algorithm": {"name": "scaffold"}, "privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}}
        )
    assert build_aggregator(spec, 0.1, num_users=7).num_clients == 7
    fixed = config.RunSpec.model_validate({"name": "s", "algorithm": {"name": "scaffold", "num_clients": 3}})
    assert build_aggregator(fixed, 0.1, num_users=7).num_clients == 3
    with pytest.raises(config.ConfigError, match="algorithm.num_clients"):
        build_aggregator(spec, 0.1)
    assert build_client_rule(spec, 0.25).lr == 0.25


def scaffold_config(small, **kw):
    return small(
        runs=[
            {
                "name": "scaffold",
                "algorithm": {"name": "scaffold"},
                "scheduler": {"concurrency": 8, "over_selection": 0.25},
            }
        ],
        **kw,
    )


def test_simulator_keeps_control_variates_only_for_devices_whose_updates_counted(small):
    cfg = scaffold_config(small, sets=["population.dropout=0.1", "stop.max_time=120"])
    sim = build_simulation(cfg, cfg.run("scaffold"))
    counted, submit = set(), sim.submit

    def recording_submit(trip, update):
        verdict = submit(trip, update)
        assert set(update.extras) == {CONTROL_DELTA}
        counted.add(trip.device)
        return verdict

    sim.submit = recording_submit
    m = sim.run()
    sim.flush()  # the open round's updates already advanced their devices' c_i
    assert set(sim.client_state) == counted and 0 < len(counted) < cfg.population.devices
    assert m.cancelled > 0  # over-selected trips reported too late: their devices kept their old c_i
    # c is the mean of all users' c_i (the others are zero): every dc_i reached both
    assert sim.aggregator.num_clients == cfg.population.devices
    mean = torch.stack(list(sim.client_state.values())).sum(0) / cfg.population.devices
    assert torch.allclose(sim.aggregator.control, mean, atol=1e-5)
    assert sim.aggregator.control.norm() > 0
    assert m.rows[-1]["test_accuracy"] > m.rows[0]["test_accuracy"]


def test_a_trip_uses_the_control_variates_of_its_start(small):
    cfg = scaffold_config(small, sets=["stop.max_time=60"])
    sim = build_simulation(cfg, cfg.run("scaffold"))
    started = []
    start = sim._start_trip

    def recording_start(device):
        own = sim.client_state.get(device)
        start(device)
        trip = sim.trips[max(sim.trips)]
        started.append((trip, None if own is None else own.clone(), sim.aggregator.control.clone()))

    sim._start_trip = recording_start
    sim.run()
    assert any(own is not None for _, own, _ in started)
    for trip, own, c in started:
        assert torch.equal(trip.base_extras[CONTROL], c)
        assert torch.equal(trip.correction, c if own is None else c - own)


# ---- network server ---------------------------------------------------------------------------


def scaffold_harness(tmp_path, **settings):
    from test_server_inputs import Harness

    return Harness(tmp_path, {"name": "scaffold"}, {"mode": "sync", "concurrency": 2}, **settings)


def download(h, version):
    """(model, {field: flat tensor}) of a model frame, as a client reads it."""
    frame = wire.decode(h.http.get(f"/v1/model/{version}", headers=h.auth("g")).content, wire.ModelHeader)
    arrays, fields = wire.split_fields(
        frame.arrays, h.server.model.names, wire.fields_of(frame.header.tensors, h.server.model.names)
    )
    return wire.join_flat(arrays), fields


def scaffold_frame(h, lease, delta, control_delta, key=None):
    return h.frame(lease, delta, key, extras={CONTROL_DELTA: control_delta})


def server_state(h):
    agg = h.server.aggregation
    sd = agg.aggregator.state_dict()
    return (
        agg.state.version,
        agg.state.w.clone(),
        sd["control"].clone(),
        sd["count"],
        None if sd["delta_sum"] is None else sd["delta_sum"].clone(),
        dict(agg.counts),
    )


def assert_same_state(a, b):
    assert a[0] == b[0] and a[3] == b[3] and a[5] == b[5]
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert (a[4] is None and b[4] is None) or torch.equal(a[4], b[4])


def test_server_sends_c_with_the_model_and_steps_x_and_c_at_the_round_barrier(tmp_path):
    with scaffold_harness(tmp_path) as h:
        task = h.http.get("/v1/task", headers=h.auth("a")).json()
        assert task["client_state"] == CONTROL and task["upload_fields"] == [CONTROL_DELTA]
        p = h.server.model.numel
        x0, fields = download(h, 0)
        assert set(fields) == {CONTROL} and torch.equal(fields[CONTROL], torch.zeros(p))
        deltas, dcs = (
            [torch.full((p,), 0.01), torch.full((p,), -0.03)],
            [torch.full((p,), 0.25), torch.full((p,), 0.75)],
        )
        for client, d, dc in zip("ab", deltas, dcs):
            r = h.upload(client, scaffold_frame(h, h.checkin(client), d, dc))
            assert r.status_code == 200, r.text
        assert r.json()["version"] == 1
        x1, fields = download(h, 1)
        n = h.server.aggregation.aggregator.num_clients
        assert n == 8  # the task's data partitions, as the simulator derives it
        assert torch.allclose(x1, x0 - (deltas[0] + deltas[1]) / 2, atol=1e-7)
        assert torch.allclose(fields[CONTROL], torch.full((p,), 1.0 / n))
        before = server_state(h)
    h.open()  # a restarted server keeps c, and serves it with its current version
    try:
        assert_same_state(server_state(h), before)
        assert torch.allclose(download(h, 1)[1][CONTROL], torch.full((p,), 1.0 / n))
    finally:
        h.close()


@pytest.mark.parametrize(
    "bad, status, code, words",
    [
        ("nan", 422, "non_finite", "update's control_delta contains 1 NaN"),
        ("norm", 422, "norm_too_large", "update's control_delta L2 norm"),
        ("shape", 422, "bad_shape", "'control_delta:"),
        ("missing", 422, "bad_tensor_count", "expected 8 (the model's 4 for the delta and for each of control_delta)"),
        ("name", 422, "bad_tensor_name", "expected 'control_delta:"),
    ],
)
def test_a_bad_control_delta_is_refused_and_changes_nothing(tmp_path, bad, status, code, words):
    from test_server_inputs import assert_rejected

    with scaffold_harness(tmp_path, max_update_norm=50.0) as h:
        a, b = h.checkin("a"), h.checkin("b")
        p = h.server.model.numel
        assert h.upload("a", scaffold_frame(h, a, torch.full((p,), 0.01), torch.full((p,), 0.1))).status_code == 200
        before, snap = server_state(h), h.snapshot()
        m = h.server.model
        header = {
            "kind": "update",
            "lease_id": b["lease_id"],
            "base_version": 0,
            "idempotency_key": "key-12345678",
            "n_examples": 5,
            "steps": 2,
            "loss": 0.5,
        }
        delta = wire.split_flat(torch.zeros(p), m.names, m.shapes)
        dc = torch.zeros(p)
        names = m.names + wire.field_names(CONTROL_DELTA, m.names)
        if bad == "nan":
            dc[3] = float("nan")
        elif bad == "norm":
            dc += 100.0
        arrays = delta + wire.split_flat(dc, m.names, m.shapes)
        if bad == "shape":
            arrays[-1] = np.zeros(arrays[-1].size + 1, np.float32)
        elif bad == "missing":
            arrays, names = delta, list(m.names)
        elif bad == "name":
            names = m.names + wire.field_names("other", m.names)
        assert_rejected(h, h.upload("b", wire.encode(dict(header, names=names), arrays)), status, code, words)
        assert_same_state(server_state(h), before)
        assert h.snapshot() == snap
        r = h.upload("b", scaffold_frame(h, b, torch.full((p,), 0.01), torch.full((p,), 0.1)))
        assert r.status_code == 200 and r.json()["version"] == 1  # the lease still counts once a good frame comes


# ---- end to end: server and client processes ----------------------------------------------------


def test_real_clients_keep_their_control_variates_on_disk_across_restarts(tmp_path):
    """8 client processes, cohort 4: each takes one trip and exits (two rounds), then restarted
    processes train until the server has issued 16 leases (four rounds, whoever checks in first). Every client's c_i is
    in its state file, and c is (1/N) sum_i c_i: a client that lost its c_i on restart, or kept
    one the server never counted, would break that."""
    from test_server_e2e import CLIENTS, experiment

    from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_fleet, stop_all

    run = {"name": "scaffold", "algorithm": {"name": "scaffold"}, "scheduler": {"mode": "sync", "concurrency": 4}}
    cfg = experiment(run) | {"stop": {"at_target": False, "max_trips": 16}}
    server = ServerProcess(cfg, tmp_path)
    tokens = mint_tokens(server.state_dir, "scaffold", [f"c{i}" for i in range(CLIENTS)] + ["reader"])
    server.start()

    def clients(*extra):
        procs = spawn_fleet(server.url, tokens[:CLIENTS], tmp_path, lambda i: extra)
        try:
            assert [p.wait(timeout=300) for p in procs] == [0] * CLIENTS, [
                (tmp_path / f"c{i}.log").read_text() for i in range(CLIENTS)
            ]
        finally:
            stop_all(procs)

    def server_c():
        version = server.status()["version"]
        body = httpx.get(
            f"{server.url}/v1/model/{version}", headers={"Authorization": f"Bearer {tokens[-1]}"}, timeout=10
        ).content
        frame = wire.decode(body, wire.ModelHeader)
        names = [t.name for t in frame.header.tensors][: len(frame.arrays) // 2]
        return wire.split_fields(frame.arrays, names, wire.fields_of(frame.header.tensors, names))[1][CONTROL]

    def own_states():
        return [
            torch.load(tmp_path / f"c{i}.acks.jsonl.state.pt", weights_only=True)["state"][CONTROL]
            for i in range(CLIENTS)
        ]

    try:
        clients("--max-trips", "1")
        s = server.status()
        assert s["version"] == 2 and s["buffer"]["fill"] == 0
        first = own_states()
        assert torch.allclose(server_c(), torch.stack(first).sum(0) / CLIENTS, atol=1e-5)
        clients()  # restarted: they load their c_i and continue
        s = server.status()
        assert s["version"] == 4 and s["buffer"]["fill"] == 0 and s["done"] and s["updates"]["buffered"] == 16
        final, c = own_states(), server_c()
        assert c.norm() > 0
        assert torch.allclose(c, torch.stack(final).sum(0) / CLIENTS, atol=1e-5)
        # every client trained in the first phase, so those that trained again continued from a loaded c_i
        assert sum(not torch.equal(a, b) for a, b in zip(first, final)) >= 1
        server.kill()
        server.start()  # a restarted server serves the same c
        assert torch.equal(server_c(), c)
    finally:
        server.kill()


def test_a_model_frame_with_a_misnamed_tensor_set_is_unreadable():
    names, shapes = ["fc.weight", "fc.bias"], [(2, 3), (2,)]
    w, c = torch.arange(8.0), torch.ones(8)
    frame = wire.decode(wire.encode_model(3, w, names, shapes, extras={CONTROL: c}), wire.ModelHeader)
    assert [t.name for t in frame.header.tensors] == names + ["control:fc.weight", "control:fc.bias"]
    arrays, fields = wire.split_fields(frame.arrays, names, wire.fields_of(frame.header.tensors, names))
    assert torch.equal(wire.join_flat(arrays), w) and torch.equal(fields[CONTROL], c)
    plain = wire.decode(wire.encode_model(3, w, names, shapes), wire.ModelHeader)
    assert wire.fields_of(plain.header.tensors, names) == ()  # other algorithms' frames are as before
    for bad in (["fc.weight", "fc.bias", "control:fc.weight", "other:fc.bias"], ["fc.weight", "fc.bias", "x:y"]):
        arrays = [np.zeros(s, np.float32) for s in (shapes + shapes)[: len(bad)]]
        body = wire.encode({"kind": "model", "version": 3, "names": bad}, arrays)
        with pytest.raises(wire.WireError, match="tensor"):
            wire.fields_of(wire.decode(body, wire.ModelHeader).header.tensors, names)


def test_client_state_file_needs_a_place_and_must_be_the_tasks(tmp_path):
    from asyncfl.client.runtime import ClientError, ClientRuntime
    from asyncfl.models import FlatModel, build_model

    cfg = config.validate({"runs": [{"name": "s", "algorithm": {"name": "scaffold"}}]})
    task = {"task": "s", "client_state": CONTROL, "upload_fields": [CONTROL_DELTA]}

    def runtime(**kw):
        rt = ClientRuntime(None, "digits:client=0", **kw)
        rt.model = FlatModel(build_model("logreg", 4, 3))
        return rt

    with pytest.raises(ClientError, match="give --state PATH"):
        runtime()._setup_state(task, cfg)
    with pytest.raises(ClientError, match=r"expects upload fields \[\]"):
        runtime(state_path=tmp_path / "s.pt")._setup_state(task | {"upload_fields": []}, cfg)
    rt = runtime(ack_log=tmp_path / "acks.jsonl")
    rt._setup_state(task, cfg)
    assert rt.state_path == tmp_path / "acks.jsonl.state.pt" and rt.own_state is None
    rt.own_state = torch.arange(15.0)
    rt._save_state()
    again = runtime(state_path=rt.state_path)
    again._setup_state(task, cfg)
    assert torch.equal(again.own_state, torch.arange(15.0))
    with pytest.raises(ClientError, match="another task or model"):
        runtime(state_path=rt.state_path)._setup_state(task | {"task": "other"}, cfg)
