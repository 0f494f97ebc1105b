"""Pieces of the Papaya study: Pareto device speeds, the synthetic generator with a
shared model, the study's config block, planning, round-timeout percentile, selection and ratios."""

import warnings

import numpy as np
import pytest
import torch

from asyncfl import config, study
from asyncfl.config import ConfigError, Dist, StudyConfig, StudyRatio
from asyncfl.data.synthetic import SyntheticFederated
from asyncfl.report.ratios import ratios, spread
from asyncfl.sim.population import sample
from asyncfl.study.tuning import _capped


# ------------------------------------------------------------------------------------ Pareto
def test_pareto_scale_is_the_median_and_shape_the_tail_index():
    rng = np.random.default_rng(0)
    for shape in (1.2, 1.5, 3.0):
        v = sample(Dist(kind="pareto", scale=2.0, shape=shape), 400_000, rng).astype(np.float64)
        x_m = 2.0 * 2 ** (-1 / shape)
        assert v.min() >= x_m * (1 - 1e-6)
        assert np.median(v) == pytest.approx(2.0, rel=0.02)
        # survival P(X > x) = (x_m / x)^shape: its log-log slope is -shape
        for x in (2 * x_m, 6 * x_m):
            assert np.mean(v > x) == pytest.approx((x_m / x) ** shape, rel=0.06)
    assert sample(Dist(kind="pareto", scale=1.0, shape=2.0, minimum=5.0), 100, rng).min() >= 5.0
    with pytest.raises(ValueError):
        Dist(kind="pareto", scale=1.0, shape=0)


def test_pareto_is_heavier_tailed_than_lognormal_at_the_same_median():
    rng = np.random.default_rng(1)
    p = sample(Dist(kind="pareto", scale=1.0, shape=1.5), 10**6, rng)
    ln = sample(Dist(kind="lognormal", scale=1.0, sigma=1.0), 10**6, rng)
    assert np.percentile(p, 99.99) > 3 * np.percentile(ln, 99.99)


# -------------------------------------------------------------------- synthetic, shared model
def _fedprox_draws(data: SyntheticFederated, key: list[int], n: int):
    """The FedProx generator written draw by draw, as the docstring states it."""
    rng = np.random.default_rng([data.seed, *key])
    c, f = data.num_classes, data.num_features
    u = rng.normal(0.0, np.sqrt(data.alpha))
    big_b = rng.normal(0.0, np.sqrt(data.beta))
    w = rng.normal(u, 1.0, (c, f))
    b = rng.normal(u, 1.0, c)
    v = rng.normal(big_b, 1.0, f)
    x = v + rng.standard_normal((n, f)) * np.arange(1, f + 1) ** -0.6
    return x, w, b


def test_generator_is_the_fedprox_one_draw_for_draw():
    """One standard-normal block per device gives the values of the paper's six draws, and
    common_model only adds the shared model to the labelling one."""
    kw = dict(num_features=20, num_classes=5, test_size=300, test_devices=30)
    for alpha, beta, lam in ((1.0, 1.0, 0.0), (0.5, 0.25, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 2.0)):
        data = SyntheticFederated(10_000, alpha, beta, 3, common_model=lam, **kw)
        big = int(np.argmax(data.client_sizes()))
        for k in list(range(40)) + [big]:
            n = int(data.client_sizes()[k])
            x, w, b = _fedprox_draws(data, [2, k], n)
            y = np.argmax(x @ (w + lam * data._common_w).T + b + lam * data._common_b, axis=1)
            xd, yd = data.client_data(k)
            assert torch.equal(xd, torch.from_numpy(x.astype(np.float32)))
            assert torch.equal(yd, torch.from_numpy(y))
        x, w, b = _fedprox_draws(data, [3, 0], 10)
        assert torch.equal(data.x_test[:10], torch.from_numpy(x.astype(np.float32)))


def test_common_model_makes_held_out_devices_predictable():
    """Without the shared model the best global predictor is at chance on unseen devices; with
    it, the shared model alone labels most of their examples right, and the features are the
    same draws (only labels change)."""
    kw = dict(test_size=3000, test_devices=300)
    plain = SyntheticFederated(1000, 1.0, 1.0, 0, common_model=0.0, **kw)
    shared = SyntheticFederated(1000, 1.0, 1.0, 0, common_model=2.0, **kw)
    assert plain.common_model_accuracy() < 0.2
    assert 0.55 < shared.common_model_accuracy() < 0.8
    assert torch.equal(plain.x_test, shared.x_test) and not torch.equal(plain.y_test, shared.y_test)
    x0, y0 = shared.client_data(5)
    x1, y1 = SyntheticFederated(1000, 1.0, 1.0, 0, common_model=2.0, **kw).client_data(5)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_config_wires_common_model_and_data_seed(small):
    from asyncfl.build import build_data

    cfg = small(
        sets=[
            "data.dataset=synthetic",
            "data.synthetic.common_model=2",
            "data.synthetic.test_size=200",
            "data.synthetic.test_devices=20",
            "model.name=logreg",
        ]
    )
    data = build_data(cfg)
    assert isinstance(data, SyntheticFederated) and data.common_model == 2.0 and data.seed == cfg.seed
    fixed = [build_data(small(seed=s, sets=["data.dataset=synthetic", "data.seed=7"])) for s in (1, 2)]
    assert fixed[0].seed == fixed[1].seed == 7 and torch.equal(fixed[0].x_test, fixed[1].x_test)
    with pytest.raises(ConfigError, match="common_model"):
        small(sets=["data.synthetic.common_model=-1"])


# ------------------------------------------------------------------------------- study config
def _tree(**study):
    tree = {
        "name": "t",
        "target_accuracy": 0.4,
        "executor": "batched",
        "data": {
            "dataset": "synthetic",
            "seed": 0,
            "synthetic": {"common_model": 2.0, "test_size": 500, "test_devices": 50},
        },
        "model": {"name": "logreg"},
        "population": {
            "devices": 2000,
            "compute_per_example": {"kind": "pareto", "scale": 0.25, "shape": 1.5},
            "dropout": 0.1,
        },
        "trainer": {"lr": 0.1, "batch_size": 10, "local_steps": 5},
        "eval": {"every_seconds": None, "every_versions": 1},
        "stop": {"max_time": 3000, "at_target": True},
        "runs": [
            {"name": "fedavg", "algorithm": {"name": "fedavg"}, "scheduler": {"mode": "sync", "over_selection": 0.3}},
            {
                "name": "fedbuff",
                "algorithm": {
                    "name": "fedbuff",
                    "buffer_size": 5,
                    "server_opt": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
                },
            },
        ],
        "study": {
            "concurrency": [10, 20],
            "seeds": [0, 1],
            "round_timeout_percentile": 95,
            "methods": [
                {"name": "fedavg", "grid": {"trainer.lr": [0.1, 0.3]}},
                {"name": "fedbuff", "grid": {"runs.fedbuff.algorithm.server_opt.lr": [0.3, 1.0]}},
            ],
            "at_concurrency": {20: {"runs.fedbuff.algorithm.buffer_size": 10}},
            "ratios": [{"baseline": "fedavg", "method": "fedbuff"}],
        },
    }
    tree["study"].update(study)
    return tree


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": [{"name": "nope"}], "ratios": []}, "study.methods: 'nope' is not a run"),
        ({"ratios": [{"baseline": "fedavg", "method": "fedasync"}]}, "'fedasync' is not a study method"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"at_concurrency": {30: {"stop.max_time": 5}}}, "no method runs at concurrency 30"),
        ({"concurrency": [0]}, "greater than 0"),
        ({"round_timeout_percentile": 100}, "less than 100"),
        ({"methods": [{"name": "fedavg", "grid": {"trainer.lr": []}}]}, "at least 1 item"),
    ],
)
def test_study_block_is_validated(change, message):
    with pytest.raises(ConfigError, match=message):
        config.validate(_tree(**change))


def test_at_concurrency_keys_from_yaml_and_from_set_merge():
    tree = _tree()
    config.apply_override(tree, "study.at_concurrency.20.stop.max_time=77")
    st = config.validate(tree).study
    assert st.at_concurrency == {20: {"runs.fedbuff.algorithm.buffer_size": 10, "stop": {"max_time": 77}}}


def test_plan_builds_one_validated_config_per_method_concurrency_and_point():
    cfg = config.validate(_tree())
    groups = study.plan(cfg)
    assert [(g.method, g.concurrency, len(g.grid), g.seeds) for g in groups] == [
        ("fedavg", 10, 2, [1]),
        ("fedavg", 20, 2, [1]),
        ("fedbuff", 10, 2, [1]),
        ("fedbuff", 20, 2, [1]),
    ]
    by = {(g.method, g.concurrency): g for g in groups}
    run = by[("fedbuff", 20)].grid[1]
    assert run.point == {"runs.fedbuff.algorithm.server_opt.lr": 1.0} and run.name == "fedbuff-C20-g1"
    r = run.tree["runs"]
    assert len(r) == 1 and r[0]["name"] == "fedbuff-C20-g1" and r[0]["scheduler"]["concurrency"] == 20
    assert r[0]["algorithm"]["buffer_size"] == 10 and r[0]["algorithm"]["server_opt"]["lr"] == 1.0
    assert by[("fedbuff", 10)].grid[0].tree["runs"][0]["algorithm"]["buffer_size"] == 5
    assert run.tree["study"] is None and run.tree["seed"] == 0
    # sync runs get the documented percentile of trip durations as their round timeout
    fa = by[("fedavg", 10)].grid[1].tree
    assert fa["trainer"]["lr"] == 0.3
    timeout = fa["runs"][0]["scheduler"]["round_timeout"]
    assert timeout == pytest.approx(np.percentile(study.trip_durations(config.validate(fa)), 95), rel=1e-2)
    assert r[0]["scheduler"]["round_timeout"] is None  # async


def test_a_bad_grid_value_stops_before_anything_runs():
    tree = _tree(methods=[{"name": "fedavg", "grid": {"runs.fedavg.scheduler.over_selection": [-1]}}], ratios=[])
    with pytest.raises(ConfigError, match=r"method fedavg, concurrency 10.*over_selection"):
        study.plan(config.validate(tree))


def test_trip_durations_follow_the_population():
    cfg = config.validate(_tree())
    single = config.validate(study.run_tree(cfg, cfg.study.methods[0], 10, 0, {}, "x"))
    d = study.trip_durations(single)
    assert d.shape == (2000,) and d.min() > 0
    # 5 steps of min(10, n) examples at a median of 0.25 s per example, plus two 2.4 KB transfers
    assert 5 < np.median(d) < 30


# ------------------------------------------------------------------------- selection, ratios
def _res(t, trips, acc=0.5):
    return {"entry": {"time_to_target": t, "trips_to_target": trips, "best_accuracy": acc}}


def test_choose_least_time_then_trips_then_order():
    assert study.choose([_res(100, 50), _res(90, 80), _res(90, 70), _res(None, None)]) == 2
    assert study.choose([_res(90, 70), _res(90, 70)]) == 0
    assert study.choose([_res(None, None, 0.3), _res(None, None, 0.35)]) == 1


def test_capping_a_grid_point_only_lowers_max_time():
    tree = {"stop": {"max_time": 1000.0}}
    assert _capped(tree, None) == (tree, None)
    capped, cap = _capped(tree, 200.0)
    assert cap == pytest.approx(202.0) and capped["stop"]["max_time"] == cap and tree["stop"]["max_time"] == 1000.0
    assert _capped(tree, 999.0) == (tree, None)


def _final(t, trips, nbytes):
    return {
        "entry": {
            "time_to_target": t,
            "trips_to_target": trips,
            "bytes_to_target": nbytes,
            "reached_target": t is not None,
        }
    }


def test_ratios_per_seed_and_their_spread():
    st = StudyConfig(
        concurrency=[10, 100],
        seeds=[0, 1, 2],
        methods=[{"name": "a"}, {"name": "b"}],
        ratios=[StudyRatio(baseline="a", method="b")],
    )
    finals = {
        ("a", 10, 0): _final(500, 1000, 4000),
        ("b", 10, 0): _final(100, 125, 500),
        ("a", 10, 1): _final(600, 900, 3600),
        ("b", 10, 1): _final(200, 300, 1200),
        ("a", 10, 2): _final(None, None, None),
        ("b", 10, 2): _final(50, 60, 240),
        ("a", 100, 0): _final(10, 10, 10),  # b never ran at 100: no block
    }
    (block,) = ratios(st, finals)
    assert block["concurrency"] == 10 and block["baseline"] == "a" and block["method"] == "b"
    assert [r["time"] for r in block["per_seed"]] == [5.0, 3.0, None]
    assert block["per_seed"][2] == {
        "seed": 2,
        "baseline_reached": False,
        "method_reached": True,
        "time": None,
        "trips": None,
        "bytes": None,
    }
    assert block["time"]["mean"] == 4.0 and block["time"]["n"] == 2
    assert block["time"]["std"] == pytest.approx(np.std([5, 3], ddof=1))
    assert (block["time"]["min"], block["time"]["max"]) == (3.0, 5.0)
    assert block["time"]["geomean"] == pytest.approx(np.sqrt(15))
    assert block["trips"]["mean"] == pytest.approx((8 + 3) / 2) and block["bytes"]["mean"] == pytest.approx(5.5)
    assert block["seeds_both_reached"] == 2
    assert spread([])["mean"] is None


def test_table_cells_format_the_spread_over_seeds():
    from asyncfl.report.study import _pm, _stat

    assert _stat([None, 1.0, 3.0], ".1f") == "2.0 ± 1.4" and _stat([None], ".1f") == "—"
    assert _stat([2.5], ".2f") == "2.50"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _stat([0.0, 0.0], ".0f") == "0 ± 0" and spread([0.0, 2.0])["geomean"] == 0.0
    assert _pm(spread([3.0, 5.0])) == "4.00x ± 1.41 (3.00–5.00)"


def test_seed_flag_is_refused_for_a_study(tmp_path, capsys):
    from asyncfl.cli import main

    assert main(["compare", "--preset", "papaya", "--seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "study.seeds" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
