"""Device profiles computed on demand: pure functions of (seed, device id), the same bits one
device at a time and many at once, the distributions the arrays draw, and a population of
10^8 devices that costs nothing until its devices train."""

from __future__ import annotations

import time

import numpy as np
import pytest

from asyncfl.config import Dist, PopulationConfig
from asyncfl.sim.population import Population
from asyncfl.sim.profiles import _uniform, _uniforms


def test_one_device_and_many_give_the_same_bits_and_uniforms():
    ids = np.arange(0, 10**8, 9973)
    many = _uniforms(0xC0FFEE, ids)
    assert np.array_equal(many[:500], [_uniform(0xC0FFEE, int(i)) for i in ids[:500]])
    assert 0 < many.min() and many.max() < 1
    assert abs(many.mean() - 0.5) < 0.005 and abs(12 * many.var() - 1) < 0.02
    assert not np.array_equal(many, _uniforms(0xC0FFEF, ids))  # another key, other numbers


@pytest.mark.parametrize(
    "dist, median",
    [
        (Dist(kind="lognormal", scale=0.05, sigma=1.0), 0.05),
        (Dist(kind="pareto", scale=0.25, shape=1.5), 0.25),
        (Dist(kind="exponential", scale=2.0), 2.0 * np.log(2)),
        (Dist(kind="halfnormal", scale=1.0), 0.6745),
    ],
)
def test_on_demand_draws_the_arrays_distributions(dist, median):
    cfg = PopulationConfig(devices=40_000, compute_per_example=dist)
    arrays = Population(cfg, np.random.SeedSequence(3)).compute_per_example
    lazy = Population(cfg.model_copy(update={"profiles": "on_demand"}), np.random.SeedSequence(3)).compute_per_example
    values = lazy[np.arange(40_000)]
    assert values.dtype == np.float32 and lazy.item(17) == values[17]
    assert np.median(values) == pytest.approx(median, rel=0.03)
    assert np.median(arrays) == pytest.approx(np.median(values), rel=0.03)
    assert np.quantile(arrays, 0.9) == pytest.approx(np.quantile(values, 0.9), rel=0.05)


def test_a_hundred_million_devices_cost_their_busy_flags():
    cfg = PopulationConfig(devices=10**8, availability={"on_fraction": 0.5}, attack={"fraction": 0.2})
    assert cfg.on_demand() and not cfg.model_copy(update={"devices": 10**7}).on_demand()
    t0 = time.perf_counter()
    pop = Population(cfg, np.random.SeedSequence(0))
    assert time.perf_counter() - t0 < 1.0
    again = Population(cfg, np.random.SeedSequence(0))
    assert pop.download_bandwidth.item(98_765_432) == again.download_bandwidth.item(98_765_432)
    picked = pop.pick(2000, 0.0, np.random.default_rng(1))
    assert len(set(picked)) == 2000 and all(0 <= d < 10**8 for d in picked)
    assert pop.available(np.array(picked), 0.0).all()  # picked devices are eligible now
    share = np.mean([pop.malicious[d] for d in range(0, 10**8, 10**4)])
    assert share == pytest.approx(0.2, abs=0.02)
