"""The batched executor must give the sequential executor's results, to float tolerance."""

import numpy as np
import pytest
import torch
from conftest import digits_clients
from torch import nn

from asyncfl.algorithms.shuffle import minibatches, mix
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.data import digits
from asyncfl.data.federated import FederatedDataset
from asyncfl.experiment import build_simulation
from asyncfl.models import FlatModel, build_model
from asyncfl.sim.batched import BatchedExecutor, make_executor
from asyncfl.sim.executor import SequentialExecutor, TrainJob
from asyncfl.sim.kernels import FuncKernel


@pytest.fixture(scope="module")
def data():
    return digits_clients(60)


def mlp_trainer(data, mu=0.05, **kw):
    torch.manual_seed(0)
    model = FlatModel(build_model("mlp", data.num_features, data.num_classes, hidden=(32,)))
    return LocalTrainer(model, 0.1, 16, prox_mu=mu, **kw)


def both(trainer, data, jobs, force_generic=False, memory_mb=4.0):
    seq, bat = SequentialExecutor(trainer, data), BatchedExecutor(trainer, data, memory_mb=memory_mb)
    if force_generic:
        bat.kernel = FuncKernel(trainer.model)
    for ex in (seq, bat):
        for j in jobs:
            ex.submit(TrainJob(j.job_id, j.client, j.base_version, j.base_w, j.seed, j.steps))
    return seq, bat


def assert_same(u, v, tol=2e-6):
    assert (u.client_id, u.base_version, u.n_examples, u.steps, u.planned_steps) == (
        v.client_id,
        v.base_version,
        v.n_examples,
        v.steps,
        v.planned_steps,
    )
    assert torch.allclose(u.delta, v.delta, atol=tol, rtol=1e-4)
    assert u.loss == pytest.approx(v.loss, abs=1e-5)
    assert u.start_loss == pytest.approx(v.start_loss, abs=1e-5)


@pytest.mark.parametrize("force_generic", [False, True])
def test_per_client_equal_with_prox_mixed_steps_and_small_clients(data, force_generic):
    tr = mlp_trainer(data, local_steps=6)
    assert (data.client_sizes() < 16).any() and (data.client_sizes() >= 16).any()
    w0 = tr.model.initial_weights()
    jobs = [TrainJob(k, k % data.num_clients, k % 3, w0 + 0.01 * (k % 3), 100 + k, 1 + k % 7) for k in range(90)]
    seq, bat = both(tr, data, jobs, force_generic)
    order = list(range(89, -1, -1))  # ask in another order than submitted
    got = {k: bat.result(k) for k in order}
    assert bat.passes >= 2  # the small memory budget chunked the pool
    for k in order:
        assert_same(got[k], seq.result(k))


@pytest.mark.parametrize("meta", ["fo", "hf"])
@pytest.mark.parametrize("force_generic", [False, True])
def test_per_fedavg_meta_steps_equal(data, meta, force_generic):
    tr = mlp_trainer(data, mu=0.0, local_steps=4, meta=meta, meta_lr=0.05)
    w0 = tr.model.initial_weights()
    jobs = [TrainJob(k, k % data.num_clients, k % 2, w0 + 0.01 * (k % 2), 300 + k, 1 + k % 4) for k in range(40)]
    seq, bat = both(tr, data, jobs, force_generic)
    for k in range(40):
        assert_same(bat.result(k), seq.result(k), tol=1e-5)  # HF's finite difference amplifies rounding


# ---- local_epochs: batch sizes vary by step (an epoch's last batch is short) ---------------------
@pytest.fixture(scope="module")
def sized():
    """Clients around B = 16: smaller, equal, larger and not a multiple, multiples."""
    x, y, xt, yt, c = digits.load(0.2, 0)
    sizes = [1, 3, 7, 16, 17, 20, 33, 32, 48, 5]
    ends = np.cumsum(sizes)
    return FederatedDataset(x, y, [np.arange(e - s, e) for s, e in zip(sizes, ends)], xt, yt, c)


def epochs_jobs(tr, data, count, seed):
    """Jobs of every client; every third one partial (fewer steps than planned)."""
    w0 = tr.model.initial_weights()
    sizes = data.client_sizes()
    jobs = []
    for k in range(count):
        c = k % data.num_clients
        steps = tr.num_steps(int(sizes[c]))
        jobs.append(TrainJob(k, c, k % 2, w0 + 0.01 * (k % 2), seed + k, max(1, steps - 1) if k % 3 == 0 else steps))
    return jobs


@pytest.mark.parametrize("epochs", [1.0, 2.0, 1.5, 0.3])
@pytest.mark.parametrize("force_generic", [False, True])
def test_local_epochs_equal_with_short_batches(sized, epochs, force_generic):
    tr = mlp_trainer(sized, local_epochs=epochs)
    jobs = epochs_jobs(tr, sized, 30, 500)
    seq, bat = both(tr, sized, jobs, force_generic)
    for j in jobs:
        u = seq.result(j.job_id)
        assert_same(bat.result(j.job_id), u)
        assert u.planned_steps == tr.num_steps(int(sized.client_sizes()[j.client]))


@pytest.mark.parametrize("meta", ["fo", "hf"])
@pytest.mark.parametrize("force_generic", [False, True])
def test_per_fedavg_with_local_epochs_equal(sized, meta, force_generic):
    tr = mlp_trainer(sized, mu=0.0, local_epochs=2.0, meta=meta, meta_lr=0.05)
    jobs = epochs_jobs(tr, sized, 20, 800)
    seq, bat = both(tr, sized, jobs, force_generic)
    for j in jobs:
        assert_same(bat.result(j.job_id), seq.result(j.job_id), tol=1e-5)


def test_local_epochs_full_start_loss_equal(sized):
    tr = mlp_trainer(sized, local_epochs=1.5, start_loss="full")
    jobs = epochs_jobs(tr, sized, 10, 900)
    seq, bat = both(tr, sized, jobs)
    for j in jobs:
        assert_same(bat.result(j.job_id), seq.result(j.job_id))


def test_partial_steps_cancel_and_late_submits(data):
    tr = mlp_trainer(data, local_steps=8)
    w0 = tr.model.initial_weights()
    jobs = [TrainJob(k, k, 0, w0, 7 + k, 8) for k in range(20)]
    seq, bat = both(tr, data, jobs)
    assert_same(bat.result(0), seq.result(0))  # trains the whole pool
    assert bat.trained == 20
    for k in (3, 4):  # already trained with 8 steps: lowering steps retrains them
        seq.set_steps(k, 3)
        bat.set_steps(k, 3)
    bat.cancel(5)
    seq.cancel(5)
    with pytest.raises(KeyError):
        bat.result(5)
    late = TrainJob(99, 1, 1, w0 * 0.5, 1234, 8)
    for ex in (seq, bat):
        ex.submit(TrainJob(late.job_id, late.client, late.base_version, late.base_w, late.seed, late.steps))
    for k in [1, 2, 3, 4, 6, 99]:
        u, v = bat.result(k), seq.result(k)
        assert_same(u, v)
        assert u.steps == (3 if k in (3, 4) else 8)
    assert seq.pending.keys() == bat.pending.keys() | bat.done.keys()


def test_vectorised_minibatches_equal_the_trainers_order():
    """The batched executor asks for all jobs' orders at once; each must be the trainer's."""
    tr = LocalTrainer(None, 0.1, 16, local_steps=10)
    rng = np.random.default_rng(0)
    ns, st = rng.integers(1, 3000, 300), rng.integers(1, 25, 300)
    ns[:100] = rng.integers(1, 40, 100)  # many small clients next to a few large ones
    seeds = rng.integers(0, 2**63, 300)
    bs = np.minimum(16, ns)
    got = minibatches(ns, st, bs, mix(seeds.astype(np.uint64)))
    for k, (n, s, d) in enumerate(zip(ns.tolist(), st.tolist(), seeds.tolist())):
        assert np.array_equal(got[:s, k, : bs[k]], tr.batch_indices(n, s, d))
        assert not got[s:, k].any() and not got[:, k, bs[k] :].any()  # padding is zero


def test_batched_evaluation_equals_sequential(data):
    tr = mlp_trainer(data, local_steps=2)
    w0 = tr.model.initial_weights()
    ws = [w0 + 0.05 * k for k in range(5)]
    seq = SequentialExecutor(tr, data).evaluate_many(ws, data.x_test, data.y_test)
    bat = BatchedExecutor(tr, data).evaluate_many(ws, data.x_test, data.y_test)
    for (a1, l1), (a2, l2) in zip(seq, bat):
        assert a1 == pytest.approx(a2, abs=1e-9) and l1 == pytest.approx(l2, rel=1e-5)


def test_whole_run_same_accuracy_curve(small):
    """Same trips, versions and models to float tolerance. Accuracy is a step function of the
    model, so a test example whose top two logits are closer than the float noise may go either
    way: every accuracy difference must be such near ties, in the very snapshots evaluated."""
    runs = [
        {"name": "fedbuff", "algorithm": {"name": "fedbuff", "buffer_size": 4}, "scheduler": {"concurrency": 10}},
        {
            "name": "fedprox",
            "algorithm": {"name": "fedprox", "mu": 0.05},
            "scheduler": {"concurrency": 8, "round_timeout": 15, "straggler": "partial"},
        },
        {
            "name": "fednova",
            "algorithm": {"name": "fednova", "mu": 0.05},
            "scheduler": {"concurrency": 8, "round_timeout": 15, "straggler": "partial"},
        },
    ]
    for run in ("fedbuff", "fedprox", "fednova"):
        curves = []
        for ex in ("sequential", "batched"):
            cfg = small(seed=2, runs=runs, executor=ex, sets=["population.dropout=0.1", "stop.max_time=150"])
            sim = build_simulation(cfg, cfg.run(run))
            assert type(sim.executor).__name__ == {"sequential": "SequentialExecutor", "batched": "BatchedExecutor"}[ex]
            snapshots = []
            evaluate = sim.executor.evaluate_many
            sim.executor.evaluate_many = lambda ws, x, y, s=snapshots, e=evaluate: s.extend(ws) or e(ws, x, y)
            m = sim.run()
            curves.append(
                (
                    m,
                    [(r["virtual_time"], r["version"], r["trips_completed"]) for r in m.rows],
                    np.array([r["test_accuracy"] for r in m.rows]),
                    snapshots,
                    sim,
                )
            )
        (m1, k1, a1, s1, sim), (m2, k2, a2, s2, _) = curves
        assert k1 == k2 and m1.completed == m2.completed and m1.server_steps == m2.server_steps
        assert len(s1) == len(s2) == len(a1)
        x, y = sim.data.x_test, sim.data.y_test
        for w1, w2, acc1, acc2 in zip(s1, s2, a1, a2):
            assert torch.allclose(w1, w2, atol=1e-5, rtol=1e-4)
            margins = [(t := sim.model.forward(w, x).topk(2, dim=1).values)[:, 0] - t[:, 1] for w in (w1, w2)]
            near_ties = (margins[0] < 1e-4) | (margins[1] < 1e-4)
            assert round(abs(acc1 - acc2) * len(y)) <= int(near_ties.sum())
        assert a1[-1] > a1[0]


def test_scaffold_run_same_models_and_control_variates(small):
    """SCAFFOLD's corrections (c - c_i, per trip) go through both executors alike: the same
    trips and versions, and models, c and every device's c_i equal to float tolerance."""
    runs = [
        {
            "name": "scaffold",
            "algorithm": {"name": "scaffold"},
            "scheduler": {"concurrency": 8, "round_timeout": 15, "straggler": "partial"},
        }
    ]
    sims = []
    for ex in ("sequential", "batched"):
        cfg = small(seed=2, runs=runs, executor=ex, sets=["population.dropout=0.1", "stop.max_time=150"])
        sim = build_simulation(cfg, cfg.run("scaffold"))
        snapshots = []
        evaluate = sim.executor.evaluate_many
        sim.executor.evaluate_many = lambda ws, x, y, s=snapshots, e=evaluate: s.extend(ws) or e(ws, x, y)
        m = sim.run()
        sims.append((sim, m, [(r["virtual_time"], r["version"], r["trips_completed"]) for r in m.rows], snapshots))
    (s1, m1, k1, w1), (s2, m2, k2, w2) = sims
    assert type(s2.executor).__name__ == "BatchedExecutor"
    assert k1 == k2 and m1.completed == m2.completed and m1.server_steps == m2.server_steps > 3
    assert len(w1) == len(w2) and all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(w1, w2))
    assert s1.aggregator.control.norm() > 0
    assert torch.allclose(s1.aggregator.control, s2.aggregator.control, atol=1e-5, rtol=1e-4)
    assert sorted(s1.client_state) == sorted(s2.client_state) and len(s1.client_state) > 8
    for device, c in s1.client_state.items():
        assert torch.allclose(c, s2.client_state[device], atol=1e-4, rtol=1e-4)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = self.fc(x)
        return out * 2 if float(out.mean()) > 0 else out  # python control flow on values: not vmappable


def test_unvectorisable_models_fall_back_with_a_notice(data):
    module = WithBuffer()
    model = FlatModel(module)
    module.register_buffer("running_mean", torch.zeros(10))  # FlatModel checks at construction only
    notices = []
    ex = make_executor("batched", LocalTrainer(model, 0.1, 16, local_steps=2), data, notify=notices.append)
    assert isinstance(ex, SequentialExecutor)
    assert len(notices) == 1 and "\n" not in notices[0] and "buffers" in notices[0] and "sequential" in notices[0]

    notices.clear()
    ex = make_executor(
        "batched", LocalTrainer(FlatModel(DataDependent()), 0.1, 16, local_steps=2), data, notify=notices.append
    )
    assert isinstance(ex, SequentialExecutor)
    assert len(notices) == 1 and "torch.func" in notices[0]

    assert isinstance(
        make_executor("batched", mlp_trainer(data, local_steps=2), data, notify=notices.append), BatchedExecutor
    )


def test_waiting_updates_stop_sharing_their_pass_tensor(data):
    """Rows of a pass share one tensor until three quarters are taken; the stragglers then get
    their own storage, so they do not keep the whole pass alive, and keep their values."""
    tr = mlp_trainer(data, local_steps=2)
    w0 = tr.model.initial_weights()
    jobs = [TrainJob(k, k, 0, w0, 40 + k, 2) for k in range(20)]
    seq, bat = both(tr, data, jobs, memory_mb=512.0)
    first = bat.result(0)
    assert bat.passes == 1
    pass_storage = first.delta.untyped_storage().data_ptr()
    ((deltas, waiting, _),) = bat._slabs.values()
    assert deltas.untyped_storage().data_ptr() == pass_storage and waiting == set(range(1, 20))
    for k in range(1, 16):
        got = bat.result(k)
        assert got.delta.untyped_storage().data_ptr() == pass_storage
        assert_same(got, seq.result(k))
    own = [bat.done[k][1].delta.untyped_storage().data_ptr() for k in range(16, 20)]
    assert len(set(own) | {pass_storage}) == 5  # four separate storages, none the pass's
    for k in range(16, 20):
        assert_same(bat.result(k), seq.result(k))
    assert not bat._slabs and not bat._slab_of


def test_a_pass_reuses_delta_memory_only_when_nothing_references_it(data):
    """Finished passes' delta tensors are recycled, but never while an update handed out still
    views them: the updates a caller keeps keep their values."""
    tr = mlp_trainer(data, local_steps=2)
    w0 = tr.model.initial_weights()
    bat = BatchedExecutor(tr, data, memory_mb=512.0)

    def one_pass(first_id, base):
        for k in range(8):
            bat.submit(TrainJob(first_id + k, k, 0, base, 40 + first_id + k, 2))
        return [bat.result(first_id + k) for k in range(8)]

    kept = one_pass(0, w0)
    values = [u.delta.clone() for u in kept]
    storage = kept[0].delta.untyped_storage().data_ptr()
    second = one_pass(100, w0 + 0.01)
    assert second[0].delta.untyped_storage().data_ptr() != storage  # the first pass's rows are still held
    assert all(torch.equal(u.delta, v) for u, v in zip(kept, values))
    del kept, values
    third = one_pass(200, w0 - 0.01)
    assert third[0].delta.untyped_storage().data_ptr() == storage  # released: recycled
    del third
    fourth = one_pass(300, w0 + 0.02)
    assert fourth[0].delta.untyped_storage().data_ptr() == storage  # and again: a reused buffer stays reusable


def test_sync_rounds_leave_the_trips_they_will_cancel_untrained(small):
    """A round closes at its cohort's reports: the over-selected trips due after them are not
    trained ahead, since the round cancels them (fedavg here: cohort 8, 10 selected)."""
    cfg = small(executor="batched")
    sim = build_simulation(cfg, cfg.run("fedavg"))
    m = sim.run()
    assert m.server_steps > 5 and m.cancelled >= 2 * (m.server_steps - 1)
    # every trained update was used, except those of the round open at the stop
    assert m.completed <= sim.executor.trained <= m.completed + 8


def test_jobs_not_expected_to_report_train_only_when_asked_and_then_together(data):
    """Jobs marked as not reporting stay out of passes until one is asked for; that pass takes
    all the others too (when one unexpected result is needed, more usually follow)."""
    tr = mlp_trainer(data, local_steps=2)
    w0 = tr.model.initial_weights()
    seq, bat = both(tr, data, [TrainJob(k, k, 0, w0, 40 + k, 2) for k in range(10)], memory_mb=512.0)
    for k in range(6, 10):
        bat.pending[k].reports = False
    assert_same(bat.result(0), seq.result(0))
    assert bat.trained == 6 and set(bat.pending) == {6, 7, 8, 9}
    assert_same(bat.result(8), seq.result(8))
    assert bat.trained == 10 and bat.passes == 2 and not bat.pending
    for k in (1, 2, 3, 4, 5, 6, 7, 9):
        assert_same(bat.result(k), seq.result(k))
