"""Any torch module in the batched executor: the generic torch.func path equals the sequential
executor to float tolerance, and modules it cannot batch fall back with one notice saying why."""

import pytest
import torch
from custom_modules import CASES, WithDropout
from torch import nn

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.models import FlatModel
from asyncfl.sim.batched import BatchedExecutor, make_executor
from asyncfl.sim.executor import SequentialExecutor, TrainJob
from asyncfl.sim.kernels import FuncKernel
from asyncfl.sim.unfused import unfused


def trainer_for(name: str):
    module_factory, data_factory, _ = CASES[name]
    torch.manual_seed(0)
    data = data_factory()
    return LocalTrainer(FlatModel(module_factory()), 0.1, 16, local_steps=4, prox_mu=0.01), data


def jobs_for(trainer, data, count=24):
    w0 = trainer.model.initial_weights()
    return [TrainJob(k, k % data.num_clients, k % 2, w0 + 0.01 * (k % 2), 50 + k, 1 + k % 4) for k in range(count)]


@pytest.mark.parametrize("name", list(CASES))
def test_batched_equals_sequential_or_falls_back_with_the_reason(name):
    trainer, data = trainer_for(name)
    notices = []
    ex = make_executor("batched", trainer, data, notify=notices.append)
    batched = CASES[name][2]
    assert isinstance(ex, BatchedExecutor) == batched
    if batched:
        assert notices == [] and isinstance(ex.kernel, FuncKernel)
    else:
        assert len(notices) == 1 and "\n" not in notices[0] and "using sequential" in notices[0]
        assert type(trainer.model.module).__name__ in notices[0]
        assert ("BatchNorm1d" if name == "batchnorm" else "Dropout") in notices[0]
    seq = SequentialExecutor(trainer, data)
    jobs = jobs_for(trainer, data)
    for e in (seq, ex):
        for j in jobs:
            e.submit(TrainJob(j.job_id, j.client, j.base_version, j.base_w, j.seed, j.steps))
    got = {k: ex.result(k) for k in reversed(range(len(jobs)))}  # another order than submitted
    for k in range(len(jobs)):
        want = seq.result(k)
        assert torch.allclose(got[k].delta, want.delta, atol=2e-6, rtol=1e-4), name
        assert got[k].loss == pytest.approx(want.loss, abs=1e-5)
        assert got[k].delta.abs().max() > 0
    ws = [trainer.model.initial_weights(), jobs[1].base_w]
    for (a, la), (b, lb) in zip(
        ex.evaluate_many(ws, data.x_test, data.y_test), seq.evaluate_many(ws, data.x_test, data.y_test)
    ):
        assert a == b and la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("layers", [1, 2])
def test_unfused_recurrent_layers_equal_the_fused_ones(cell, layers):
    torch.manual_seed(1)
    rnn = cell(5, 7, num_layers=layers, batch_first=False)
    x = torch.randn(6, 3, 5)
    want, want_state = rnn(x)
    with unfused(rnn):
        got, got_state = rnn(x)
    assert torch.allclose(got, want, atol=1e-6)
    for a, b in zip(torch.utils._pytree.tree_leaves(got_state), torch.utils._pytree.tree_leaves(want_state)):
        assert torch.allclose(a, b, atol=1e-6)
    assert "forward" not in vars(rnn)  # the class's fused forward is back


def test_dropout_masks_follow_the_job_seed_not_the_order_of_training():
    """Sequential training seeds torch's generator from the job's seed: a job gives the same
    update whenever it trains, two seeds give different masks, evaluation runs without dropout."""
    torch.manual_seed(0)
    trainer = LocalTrainer(FlatModel(WithDropout()), 0.1, 8, local_steps=3)
    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    w0 = trainer.model.initial_weights()
    first = trainer.train(w0, x, y, seed=1).delta
    torch.rand(5)  # the global generator moves on
    trainer.train(w0, x, y, seed=2)
    assert torch.equal(trainer.train(w0, x, y, seed=1).delta, first)
    assert not torch.equal(trainer.train(w0, x, y, seed=2).delta, first)
    assert trainer.model.evaluate(w0, x, y) == trainer.model.evaluate(w0, x, y)
    assert trainer.model.module.training  # evaluation restored the training mode
