import numpy as np
import pytest
import torch

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.models import FlatModel, build_model


@pytest.fixture
def task():
    torch.manual_seed(0)
    model = FlatModel(build_model("logreg", 5, 3))
    x = torch.randn(12, 5)
    y = torch.randint(0, 3, (12,))
    return model, x, y


def grad(model, w, x, y):
    wg = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.loss(wg, x, y), wg)
    return g


def test_proximal_term_changes_the_result_as_the_formula_says(task):
    model, x, y = task
    w0 = model.initial_weights()
    lr, mu, seed = 0.5, 2.0, 3
    plain = LocalTrainer(model, lr, batch_size=4, local_steps=2).train(w0, x, y, seed=seed)
    prox = LocalTrainer(model, lr, batch_size=4, local_steps=2, prox_mu=mu).train(w0, x, y, seed=seed)
    idx = LocalTrainer(model, lr, batch_size=4, local_steps=2).batch_indices(12, 2, seed)
    # step 1 starts at w0, where the proximal gradient mu (w - w0) is zero
    w1 = w0 - lr * grad(model, w0, x[idx[0]], y[idx[0]])
    w2_plain = w1 - lr * grad(model, w1, x[idx[1]], y[idx[1]])
    w2_prox = w2_plain - lr * mu * (w1 - w0)
    assert torch.allclose(plain.delta, w0 - w2_plain, atol=1e-6)
    assert torch.allclose(prox.delta, w0 - w2_prox, atol=1e-6)
    assert not torch.allclose(plain.delta, prox.delta)


def test_update_reports_examples_steps_and_loss(task):
    model, x, y = task
    u = LocalTrainer(model, 0.1, batch_size=5, local_epochs=2.0).train(
        model.initial_weights(), x, y, seed=0, client_id=4, base_version=9
    )
    assert (u.client_id, u.base_version, u.n_examples, u.steps) == (4, 9, 12, 6)  # 2 epochs of ceil(12 / 5) batches
    assert u.loss > 0


def test_minibatch_order_is_a_function_of_the_seed():
    t = LocalTrainer(FlatModel(build_model("logreg", 2, 2)), 0.1, batch_size=4, local_steps=7)
    a, b, c = t.batch_indices(10, 7, 1), t.batch_indices(10, 7, 1), t.batch_indices(10, 7, 2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # every epoch visits every example once
    flat = a.reshape(-1)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_epoch_permutations_are_uniform_and_independent():
    """Over many seeds, every example is equally likely at every position, and the second
    epoch's order does not follow the first's."""
    t = LocalTrainer(FlatModel(build_model("logreg", 2, 2)), 0.1, batch_size=6, local_steps=2)
    orders = np.stack([t.batch_indices(6, 2, s).reshape(-1) for s in range(6000)])  # two epochs
    counts = np.stack([np.bincount(orders[:, p], minlength=6) for p in range(12)])
    assert np.abs(counts - 1000).max() < 5 * np.sqrt(1000 * 5 / 6)  # 5 sigma of a binomial
    same_first = (orders[:, 0] == orders[:, 6]).mean()
    assert abs(same_first - 1 / 6) < 0.03


def test_small_client_uses_all_its_examples_per_step():
    t = LocalTrainer(FlatModel(build_model("logreg", 2, 2)), 0.1, batch_size=16, local_steps=3)
    assert t.batch_indices(5, 3, 0).shape == (3, 5)


def test_training_lowers_the_local_loss(task):
    model, x, y = task
    w0 = model.initial_weights()
    u = LocalTrainer(model, 0.5, batch_size=12, local_steps=30).train(w0, x, y, seed=0)
    assert float(model.loss(w0 - u.delta, x, y)) < float(model.loss(w0, x, y)) - 0.1


def test_budget_must_be_steps_or_epochs():
    with pytest.raises(ValueError, match="exactly one"):
        LocalTrainer(FlatModel(build_model("logreg", 2, 2)), 0.1, 4, local_steps=2, local_epochs=1.0)


def test_models_with_buffers_are_refused():
    with pytest.raises(ValueError, match="buffers"):
        FlatModel(torch.nn.BatchNorm1d(4))
