"""The one client step: hand-computed values, the gradient correction, the local epoch budget
and the start loss, in both executors."""

import math

import numpy as np
import pytest
import torch
from conftest import digits_clients

from asyncfl.algorithms.client_step import ClientStep
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.models import FlatModel, build_model
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import SequentialExecutor, TrainJob


@pytest.fixture(scope="module")
def data():
    return digits_clients(40)


def mlp(data):
    torch.manual_seed(0)
    return FlatModel(build_model("mlp", data.num_features, data.num_classes, hidden=(16,)))


def test_step_on_a_quadratic_with_correction_prox_and_mask():
    """grad = w - t: the step is w - lr (w - t + c + mu (w - s)), and a zero rate leaves w."""
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    c = torch.tensor([[0.25, -0.5], [1.0, 1.0]])
    s = torch.tensor([2.0, 0.0])  # both clients' start model
    lr, mu = torch.tensor([0.5, 0.0]), 0.1
    params = [w.clone()]
    loss, first = ClientStep(prox_mu=mu)(
        params, lambda p, slot: ([p[0] - t], (p[0] - t).pow(2).sum(1) / 2), 0, lr, starts=[(0, 2, [s])], correction=[c]
    )
    expected0 = w[0] - 0.5 * (w[0] - t[0] + c[0] + mu * (w[0] - s))
    assert torch.allclose(params[0][0], expected0) and torch.equal(params[0][1], w[1])
    assert torch.allclose(loss, torch.tensor([2.125, 4.0])) and loss is first


def test_trainer_step_with_correction_is_gradient_plus_correction():
    torch.manual_seed(1)
    model = FlatModel(build_model("logreg", 4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    w0 = model.initial_weights()
    c = torch.randn(model.numel)
    tr = LocalTrainer(model, 0.3, batch_size=6, local_steps=1)
    wg = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.loss(wg, x, y), wg)  # one batch of all six examples
    u = tr.train(w0, x, y, seed=0, correction=c)
    assert torch.allclose(u.delta, 0.3 * (g + c), atol=1e-6)
    assert not torch.allclose(u.delta, tr.train(w0, x, y, seed=0).delta)


@pytest.mark.parametrize("meta", [None, "hf"])
def test_correction_sequential_equals_batched(data, meta):
    model = mlp(data)
    tr = LocalTrainer(model, 0.1, 16, local_steps=5, prox_mu=0.05, meta=meta, meta_lr=0.05)
    w0 = model.initial_weights()
    gen = torch.Generator().manual_seed(3)
    jobs = [
        TrainJob(
            k,
            k % data.num_clients,
            k % 2,
            w0 + 0.01 * (k % 2),
            50 + k,
            1 + k % 5,
            correction=None if k % 3 == 0 else 0.1 * torch.randn(model.numel, generator=gen),
        )
        for k in range(30)
    ]
    seq, bat = SequentialExecutor(tr, data), BatchedExecutor(tr, data, memory_mb=2.0)
    for ex in (seq, bat):
        for j in jobs:
            ex.submit(TrainJob(j.job_id, j.client, j.base_version, j.base_w, j.seed, j.steps, correction=j.correction))
    for k in range(30):
        u, v = seq.result(k), bat.result(k)
        assert torch.allclose(u.delta, v.delta, atol=1e-5, rtol=1e-4)
        assert u.loss == pytest.approx(v.loss, abs=1e-5)
    plain = LocalTrainer(model, 0.1, 16, local_steps=5, prox_mu=0.05, meta=meta, meta_lr=0.05)
    x, y = data.client_data(jobs[1].client)
    assert not torch.allclose(
        plain.train(jobs[1].base_w, x, y, seed=jobs[1].seed, steps=jobs[1].steps).delta,
        tr.train(jobs[1].base_w, x, y, seed=jobs[1].seed, steps=jobs[1].steps, correction=jobs[1].correction).delta,
    )


# ---- local_epochs: E passes over the client's data --------------------------------------------
def epochs_trainer(epochs, meta=None):
    return LocalTrainer(FlatModel(build_model("logreg", 2, 2)), 0.1, batch_size=16, local_epochs=epochs, meta=meta)


@pytest.mark.parametrize("n,steps", [(2, 5), (5, 5), (16, 5), (20, 10), (32, 10), (48, 15)])
def test_epochs_are_full_passes_over_the_data(n, steps):
    """B = 16, E = 5, as the reference FedAvg loop: every epoch is ceil(n / 16) batches (a client
    smaller than the batch reads all its examples in one), so every example is seen 5 times."""
    tr = epochs_trainer(5.0)
    assert tr.num_steps(n) == steps
    idx, sizes = tr.batch_indices(n, steps, seed=7), tr.batch_sizes(n, steps)
    seen = np.bincount(np.concatenate([row[:s] for row, s in zip(idx, sizes)]), minlength=n)
    assert (seen == 5).all()


def test_fractional_epochs_round_up_and_meta_steps_count_their_batches():
    assert epochs_trainer(1.5).num_steps(32) == 3  # 48 examples
    assert epochs_trainer(0.1).num_steps(3) == 1  # at least one step
    assert epochs_trainer(2.0, meta="fo").num_steps(32) == 2  # 2 batches a step: 64 examples
    assert epochs_trainer(2.0, meta="hf").num_steps(4) == 1  # 3 batches of all 4 examples >= 2 epochs


def test_small_clients_epoch_budget_same_in_both_executors(data):
    model = mlp(data)
    tr = LocalTrainer(model, 0.1, 16, local_epochs=3.0)
    sizes = data.client_sizes()
    small = [int(k) for k in np.flatnonzero(sizes < 16)[:3]] + [int(k) for k in np.flatnonzero(sizes >= 16)[:3]]
    assert len(small) == 6
    w0 = model.initial_weights()
    seq, bat = SequentialExecutor(tr, data), BatchedExecutor(tr, data)
    for ex in (seq, bat):
        for i, c in enumerate(small):
            ex.submit(TrainJob(i, c, 0, w0, 9 + i, tr.num_steps(int(sizes[c]))))
    for i, c in enumerate(small):
        u, v = seq.result(i), bat.result(i)
        assert u.steps == v.steps == u.planned_steps == v.planned_steps
        if sizes[c] < 16:
            assert u.steps == 3
        assert torch.allclose(u.delta, v.delta, atol=2e-6, rtol=1e-4)


# ---- start loss: q-FedAvg's F_k ------------------------------------------------------------------
def test_full_start_loss_is_the_mean_loss_over_all_examples_by_hand():
    model = FlatModel(build_model("logreg", 2, 2))
    w = torch.tensor([1.0, -2.0, 0.5, 0.5, 0.0, 1.0])  # weight [[1, -2], [0.5, 0.5]], bias [0, 1]
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    logits = [[1.0, 1.5], [-2.0, 1.5], [0.0, 2.5]]
    by_hand = np.mean([math.log(sum(math.exp(v) for v in z)) - z[c] for z, c in zip(logits, [0, 1, 1])])
    for mode in ("full", "first_batch", "none"):
        u = LocalTrainer(model, 0.1, batch_size=2, local_steps=1, start_loss=mode).train(w, x, y, seed=0)
        if mode == "full":
            assert u.start_loss == pytest.approx(by_hand, rel=1e-6)
        elif mode == "first_batch":  # two of the three examples
            first = LocalTrainer(model, 0.1, 2, local_steps=1).batch_indices(3, 1, 0)[0]
            assert u.start_loss == pytest.approx(float(model.loss(w, x[first], y[first])), rel=1e-6)
            assert u.start_loss != pytest.approx(by_hand, rel=1e-3)
        else:
            assert math.isnan(u.start_loss)


def test_full_start_loss_sequential_equals_batched(data):
    model = mlp(data)
    tr = LocalTrainer(model, 0.1, 16, local_steps=3, start_loss="full")
    w0 = model.initial_weights()
    jobs = [TrainJob(k, k % data.num_clients, k % 3, w0 + 0.02 * (k % 3), 70 + k, 3) for k in range(25)]
    seq, bat = SequentialExecutor(tr, data), BatchedExecutor(tr, data, memory_mb=2.0)
    for ex in (seq, bat):
        for j in jobs:
            ex.submit(TrainJob(j.job_id, j.client, j.base_version, j.base_w, j.seed, j.steps))
    for j in jobs:
        u, v = seq.result(j.job_id), bat.result(j.job_id)
        x, y = data.client_data(j.client)
        assert u.start_loss == pytest.approx(float(model.loss(j.base_w, x, y)), rel=1e-5)
        assert v.start_loss == pytest.approx(u.start_loss, rel=1e-5)
        assert torch.allclose(u.delta, v.delta, atol=2e-6, rtol=1e-4)
