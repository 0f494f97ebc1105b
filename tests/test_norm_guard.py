"""The norm guard alone, and as the simulator's option (off by default)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from asyncfl import config
from asyncfl.algorithms.norm_guard import NormGuard, initial_bound
from asyncfl.experiment import build_simulation
from tests.test_server_inputs import experiment


def test_guard_warmup_bound_then_median_multiple():
    g = NormGuard(multiple=4.0, window=3, warmup=2, bound0=100.0)
    assert g.check(100.0) is None and "absolute bound 100" in g.check(100.5)
    for norm in (1.0, 3.0):
        g.accept(norm)
    assert g.bound() == 8.0  # 4 x median(1, 3)
    assert g.check(8.0) is None and "median of the last 2" in g.check(8.1)
    assert g.check(math.inf) is not None and g.check(math.nan) is not None
    for norm in (5.0, 7.0):  # the window keeps the last 3: (3, 5, 7)
        g.accept(norm)
    assert g.bound() == 20.0
    g.accept(1000.0)  # the absolute bound stays in force: 4 x median(5, 7, 1000) = 28, min with 100
    g.accept(1000.0)
    assert g.bound() == 100.0
    assert g.status() == {"bound": 100.0, "warming_up": False, "accepted": 6, "rejected": 4}


def test_guard_state_round_trip_and_initial_bound():
    g = NormGuard(3.0, 5, 1, 50.0)
    for norm in (2.0, 4.0, 6.0):
        g.accept(norm)
    g.check(1e9)
    h = NormGuard(3.0, 5, 1, 50.0)
    h.load_state_dict(g.state_dict())
    assert h.status() == g.status() and h.bound() == 12.0
    assert initial_bound(torch.tensor([3.0, 4.0]), 10.0) == 50.0
    assert initial_bound(torch.zeros(4), 10.0) == 10.0  # a model starting at zero: the floor of 1
    with pytest.raises(ValueError):
        NormGuard(1.0, 5, 1, 1.0)


def test_simulator_guard_is_off_by_default_and_refuses_like_the_server():
    cfg = experiment({"name": "fedbuff", "buffer_size": 2}, {"mode": "async", "concurrency": 4})
    cfg = cfg.model_copy(update={"stop": cfg.stop.model_copy(update={"max_trips": 24})})
    spec = cfg.runs[0]
    assert spec.norm_guard is None and build_simulation(cfg, spec).norm_guard is None
    plain = build_simulation(cfg, spec)
    plain.run()
    guarded = build_simulation(cfg, spec.model_copy(update={"norm_guard": config.NormGuardConfig()}))
    guarded.run()  # honest clients: nothing refused, the same model
    assert guarded.norm_guard.rejected == 0 and guarded.norm_guard.accepted > 10
    assert torch.equal(plain.state.w, guarded.state.w)
    tight = build_simulation(
        cfg, spec.model_copy(update={"norm_guard": config.NormGuardConfig(multiple=1.01, warmup=2, window=2)})
    )
    m = tight.run()
    assert tight.norm_guard.rejected > 0 and m.discarded >= tight.norm_guard.rejected


def test_warmup_judges_against_the_median_of_every_norm_seen():
    """Before `warmup` accepted updates the reference is the median of all finite norms seen,
    refused ones included: attackers among the first arrivals cannot let each other in."""
    g = NormGuard(multiple=5.0, window=10, warmup=5, bound0=1000.0)
    assert g.check(1.0) is None  # the first update: the absolute bound alone
    g.accept(1.0)
    assert "median of the 1 norms seen while warming up" in g.check(8.0)  # 5 x median(1) = 5
    assert g.check(1.2) is None  # 5 x median(1, 8) = 22.5
    g.accept(1.2)
    assert g.check(9.0) is not None  # 5 x median(1, 8, 1.2) = 6: refused, and seen
    assert g.check(math.nan) is not None and g.status()["bound"] == pytest.approx(5 * 4.6)  # nan is not seen
    for norm in (0.9, 1.1, 1.0):
        assert g.check(norm) is None
        g.accept(norm)
    assert not g.status()["warming_up"] and g.bound() == 5.0  # now the accepted window: median 1.0
    h = NormGuard(5.0, 10, 5, 1000.0)
    h.load_state_dict({k: v for k, v in g.state_dict().items() if k != "seen"})  # state from before `seen`
    assert h.bound() == g.bound()


def test_default_guard_holds_fedbuff_and_fedavg_against_sign_flips(tmp_path):
    """The byzantine preset's claim at its smallest: 20 % sign-flip x10 attackers destroy both
    algorithms undefended; behind the default guard both stay within a few points of no attack,
    and the synchronous rounds keep their pace (refused reports count towards the cohort)."""
    tree = config.preset_dict("byzantine")
    tree.pop("robustness"), tree.pop("quick")
    tree["seed"], tree["stop"]["max_time"] = 1, 400
    results = {}
    for run in ("fedbuff", "fedavg"):
        for attack in (None, {"fraction": 0.2, "kind": "sign_flip", "factor": 10}):
            for guard in (None, {}):
                t = json.loads(json.dumps(tree))
                t["runs"] = [
                    r | ({"norm_guard": guard} if guard is not None else {}) for r in t["runs"] if r["name"] == run
                ]
                if attack:
                    t["population"]["attack"] = attack
                cfg = config.validate(t)
                m = build_simulation(cfg, cfg.runs[0]).run()
                results[(run, attack is not None, guard is not None)] = (m.rows[-1]["test_accuracy"], m.server_steps)
    for run in ("fedbuff", "fedavg"):
        clean, steps = results[(run, False, True)]
        assert results[(run, True, False)][0] < 0.2
        attacked, attacked_steps = results[(run, True, True)]
        assert attacked > clean - 0.05 and clean > 0.85
        # sync: rounds keep their pace; async: a buffer fills with accepted updates, ~80 % of them
        assert attacked_steps >= (0.9 if run == "fedavg" else 0.7) * steps
