"""Attacks: each kind changes what a malicious client sends exactly as `asyncfl.attacks` defines
it, in the simulator (both executors) and in the config; honest devices are untouched."""

import json

import numpy as np
import pydantic
import pytest
import torch
from conftest import digits_clients
from test_batched import assert_same, both, mlp_trainer
from test_client_runtime import in_process_client
from test_server_inputs import Harness

from asyncfl.attacks import Attack, flip_labels
from asyncfl.cli import main as cli_main
from asyncfl.client.runtime import load_data
from asyncfl.config import validate
from asyncfl.experiment import build_simulation, run_one
from asyncfl.sim.executor import TrainJob

DELTA = torch.tensor([1.0, -2.0, 0.5])
FRACTION = "population.attack.fraction=0.3"


def test_each_kind_on_a_tiny_delta():
    assert torch.equal(Attack("sign_flip", factor=3.0).corrupt(DELTA, 7), torch.tensor([-3.0, 6.0, -1.5]))
    assert torch.equal(Attack("scale", factor=4.0).corrupt(DELTA, 7), torch.tensor([4.0, -8.0, 2.0]))
    assert Attack("label_flip").corrupt(DELTA, 7) is DELTA
    assert torch.equal(flip_labels(torch.tensor([0, 1, 9]), 10), torch.tensor([9, 8, 0]))
    big = torch.zeros(100_000)
    noise = Attack("gaussian", noise_std=0.3)
    assert float(noise.corrupt(big, 5).std()) == pytest.approx(0.3, rel=0.02)
    assert torch.equal(noise.corrupt(DELTA, 5), noise.corrupt(DELTA, 5))  # reproducible per trip
    assert not torch.equal(noise.corrupt(DELTA, 5), noise.corrupt(DELTA, 6))
    collude = Attack("collude", noise_std=0.3, seed=11)
    shared = collude.corrupt(DELTA, 5)
    assert torch.equal(shared, collude.corrupt(-DELTA, 6))  # the same vector from every trip
    assert not torch.equal(shared, Attack("collude", noise_std=0.3, seed=12).corrupt(DELTA, 5))
    assert float(collude.corrupt(big, 1).std()) == pytest.approx(0.3, rel=0.02)


@pytest.mark.parametrize(
    "assignment, field",
    [
        ("population.attack.kind=poison", "population.attack.kind"),
        ("population.attack.noise_std=0", "population.attack.noise_std"),
        ("population.attack.factor=-1", "population.attack.factor"),
        ("population.attack.seed=-1", "population.attack.seed"),
    ],
)
def test_config_errors_name_the_field(small, assignment, field):
    with pytest.raises((ValueError, pydantic.ValidationError)) as err:
        small(sets=[assignment])
    assert field.split(".")[-1] in str(err.value) and "attack" in str(err.value)


def first_updates(cfg, run="fedbuff"):
    """{trip id: (device, the update as the server receives it)} for the first trips of a run."""
    sim = build_simulation(cfg, cfg.run(run))
    sim.request_clients(8)
    trips = list(sim.trips.values())
    return sim, {t.job_id: (t.device, sim._update_of(t)) for t in trips}


@pytest.mark.parametrize("executor", ["sequential", "batched"])
@pytest.mark.parametrize("kind", ["sign_flip", "scale", "gaussian", "collude", "label_flip"])
def test_simulated_attackers_send_their_kind_and_honest_devices_do_not(small, kind, executor):
    sets = [f"population.attack.kind={kind}", "population.attack.factor=3", "population.attack.noise_std=0.2"]
    honest_sim, honest = first_updates(small(executor=executor, sets=sets))
    sim, attacked = first_updates(small(executor=executor, sets=sets + ["population.attack.fraction=0.5"]))
    attack, malicious = sim.population.attack, sim.population.malicious
    assert attack.kind == kind and honest_sim.population.attack is None
    assert honest.keys() == attacked.keys()
    bad = [k for k, (device, _) in attacked.items() if malicious[device]]
    assert 0 < len(bad) < len(attacked)  # both kinds of device among the first trips
    for k, (device, u) in attacked.items():
        h = honest[k][1]
        assert honest[k][0] == device
        if not malicious[device]:
            assert torch.equal(u.delta, h.delta)
        elif kind == "label_flip":  # trained on C - 1 - y, from the same start and seed
            trip_seed = sim.trips[k].seed
            x, y = sim.data.client_data(sim.trips[k].client)
            y = flip_labels(y, sim.data.num_classes)
            want = sim.trainer.train(sim.trips[k].base_w, x, y, seed=trip_seed, steps=h.steps)
            assert not torch.allclose(u.delta, h.delta)
            assert torch.allclose(u.delta, want.delta, atol=2e-6, rtol=1e-4)
        else:
            assert torch.equal(u.delta, attack.corrupt(h.delta, sim.trips[k].seed))
    if kind == "collude":
        assert all(torch.equal(attacked[bad[0]][1].delta, attacked[k][1].delta) for k in bad)


@pytest.fixture(scope="module")
def data():
    return digits_clients(30)


def test_label_flip_batched_equals_sequential_and_trains_on_flipped_labels(data):
    """A pass mixing flipped and honest jobs (start loss included) gives the sequential results,
    and a flipped job's update is the trainer's on C - 1 - y."""
    tr = mlp_trainer(data, local_steps=4, start_loss="full")
    w0 = tr.model.initial_weights()
    jobs = [TrainJob(k, k % data.num_clients, 0, w0, 300 + k, 4, flip_labels=k % 3 == 0) for k in range(24)]
    seq, bat = both(tr, data, jobs)
    for ex in (seq, bat):  # both() submits copies without the flag
        for job in jobs:
            ex.pending[job.job_id].flip_labels = job.flip_labels
    for job in jobs:
        u = seq.result(job.job_id)
        assert_same(bat.result(job.job_id), u)
        x, y = data.client_data(job.client)
        honest = tr.train(w0, x, y, seed=job.seed, steps=4)
        if job.flip_labels:
            flipped = tr.train(w0, x, flip_labels(y, data.num_classes), seed=job.seed, steps=4)
            assert torch.equal(u.delta, flipped.delta) and not torch.equal(u.delta, honest.delta)
        else:
            assert torch.equal(u.delta, honest.delta)


def attacking_client(h, client, attack):
    """An in-process ClientRuntime that records the honest delta it trained before corrupting it."""
    rt = in_process_client(h, client, max_trips=1, idle_wait=0.01, attack=attack)
    rt.honest = []
    setup = rt.setup

    def setup_and_record():  # run() sets up again, building a new trainer
        setup()
        train = rt.trainer.train
        rt.trainer.train = lambda *a, **kw: rt.honest.append((u := train(*a, **kw)).delta.clone()) or u

    rt.setup = setup_and_record
    rt.setup()
    return rt


def server_step(h, rt):
    """The change of the server's model over the client's one trip, and the client's stats."""
    w0 = h.server.aggregation.state.w.clone()
    stats = rt.run()
    return h.server.aggregation.state.w - w0, stats


def test_a_sign_flipping_client_moves_the_server_against_its_honest_step(tmp_path):
    with Harness(tmp_path, {"name": "fedbuff", "buffer_size": 1}, {"mode": "async", "concurrency": 2}) as h:
        honest, attacker = attacking_client(h, "a", None), attacking_client(h, "b", Attack("sign_flip", factor=1.0))
        for rt, sign in ((honest, -1.0), (attacker, 1.0)):  # delta = start - trained: an honest step is -delta
            step, stats = server_step(h, rt)
            assert stats["accepted"] == 1
            cos = torch.nn.functional.cosine_similarity(step, rt.honest[0], dim=0)
            assert float(cos) == pytest.approx(sign, abs=1e-4)


def test_a_label_flipping_client_trains_on_flipped_labels(tmp_path):
    with Harness(tmp_path, {"name": "fedbuff", "buffer_size": 1}, {"mode": "async", "concurrency": 2}) as h:
        rt = attacking_client(h, "a", Attack("label_flip"))
        x, y = load_data("digits:client=0", validate(h.cfg.model_dump()), rt.x.shape[1])
        assert torch.equal(rt.x, x) and torch.equal(rt.y, 9 - y)


def test_a_scaling_client_is_refused_by_the_norm_bound(tmp_path):
    with Harness(tmp_path, {"name": "fedbuff", "buffer_size": 1}, {"mode": "async", "concurrency": 2}) as h:
        rt = attacking_client(h, "a", Attack("scale", factor=1e6))
        rt.ack_log = tmp_path / "acks.jsonl"
        step, stats = server_step(h, rt)
        assert stats["rejected"] == 1 and not step.any()
        ack = json.loads((tmp_path / "acks.jsonl").read_text())
        assert (ack["http"], ack["error"]) == (422, "norm_too_large")  # the harness sets max_update_norm=50


def test_without_attackers_a_run_is_unchanged_and_attackers_change_no_other_draw(small):
    """fraction 0 means no attack, whatever its kind (bit-identical runs); attackers are drawn
    last, so a run with them keeps every device's speed and bandwidth."""
    sets = ["stop.max_time=60"]
    base = small(sets=sets)
    quiet = small(sets=sets + ["population.attack.kind=gaussian", "population.attack.noise_std=5"])
    rows = [[r | {"wall_time": 0} for r in run_one(cfg, cfg.run("fedbuff")).rows] for cfg in (base, quiet)]
    assert rows[0] == rows[1] and rows[0][-1]["version"] > 0
    pops = [build_simulation(cfg, cfg.run("fedbuff")).population for cfg in (base, small(sets=[*sets, FRACTION]))]
    for name in ("compute_per_example", "download_bandwidth", "upload_bandwidth"):
        assert np.array_equal(getattr(pops[0], name), getattr(pops[1], name))
    assert pops[0].malicious is None and 0 < pops[1].malicious.mean() < 0.5


def test_client_cli_validates_the_attack(tmp_path, capsys):
    assert (
        cli_main(
            [
                "client",
                "--server",
                "http://127.0.0.1:9",
                "--token",
                "t",
                "--data",
                "digits:client=0",
                "--attack",
                "scale",
                "--attack-factor",
                "0",
            ]
        )
        == 2
    )
    assert "attack factor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["client", "--server", "http://127.0.0.1:9", "--token", "t", "--data", "x", "--attack", "poison"])
