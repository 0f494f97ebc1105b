import numpy as np
import pytest
import torch

from asyncfl.config import Availability, Dist, PopulationConfig
from asyncfl.data import digits
from asyncfl.data.partition import partition
from asyncfl.models import FlatModel, build_model
from asyncfl.sim.population import Population, sample, trip_timing

LABELS = np.repeat(np.arange(10), 50)  # 500 examples, 10 classes


def check_cover(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == n and len(np.unique(flat)) == n  # disjoint and complete
    assert min(len(p) for p in parts) > 0


def test_iid_is_balanced():
    parts = partition("iid", LABELS, 20, seed=0)
    check_cover(parts, 500)
    assert {len(p) for p in parts} == {25}


def test_dirichlet_small_alpha_concentrates_labels():
    few = partition("dirichlet", LABELS, 20, seed=0, alpha=0.1)
    many = partition("dirichlet", LABELS, 20, seed=0, alpha=100.0)
    check_cover(few, 500)
    check_cover(many, 500)

    def mean_classes(parts):
        return np.mean([len(np.unique(LABELS[p])) for p in parts])

    assert mean_classes(few) < 4 < 8 < mean_classes(many)


def test_shards_give_k_classes():
    parts = partition("shards", LABELS, 25, seed=0, classes_per_client=2)
    check_cover(parts, 500)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 2


def test_quantity_skew_is_power_law():
    parts = partition("quantity_skew", LABELS, 50, seed=0, exponent=1.5)
    check_cover(parts, 500)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 100 and sizes[0] == 1


def test_digits_split_is_stratified_and_scaled():
    x, y, xt, yt, classes = digits.load(0.2, seed=0)
    assert classes == 10 and len(yt) == 360 and len(y) == 1437
    assert float(x.max()) <= 1.0 and x.dtype == torch.float32
    assert set(yt.tolist()) == set(range(10))


@pytest.mark.parametrize("name,kw", [("logreg", {}), ("mlp", {"hidden": (16, 8)}), ("cnn", {"width": 4})])
def test_models_run_on_flat_vectors(name, kw):
    model = FlatModel(build_model(name, 64, 10, **kw))
    w = model.initial_weights()
    assert w.shape == (model.numel,)
    assert model.forward(w, torch.rand(5, 64)).shape == (5, 10)
    acc, loss = model.evaluate(w, torch.rand(7, 64), torch.randint(0, 10, (7,)))
    assert 0 <= acc <= 1 and loss > 0


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 64, 10)


def test_distributions_have_the_documented_scale():
    rng = np.random.default_rng(0)
    assert np.median(sample(Dist(kind="lognormal", scale=2.0, sigma=1.0), 100_000, rng)) == pytest.approx(2.0, rel=0.03)
    assert np.mean(sample(Dist(kind="exponential", scale=3.0), 100_000, rng)) == pytest.approx(3.0, rel=0.03)
    half = sample(Dist(kind="halfnormal", scale=1.0), 100_000, rng)
    assert half.min() >= 0 and np.mean(half) == pytest.approx(np.sqrt(2 / np.pi), rel=0.03)
    assert set(sample(Dist(kind="constant", scale=0.5, minimum=0.7), 10, rng)) == {np.float32(0.7)}


def test_million_device_population_is_small_and_picks_idle_eligible_devices():
    cfg = PopulationConfig(devices=1_000_000, availability=Availability(period=100.0, on_fraction=0.5))
    pop = Population(cfg, np.random.SeedSequence(0))
    nbytes = sum(
        a.nbytes for a in (pop.compute_per_example, pop.download_bandwidth, pop.upload_bandwidth, pop.phase, pop.busy)
    )
    assert nbytes < 20 * 2**20
    rng = np.random.default_rng(1)
    chosen = pop.pick(10_000, t=30.0, rng=rng)
    assert len(np.unique(chosen)) == 10_000 and pop.available(chosen, 30.0).all()
    pop.busy[chosen] = True
    again = pop.pick(10_000, t=30.0, rng=rng)
    assert not pop.busy[again].any()
    assert pop.available(np.arange(1_000_000), 30.0).mean() == pytest.approx(0.5, abs=0.01)


def test_pick_returns_fewer_when_few_are_eligible():
    pop = Population(PopulationConfig(devices=10), np.random.SeedSequence(0))
    pop.busy[:7] = True
    assert sorted(pop.pick(5, 0.0, np.random.default_rng(0))) == [7, 8, 9]


def test_trip_timing_for_one_device_is_the_population_formula_bit_for_bit():
    pop = Population(PopulationConfig(devices=1000), np.random.SeedSequence(3))
    rng = np.random.default_rng(4)
    steps, per_step = rng.integers(1, 50, 1000), rng.integers(1, 33, 1000)
    down, up = 123_457, 45_679
    every = pop.trip_durations(steps.astype(np.float64), per_step.astype(np.float64), down, up)
    for d in rng.choice(1000, 50, replace=False).tolist():
        c, bw_down, bw_up = (
            float(a[d]) for a in (pop.compute_per_example, pop.download_bandwidth, pop.upload_bandwidth)
        )
        download, step_time, duration = trip_timing(c, bw_down, bw_up, int(steps[d]), int(per_step[d]), down, up)
        assert duration == every[d]
        assert download == down / bw_down and step_time == c * int(per_step[d])
        assert duration == pytest.approx(down / bw_down + int(steps[d] * per_step[d]) * c + up / bw_up, rel=1e-12)


def test_simulated_trips_last_what_the_population_says(small):
    from asyncfl.experiment import build_simulation

    cfg = small(sets=["runs.fedbuff.compression={upload: int8, download: fp16}", "stop.max_time=30"])
    sim = build_simulation(cfg, cfg.run("fedbuff"))
    trips, submit = [], sim.executor.submit
    sim.executor.submit = lambda trip: (trips.append(trip), submit(trip))[1]
    sim.run()
    sizes = [int(sim.client_sizes[d % sim.num_clients]) for d in range(sim.population.size)]
    steps = np.array([sim.trainer.num_steps(n) for n in sizes], dtype=np.float64)
    per_step = np.array([sim.trainer.examples_per_step(n) for n in sizes], dtype=np.float64)
    every = sim.population.trip_durations(steps, per_step, sim.download_bytes, sim.upload_bytes)
    assert len(trips) > 10 and sim.upload_bytes < sim.download_bytes < 4 * sim.state.w.numel()
    for trip in trips:
        assert trip.end == trip.start + every[trip.device]
