"""Central DP wired into aggregation and the simulator: clipping, calibrated noise, epsilon."""

import csv
import json
import math

import dp_accounting
import pytest
import torch

from asyncfl import config, privacy
from asyncfl.algorithms.private import DPMechanism, PrivateAggregator
from asyncfl.algorithms.server_opt import SGD
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict
from asyncfl.cli import main
from asyncfl.experiment import build_simulation, run_experiment


def update(client, delta, base_version=0):
    return ClientUpdate(client_id=client, base_version=base_version, delta=delta, n_examples=10, steps=5, loss=1.0)


def private(k=4, sigma=1.0, clip=1.0, **kw):
    mechanism = DPMechanism(clip_norm=clip, noise_multiplier=sigma, denominator=k, sample_rate=0.1, **kw)
    return PrivateAggregator(SGD(1.0, 0.0), lambda u, d: 1.0, mechanism, buffer_size=k)


# ---------------------------------------------------------------- the aggregator alone


def test_noise_on_the_average_has_std_sigma_c_over_k():
    n, k, sigma, c = 40_000, 5, 2.0, 0.5
    agg = private(k, sigma, c, seed=3)
    state = ServerState(torch.zeros(n))
    for i in range(k):
        verdict = agg.submit(state, update(i, torch.zeros(n)), state.w)
    assert verdict == Verdict.STEPPED and state.version == 1
    moved = state.w  # zero updates: the step is the noise alone, -(noise / K)
    assert abs(moved.mean().item()) < 4 * sigma * c / k / math.sqrt(n)
    assert moved.std().item() == pytest.approx(sigma * c / k, rel=0.03)
    assert agg.privacy_report()["noise_std_per_step"] == pytest.approx(sigma * c / k)


def test_updates_are_clipped_and_without_noise_averaged_exactly():
    agg = private(k=2, sigma=0.0, clip=1.0)
    state = ServerState(torch.zeros(3))
    agg.submit(state, update(0, torch.tensor([3.0, 4.0, 0.0])), state.w)  # norm 5 -> clipped to 1
    agg.submit(state, update(1, torch.tensor([0.0, 0.0, 0.5])), state.w)  # within the bound
    assert torch.allclose(state.w, -torch.tensor([0.6, 0.8, 0.5]) / 2)
    assert agg.epsilon() is None and agg.privacy_report()["epsilon"] is None


def test_one_update_per_user_per_aggregate_and_bounded_weights():
    agg = private(k=3, sigma=1.0)
    state = ServerState(torch.zeros(4))
    assert agg.submit(state, update(7, torch.ones(4)), state.w) == Verdict.BUFFERED
    assert agg.submit(state, update(7, torch.ones(4)), state.w) == Verdict.DISCARDED
    mechanism = DPMechanism(clip_norm=1.0, noise_multiplier=1.0, denominator=2, sample_rate=0.1)
    heavy = PrivateAggregator(SGD(1.0), lambda u, d: float(u.n_examples), mechanism, buffer_size=2)
    with pytest.raises(ValueError, match="outside"):
        heavy.submit(state, update(1, torch.ones(4)), state.w)


def test_accountant_steps_once_per_noisy_aggregate_and_state_roundtrips():
    agg = private(k=2, sigma=1.1, delta=1e-5)
    state = ServerState(torch.zeros(8))
    for i in range(10):
        agg.submit(state, update(i, torch.randn(8)), state.w)
    assert agg.noisy_steps == 5 == agg.accountant.steps
    assert agg.epsilon() == pytest.approx(privacy.epsilon(1.1, 0.1, 5, 1e-5))
    twin = private(k=2, sigma=1.1)
    twin.load_state_dict(agg.state_dict())
    s1, s2 = ServerState(state.w.clone(), 5), ServerState(state.w.clone(), 5)
    for i in range(2):
        agg.submit(s1, update(i, torch.ones(8)), s1.w)
        twin.submit(s2, update(i, torch.ones(8)), s2.w)
    assert torch.equal(s1.w, s2.w) and twin.epsilon() == agg.epsilon()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"denominator": 0}, "denominator must be a positive number"),
        ({"noise_multiplier": -0.5}, "noise multiplier must be >= 0"),
        ({"adaptive": privacy.AdaptiveClipping(1.0, count_noise_std=0.0)}, "needs count_noise_std > 0"),
    ],
)
def test_mechanism_settings_are_checked_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        DPMechanism(**{"clip_norm": 1.0, "noise_multiplier": 1.0, "denominator": 2, "sample_rate": 0.1, **settings})


def test_aggregators_sharing_a_mechanism_adapt_their_own_clip_norm():
    start = privacy.AdaptiveClipping(1.0, learning_rate=0.5, expected_count=2, count_noise_std=0.3)
    mechanism = DPMechanism(clip_norm=1.0, noise_multiplier=0.5, denominator=2, sample_rate=0.1, adaptive=start)
    moved, idle = (PrivateAggregator(SGD(1.0), lambda u, d: 1.0, mechanism, buffer_size=2) for _ in range(2))
    state = ServerState(torch.zeros(4))
    for i in range(2):
        moved.submit(state, update(i, torch.full((4,), 10.0)), state.w)  # norm 20: both clipped, C grows
    assert moved.clip_norm > 1.0
    assert idle.clip_norm == idle.adaptive.clip_norm == start.clip_norm == mechanism.clip_norm == 1.0


# ---------------------------------------------------------------- in the simulator


def dp_config(small, privacy_yaml, run="fedbuff", extra=()):
    return small(sets=["executor=batched", "stop.max_time=100", f"runs.{run}.privacy={privacy_yaml}", *extra])


def final_model(cfg, run="fedbuff"):
    sim = build_simulation(cfg, cfg.run(run))
    m = sim.run()
    return sim, m


def test_noise_is_added_in_a_run(small):
    """Same experiment, different noise seeds: different models; same noise seed: identical;
    without noise the noise seed changes nothing (so the difference is the noise)."""
    w = {}
    for sigma in (0.0, 1.0):
        for seed in (1, 2, 1):
            sim, _ = final_model(
                dp_config(
                    small,
                    f"{{clip_norm: 1.0, noise_multiplier: {sigma}, noise_seed: {seed}}}",
                    extra=["stop.max_time=40"],
                )
            )
            w.setdefault(sigma, []).append(sim.state.w)
    assert torch.equal(w[0.0][0], w[0.0][1])
    assert not torch.equal(w[1.0][0], w[1.0][1])
    assert torch.equal(w[1.0][0], w[1.0][2])


def test_run_noise_variance_matches_sigma_c_over_k(small):
    """With a tiny clip norm the model moves by the noise alone: after T steps of plain SGD
    (lr 1) each coordinate has moved by a sum of T draws of N(0, (sigma C / K)^2)."""
    sigma, c, k = 10.0, 1e-3, 4
    cfg = dp_config(small, f"{{clip_norm: {c}, noise_multiplier: {sigma}}}", extra=["stop.max_time=60"])
    sim, m = final_model(cfg)
    t = m.extra["privacy_steps"]
    assert t == m.server_steps > 5
    moved = sim.state.w - sim.model.initial_weights()
    expected = math.sqrt(t) * sigma * c / k
    assert moved.std().item() == pytest.approx(expected, rel=0.1)


def test_epsilon_in_summary_metrics_and_plot(small, tmp_path):
    cfg = dp_config(small, "{clip_norm: 1.0, noise_multiplier: 1.0, delta: 1.0e-4}", extra=["stop.max_time=60"])
    summary = run_experiment(cfg, tmp_path, runs=["fedbuff"])
    (r,) = summary["runs"]
    q = 4 / 40  # K / N: buffer size over users
    assert r["sample_rate"] == pytest.approx(q) and r["noise_multiplier"] == 1.0 and r["delta"] == 1e-4
    assert r["privacy_steps"] == r["server_steps"] > 0
    assert r["epsilon"] == pytest.approx(privacy.epsilon(1.0, q, r["server_steps"], 1e-4), rel=1e-12)
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["epsilon"] == r["epsilon"]
    rows = list(csv.DictReader(open(tmp_path / "fedbuff" / "metrics.csv")))
    eps = [float(x["epsilon"]) for x in rows]
    assert eps[0] == 0.0 and eps == sorted(eps) and eps[-1] == pytest.approx(r["epsilon"])
    assert (tmp_path / "epsilon_vs_time.png").read_bytes()[:4] == b"\x89PNG"


def test_fedavg_round_noise_and_adaptive_clipping(small):
    cfg = dp_config(
        small,
        "{clip_norm: 5.0, noise_multiplier: 0.5, adaptive: {target_quantile: 0.5}}",
        run="fedavg",
        extra=["stop.max_time=60"],
    )
    sim, m = final_model(cfg, "fedavg")
    s = m.summary(0.8)
    assert s["sample_rate"] == pytest.approx(8 / 40)  # cohort / users
    assert s["privacy_steps"] == s["server_steps"] > 2
    assert s["clip_norm"] < 5.0  # update norms are far below 5: the clip norm came down
    assert s["epsilon"] == pytest.approx(privacy.epsilon(0.5, 0.2, s["server_steps"], 1e-5))


@pytest.mark.parametrize(
    "sets,message",
    [
        (
            ["runs.1.algorithm={name: fedasync}", "runs.1.privacy={clip_norm: 1, noise_multiplier: 1}"],
            "privacy is not supported for algorithm 'fedasync'",
        ),
        (
            ["runs.fedbuff.algorithm.example_weight=n", "runs.fedbuff.privacy={clip_norm: 1, noise_multiplier: 1}"],
            "algorithm.example_weight 'n' is not covered by privacy",
        ),
        (
            ["runs.fedbuff.algorithm.normalize=weight", "runs.fedbuff.privacy={clip_norm: 1, noise_multiplier: 1}"],
            "algorithm.normalize 'weight' is not covered",
        ),
        (
            ["runs.fedbuff.algorithm.clip_norm=2", "runs.fedbuff.privacy={clip_norm: 1, noise_multiplier: 1}"],
            "algorithm.clip_norm: with privacy",
        ),
        (
            ["runs.fedavg.algorithm.aggregation=median", "runs.fedavg.privacy={clip_norm: 1, noise_multiplier: 1}"],
            "algorithm.aggregation 'median' is not covered",
        ),
        (
            ["runs.fedbuff.privacy={clip_norm: 1, noise_multiplier: 1, adaptive: {}}"],  # K=4: sigma_b 0.2
            "privacy.adaptive.count_noise_std",
        ),
        (["runs.fedbuff.privacy={clip_norm: 1, noise_multiplier: -1}"], "runs.1.privacy.noise_multiplier"),
        (["runs.fedbuff.privacy={clip_norm: 1, noise_multiplier: 1, delta: 2}"], "runs.1.privacy.delta"),
        (["runs.fedbuff.privacy={noise_multiplier: 1}"], "runs.1.privacy.clip_norm: Field required"),
    ],
)
def test_privacy_config_errors(small, sets, message):
    with pytest.raises(config.ConfigError) as err:
        small(sets=sets)
    assert message in str(err.value)


# ---------------------------------------------------------------- command line


def reference_epsilon(sigma, q, steps, delta):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,steps,delta", [(1.1, 0.01, 1000, 1e-5), (0.8, 0.1, 170, 1e-3), (4.0, 1.0, 10, 1e-6)])
def test_cli_epsilon_matches_dp_accounting(capsys, sigma, q, steps, delta):
    rc = main(
        [
            "privacy",
            "epsilon",
            "--noise-multiplier",
            str(sigma),
            "--sample-rate",
            str(q),
            "--steps",
            str(steps),
            "--delta",
            str(delta),
        ]
    )
    assert rc == 0
    printed = float(capsys.readouterr().out.strip())
    assert printed == pytest.approx(reference_epsilon(sigma, q, steps, delta), rel=1e-9)


def test_cli_epsilon_rejects_bad_input(capsys):
    assert (
        main(
            ["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "3", "--delta", "1e-5"]
        )
        == 2
    )
    assert "sample rate must be in (0, 1]" in capsys.readouterr().err


def test_privacy_preset_quick_reports_epsilon(tmp_path):
    assert main(["compare", "--preset", "privacy", "--quick", "--out", str(tmp_path)]) == 0
    runs = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    assert runs["fedbuff"]["epsilon"] is None
    dp = runs["dp_fedbuff"]
    assert dp["sample_rate"] == pytest.approx(20 / 200) and dp["privacy_steps"] == dp["server_steps"] > 0
    assert dp["epsilon"] == pytest.approx(privacy.epsilon(1.0, 0.1, dp["server_steps"], 1e-5))
    assert (tmp_path / "epsilon_vs_time.png").exists()


@pytest.mark.slow
def test_privacy_preset_reaches_the_documented_accuracy(tmp_path):
    """README: dp_fedbuff reaches 0.90 (at epsilon ~9) and ends near 0.92 with epsilon ~19."""
    run_experiment(config.load(preset="privacy"), tmp_path)
    dp = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}["dp_fedbuff"]
    assert dp["time_to_target"] is not None and dp["final_accuracy"] >= 0.9
    assert 15 < dp["epsilon"] < 25
