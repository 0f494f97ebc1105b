"""`local_epochs` as the reference FedAvg loop takes them: per epoch a fresh permutation cut into
ceil(n / B) batches, the last one short, each step the mean loss over its own batch."""

import math

import numpy as np
import pytest
import torch

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.experiment import build_simulation
from asyncfl.models import FlatModel, build_model


def trainer(epochs, batch_size=16, meta=None, model=None):
    model = model or FlatModel(build_model("logreg", 2, 2))
    return LocalTrainer(model, 0.1, batch_size, local_epochs=epochs, meta=meta)


def epochs_of(tr, n, batches, seed=3):
    """The real (unpadded) batches of the sequence, as lists of example indices."""
    idx, sizes = tr.batch_indices(n, batches, seed), tr.batch_sizes(n, batches)
    return [row[:s].tolist() for row, s in zip(idx, sizes)]


@pytest.mark.parametrize(
    "n,b,e,steps", [(2, 16, 5, 5), (5, 16, 5, 5), (16, 16, 5, 5), (20, 16, 5, 10), (32, 16, 5, 10), (33, 16, 2, 6)]
)
def test_steps_are_epochs_times_batches_per_epoch(n, b, e, steps):
    assert trainer(float(e), b).num_steps(n) == steps


@pytest.mark.parametrize("n,b,e", [(2, 16, 5), (20, 16, 5), (33, 16, 2), (7, 3, 3), (48, 16, 1), (1, 4, 2)])
def test_every_epoch_is_a_permutation_so_each_example_is_seen_e_times(n, b, e):
    tr = trainer(float(e), b)
    batches = epochs_of(tr, n, tr.num_steps(n))
    per_epoch = math.ceil(n / b)
    assert len(batches) == e * per_epoch
    for k in range(e):
        assert sorted(sum(batches[k * per_epoch : (k + 1) * per_epoch], [])) == list(range(n))
    if e > 1 and n > 2:  # fresh permutations
        assert batches[:per_epoch] != batches[per_epoch : 2 * per_epoch]


def test_batch_sizes_of_an_epoch_end_short():
    tr = trainer(5.0)
    assert tr.batch_sizes(20, 10).tolist() == [16, 4] * 5
    assert tr.batch_sizes(33, 6).tolist() == [16, 16, 1] * 2
    assert tr.batch_sizes(5, 3).tolist() == [5, 5, 5]
    assert [len(batch) for batch in epochs_of(tr, 20, 10)] == [16, 4] * 5


def test_fractional_epochs_take_the_first_batches_of_one_more_epoch():
    assert trainer(1.5).num_steps(20) == 3  # 2 batches + ceil(0.5 * 2)
    assert trainer(1.5).batch_sizes(20, 3).tolist() == [16, 4, 16]
    assert trainer(1.1, 10).num_steps(100) == 11  # 10 + ceil(0.1 * 10), not 12 by float noise
    assert trainer(0.25, 10).num_steps(100) == 3  # ceil(2.5)
    assert trainer(0.01).num_steps(20) == 1
    tr = trainer(1.5, 10)  # the extra batches continue the sequence of whole epochs
    assert epochs_of(tr, 25, 5) == epochs_of(trainer(2.0, 10), 25, 6)[:5]


def test_per_fedavg_steps_read_consecutive_batches_of_the_sequence():
    assert trainer(1.0, meta="fo").num_steps(20) == 1  # batches 16, 4
    assert trainer(2.0, meta="hf").num_steps(20) == 2  # 4 batches, 3 a step
    assert trainer(1.0, meta="hf").num_steps(33) == 1
    # compute: hf takes two gradients on a step's third batch; steps 16+4+2*16 and 4+16+2*4
    assert trainer(2.0, meta="hf").examples_per_step(20) == pytest.approx((52 + 28) / 2)


@pytest.mark.parametrize("n,e", [(2, 5.0), (20, 5.0), (33, 2.0), (20, 1.5), (48, 3.0)])
def test_a_trips_compute_is_its_batches_examples(n, e):
    tr = trainer(e)
    steps = tr.num_steps(n)
    assert steps * tr.examples_per_step(n) == pytest.approx(tr.batch_sizes(n, steps).sum(), rel=1e-12)
    if e == int(e):
        assert steps * tr.examples_per_step(n) == pytest.approx(e * n, rel=1e-12)


def test_local_steps_mode_keeps_full_batches_and_its_counts():
    tr = LocalTrainer(FlatModel(build_model("logreg", 2, 2)), 0.1, 16, local_steps=7)
    assert tr.num_steps(20) == 7 and tr.examples_per_step(20) == 16 and tr.examples_per_step(5) == 5
    assert tr.batch_sizes(20, 7).tolist() == [16] * 7


@pytest.mark.parametrize("n,b", [(5, 16), (16, 16), (32, 16)])
def test_epochs_equal_the_steps_stream_when_no_batch_is_short(n, b):
    """With n <= B or B dividing n both modes cut the same permutations the same way."""
    steps = LocalTrainer(None, 0.1, b, local_steps=6)
    epochs = LocalTrainer(None, 0.1, b, local_epochs=3.0)
    assert np.array_equal(epochs.batch_indices(n, 6, 11), steps.batch_indices(n, 6, 11))


def test_partial_work_is_a_prefix_of_the_sequence():
    tr = trainer(3.0)
    assert epochs_of(tr, 37, 4) == epochs_of(tr, 37, 9)[:4]


def softmax_grad(w, xs, ys):
    """Mean cross-entropy and its gradient for a 1-feature, 2-class softmax regression, by the
    formula dz_c = p_c - [c = y]: w = (W0, W1, b0, b1)."""
    loss, g = 0.0, [0.0] * 4
    for x, y in zip(xs, ys):
        z = [w[0] * x + w[2], w[1] * x + w[3]]
        top = max(z)
        s = sum(math.exp(v - top) for v in z)
        p = [math.exp(v - top) / s for v in z]
        loss -= math.log(p[y])
        for c in range(2):
            dz = p[c] - (c == y)
            g[c] += dz * x
            g[2 + c] += dz
    return loss / len(xs), [v / len(xs) for v in g]


def test_one_epoch_with_a_short_last_batch_by_hand():
    """n = 3, B = 2: batches of 2 and 1; the second step is the gradient of the one example
    (mean over the short batch), not half of it."""
    model = FlatModel(build_model("logreg", 1, 2))
    xs, ys = [1.0, 2.0, -1.0], [0, 1, 1]
    lr, seed = 0.5, 4
    tr = LocalTrainer(model, lr, 2, local_epochs=1.0)
    assert tr.num_steps(3) == 2
    first, second = epochs_of(tr, 3, 2, seed)
    assert len(first) == 2 and len(second) == 1 and sorted(first + second) == [0, 1, 2]
    w = [0.3, -0.2, 0.1, 0.0]
    losses = []
    for batch in (first, second):
        loss, g = softmax_grad(w, [xs[i] for i in batch], [ys[i] for i in batch])
        losses.append(loss)
        w = [a - lr * d for a, d in zip(w, g)]
    w0 = torch.tensor([0.3, -0.2, 0.1, 0.0])
    u = tr.train(w0, torch.tensor(xs).view(3, 1), torch.tensor(ys), seed=seed)
    assert u.steps == u.planned_steps == 2
    assert torch.allclose(w0 - u.delta, torch.tensor(w), atol=1e-6)
    assert u.loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert u.start_loss == pytest.approx(losses[0], rel=1e-5)


def test_simulated_trips_take_the_epochs_compute_time(small):
    """A trip's compute is E n examples at the device's seconds per example."""
    cfg = small(sets=["trainer.local_steps=null", "trainer.local_epochs=2", "stop.max_time=40"])
    sim = build_simulation(cfg, cfg.run("fedbuff"))
    started = []
    sim.trace = lambda event, trip: started.append(trip) if event == "start" else None
    sim.run()
    assert started
    pop, sizes = sim.population, sim.data.client_sizes()
    short = 0
    for trip in started:
        n = int(sizes[trip.client])
        short += n % 16 != 0 and n > 16
        compute = float(pop.compute_per_example[trip.device]) * 2 * n
        assert trip.steps == 2 * math.ceil(n / 16)
        assert trip.steps * trip.step_time == pytest.approx(compute, rel=1e-6)
    assert short  # some trips had short batches


def test_partial_epochs_work_same_in_both_executors(small):
    """Stragglers cut at a round deadline train the first batches of their epoch sequence:
    the same trips, steps and models with either executor."""
    runs = [
        {
            "name": "fedprox",
            "algorithm": {"name": "fedprox", "mu": 0.05},
            "scheduler": {"concurrency": 8, "round_timeout": 8, "straggler": "partial"},
        }
    ]
    results = []
    for ex in ("sequential", "batched"):
        sets = ["trainer.local_steps=null", "trainer.local_epochs=2", "stop.max_time=60"]
        cfg = small(seed=3, runs=runs, executor=ex, sets=sets)
        sim = build_simulation(cfg, cfg.run("fedprox"))
        cut, set_steps = [], sim.executor.set_steps
        sim.executor.set_steps = lambda job, steps, c=cut, f=set_steps: c.append((job, steps)) or f(job, steps)
        m = sim.run()
        results.append((cut, m.completed, m.server_steps, sim.state.w.clone()))
    (c1, n1, s1, w1), (c2, n2, s2, w2) = results
    assert c1 == c2 and n1 == n2 and s1 == s2 > 0
    assert any(steps % 2 for _, steps in c1)  # 2 epochs plan an even count: odd ones were cut
    assert torch.allclose(w1, w2, atol=1e-5, rtol=1e-4)
