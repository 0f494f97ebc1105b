"""FedNova against hand-computed steps: sync rounds (mu = 0 and mu > 0), the async buffer with
staleness weights, the objective inconsistency it removes, checkpoints mid-buffer, untrusted
step counts, its config, and the quickstart preset with FedNova in FedAvg's place."""

import json

import pytest
import torch

from asyncfl import config
from asyncfl.algorithms import aggregators, server_opt, staleness
from asyncfl.algorithms.fednova import FedNova, local_work
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict
from asyncfl.build import build_aggregator, client_options
from asyncfl.experiment import run_experiment


def upd(delta, n, steps, base=0):
    return ClientUpdate(
        client_id=0,
        base_version=base,
        delta=torch.tensor(delta, dtype=torch.float64),
        n_examples=n,
        steps=steps,
        loss=0.0,
    )


def by_n(u, d):
    return float(u.n_examples)


def fednova(mu=0.0, lr=0.1, **kw):
    return FedNova(server_opt.SGD(lr=1.0), kw.pop("weight", by_n), lr, mu, **kw)


def one_round(agg, updates, w0=(1.0, 1.0)):
    state = ServerState(torch.tensor(w0, dtype=torch.float64), 0)
    for u in updates:
        assert agg.submit(state, u, state.w) == Verdict.BUFFERED
    assert agg.flush(state) and state.version == 1
    return state.w


def test_sync_round_without_proximal_term():
    # p = (1/4, 3/4); d = delta / steps = ([1, 0], [0, 1]); tau_eff = 2/4 + 6 * 3/4 = 5
    # w = [1, 1] - 5 * [1/4, 3/4] = [-0.25, -2.75]   (FedAvg: [1, 1] - [0.5, 4.5])
    w = one_round(fednova(), [upd([2.0, 0.0], 10, 2), upd([0.0, 6.0], 30, 6)])
    assert torch.allclose(w, torch.tensor([-0.25, -2.75], dtype=torch.float64))


def test_sync_round_with_proximal_term():
    # lr mu = 0.5: ||a_1|| = (1 - 0.5^2) / 0.5 = 1.5, ||a_2|| = (1 - 0.5^6) / 0.5 = 63/32
    # d = ([3, 0] / 1.5, [0, 63/16] / (63/32)) = ([2, 0], [0, 2]); sum p d = [0.5, 1.5]
    # tau_eff = 1.5 / 4 + (63/32) 3/4 = 1.8515625; w = [1, 1] - 1.8515625 [0.5, 1.5]
    assert local_work(2, 0.1, 5.0) == pytest.approx(1.5) and local_work(6, 0.1, 5.0) == pytest.approx(63 / 32)
    w = one_round(fednova(mu=5.0), [upd([3.0, 0.0], 10, 2), upd([0.0, 63 / 16], 30, 6)])
    assert torch.allclose(w, torch.tensor([0.07421875, -1.77734375], dtype=torch.float64))


def test_equal_steps_and_no_proximal_term_is_fedavg():
    torch.manual_seed(0)
    updates = [upd(torch.randn(20).tolist(), n, 7) for n in (5, 17, 3, 40)]
    avg = aggregators.fedavg(server_opt.SGD(lr=1.0))
    w0 = torch.randn(20).tolist()
    assert torch.allclose(one_round(fednova(), updates, w0), one_round(avg, updates, w0))


def local_sgd_delta(w: float, center: float, steps: int, lr: float) -> float:
    """w - w_local after `steps` of SGD on F(w) = (w - center)^2 / 2, in closed form."""
    return (w - center) * (1 - (1 - lr) ** steps)


@pytest.mark.parametrize("name", ["fedavg", "fednova"])
def test_fednova_removes_the_objective_inconsistency_of_fedavg(name):
    """Two equally weighted clients with minima 0 and 10 (global minimum 5), taking 2 and 6
    local steps. FedAvg's fixed point sum p_i c_i q_i / sum p_i q_i, q_i = 1 - (1 - lr)^tau_i, is
    about 7.5, pulled toward the many-step client; FedNova's divides q_i by tau_i and lands
    within O(lr) of 5."""
    lr, centers, steps = 0.01, (0.0, 10.0), (2, 6)
    agg = fednova() if name == "fednova" else aggregators.fedavg(server_opt.SGD(lr=1.0))
    state = ServerState(torch.zeros(1, dtype=torch.float64), 0)
    for _ in range(3000):
        w = float(state.w)
        for c, tau in zip(centers, steps):
            agg.submit(state, upd([local_sgd_delta(w, c, tau, lr)], 10, tau, base=state.version), state.w)
        agg.flush(state)
    q = [1 - (1 - lr) ** tau for tau in steps]
    scale = [qi / tau for qi, tau in zip(q, steps)] if name == "fednova" else q
    fixed_point = sum(c * s for c, s in zip(centers, scale)) / sum(scale)
    assert float(state.w) == pytest.approx(fixed_point, abs=1e-9)
    if name == "fednova":
        assert abs(fixed_point - 5.0) < 0.06
    else:
        assert fixed_point > 7.4


def test_async_buffer_with_staleness_weights():
    # version 3: A fresh (s = 1, w = 10), B 3 versions late (s = 1/2, w = 15): p = (0.4, 0.6)
    # d = ([1, 0], [0, 2]); tau_eff = 0.4 * 2 + 0.6 * 4 = 3.2; w = 0 - 3.2 [0.4, 1.2]
    s = staleness.inverse_sqrt()
    agg = FedNova(server_opt.SGD(lr=1.0), lambda u, d: s(d) * u.n_examples, lr=0.1, buffer_size=2)
    state = ServerState(torch.zeros(2, dtype=torch.float64), 3)
    assert agg.submit(state, upd([2.0, 0.0], 10, 2, base=3), state.w) == Verdict.BUFFERED
    assert agg.pending == 1 and agg.status()["buffer"] == {"fill": 1, "size": 2}
    assert agg.submit(state, upd([0.0, 8.0], 30, 4, base=0), state.w) == Verdict.STEPPED
    assert state.version == 4 and agg.pending == 0
    assert torch.allclose(state.w, torch.tensor([-1.28, -3.84], dtype=torch.float64))


def test_state_dict_round_trip_mid_buffer_continues_exactly():
    def make():
        return FedNova(server_opt.SGD(lr=0.5, momentum=0.9), by_n, lr=0.1, mu=1.0, buffer_size=2)

    updates = [upd([1.0, -2.0], 10, 3), upd([0.5, 4.0], 30, 5), upd([-1.0, 1.0], 20, 1), upd([2.0, 2.0], 5, 4)]
    straight, state_a = make(), ServerState(torch.zeros(2, dtype=torch.float64), 0)
    for u in updates:
        straight.submit(state_a, u, state_a.w)
    first, state_b = make(), ServerState(torch.zeros(2, dtype=torch.float64), 0)
    for u in updates[:3]:
        first.submit(state_b, u, state_b.w)
    saved = first.state_dict()
    assert saved["count"] == 1 and saved["server_opt"]  # one update buffered, momentum after one step
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.pending == 1
    resumed.submit(state_b, updates[3], state_b.w)
    assert state_b.version == state_a.version == 2 and torch.equal(state_b.w, state_a.w)


def test_an_update_without_local_steps_is_discarded_and_changes_nothing():
    agg, state = fednova(), ServerState(torch.ones(2, dtype=torch.float64), 0)
    assert agg.submit(state, upd([5.0, 5.0], 10, 0), state.w) == Verdict.DISCARDED
    assert agg.pending == 0 and not agg.flush(state) and state.version == 0
    assert torch.equal(state.w, torch.ones(2, dtype=torch.float64))


def test_reported_steps_are_clamped_to_max_steps():
    # the second client claims 1000 steps: counted as 6, so the round is the first test's
    w = one_round(fednova(max_steps=6), [upd([2.0, 0.0], 10, 2), upd([0.0, 6.0], 30, 1000)])
    assert torch.allclose(w, torch.tensor([-0.25, -2.75], dtype=torch.float64))


def test_stale_updates_beyond_max_staleness_are_discarded():
    agg, state = fednova(max_staleness=1), ServerState(torch.zeros(1, dtype=torch.float64), 5)
    assert agg.submit(state, upd([1.0], 10, 2, base=3), state.w) == Verdict.DISCARDED
    assert agg.pending == 0


def spec(algorithm, scheduler=None, **extra):
    return config.RunSpec.model_validate({"name": "r", "algorithm": algorithm, "scheduler": scheduler or {}, **extra})


def test_config_defaults_sync_and_the_quickstart_fedavg_run_accepts_the_name():
    s = spec({"name": "fednova"})
    assert s.scheduler.mode == "sync" and s.algorithm.mu == 0 and s.algorithm.example_weight == "n"
    assert client_options(s).prox_mu == 0.0 and client_options(spec({"name": "fednova", "mu": 0.2})).prox_mu == 0.2
    cfg = config.load(preset="quickstart", overrides=["runs.fedavg.algorithm.name=fednova"])
    assert cfg.run("fedavg").algorithm.name == "fednova"
    agg = build_aggregator(cfg.run("fedavg"), cfg.trainer.lr)
    assert isinstance(agg, FedNova) and agg.buffer_size is None


@pytest.mark.parametrize(
    "algorithm, scheduler, extra, message",
    [
        ({"name": "fednova"}, {"mode": "async"}, {}, "fednova in async mode needs algorithm.buffer_size"),
        ({"name": "fednova", "aggregation": "median"}, {}, {}, "aggregation"),
        ({"name": "fednova", "partial_weight": "work_fraction"}, {}, {}, "partial_weight"),
        (
            {"name": "fednova"},
            {},
            {"privacy": {"clip_norm": 1.0, "noise_multiplier": 1.0}},
            "privacy is not supported for algorithm 'fednova'",
        ),
    ],
)
def test_config_refuses_what_fednova_does_not_do(algorithm, scheduler, extra, message):
    with pytest.raises(ValueError, match=message):
        spec(algorithm, scheduler, **extra)


def test_proximal_term_too_large_for_the_learning_rate_is_a_config_error():
    with pytest.raises(config.ConfigError, match=r"algorithm.mu with trainer.lr: .*lr x mu < 1"):
        build_aggregator(spec({"name": "fednova", "mu": 10.0}), 0.1)


def test_quickstart_with_fednova_in_fedavgs_place_reaches_085(tmp_path):
    cfg = config.load(preset="quickstart", overrides=["runs.fedavg.algorithm.name=fednova"])
    run_experiment(cfg, tmp_path, runs=["fedavg"])
    (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert run["algorithm"] == "fednova" and run["final_accuracy"] >= 0.85
