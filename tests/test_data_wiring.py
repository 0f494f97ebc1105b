"""The zoo's datasets and models reach the simulator through the config: natural partitions,
data generated per device, token inputs, and the batched executor on each."""

import numpy as np
import pytest
import torch
from test_data_loaders import femnist_user, write_leaf

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.build import build_data, build_flat_model
from asyncfl.data.synthetic import SyntheticFederated
from asyncfl.experiment import run_one
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import SequentialExecutor, TrainJob


def same_updates(trainer, data, clients, steps=3):
    w0 = trainer.model.initial_weights()
    seq, bat = SequentialExecutor(trainer, data), BatchedExecutor(trainer, data)
    for ex in (seq, bat):
        for k, c in enumerate(clients):
            ex.submit(TrainJob(k, c, 0, w0, 50 + k, steps))
    for k in range(len(clients)):
        u, v = bat.result(k), seq.result(k)
        assert u.n_examples == v.n_examples
        assert torch.allclose(u.delta, v.delta, atol=2e-6, rtol=1e-4)


def test_synthetic_population_is_generated_per_device_and_trains(small):
    runs = [{"name": "fedbuff", "algorithm": {"name": "fedbuff", "buffer_size": 10}, "scheduler": {"concurrency": 50}}]
    cfg = small(
        runs=runs,
        executor="batched",
        target_accuracy=0.3,
        sets=[
            "data.dataset=synthetic",
            "data.synthetic.alpha=0.5",
            "data.synthetic.beta=0.5",
            "model.name=logreg",
            "population.devices=100000",
            "stop.max_time=300",
            "trainer.lr=0.05",
        ],
    )
    data = build_data(cfg)
    assert isinstance(data, SyntheticFederated) and data.num_clients == 100_000  # nothing stored
    m = run_one(cfg, cfg.runs[0], data)
    assert m.completed > 300
    # held-out devices have their own local models, so accuracy there rises slowly; the loss shows it
    assert m.rows[-1]["test_loss"] < m.rows[0]["test_loss"] - 0.15
    assert m.rows[-1]["test_accuracy"] > m.rows[0]["test_accuracy"] + 0.03
    trainer = LocalTrainer(build_flat_model(cfg, data), 0.05, 16, local_steps=3)
    same_updates(trainer, data, [0, 7, 99_999, 7])


def test_leaf_users_become_clients_with_their_own_test_sets(small, tmp_path):
    write_leaf(tmp_path, "train", [(f"w{i}", 6 + i) for i in range(5)], femnist_user)
    write_leaf(tmp_path, "test", [(f"w{i}", 2) for i in range(5)], femnist_user)
    cfg = small(sets=["data.dataset=femnist", f"data.path={tmp_path}", "population.devices=5"])
    assert cfg.data.partition.kind == "natural"
    data = build_data(cfg)
    assert data.num_clients == 5 and data.num_classes == 62
    assert data.client_sizes().tolist() == [6, 7, 8, 9, 10]
    assert [len(t) for t in data.client_test_indices] == [2] * 5
    cfg = small(sets=["data.dataset=femnist", f"data.path={tmp_path}", "data.partition.kind=iid", "data.num_clients=4"])
    pooled = build_data(cfg)  # users' training examples re-partitioned
    assert pooled.num_clients == 4 and pooled.client_sizes().sum() == 40


def test_char_gru_on_shakespeare_is_vectorised_exactly(small):
    cfg = small(sets=["data.dataset=shakespeare", "model.name=char_gru", "model.hidden=[16]", "model.embed=4"])
    data = build_data(cfg)
    assert data.num_clients > 900 and data.x.dtype == torch.int64 and data.x.shape[1] == 80
    model = build_flat_model(cfg, data)
    trainer = LocalTrainer(model, 0.5, 4, local_steps=2)
    same_updates(trainer, data, [0, 5, 17], steps=2)
    w = model.initial_weights()
    acc, loss = model.evaluate(w, data.x_test[:200], data.y_test[:200])
    assert 0 <= acc < 0.3 and abs(loss - np.log(data.num_classes)) < 1.0  # untrained: near uniform


def test_client_test_fraction_holds_out_examples_per_client(small):
    cfg = small(sets=["data.client_test_fraction=0.25"])
    data = build_data(cfg)
    for train, test in zip(data.client_indices, data.client_test_indices):
        assert len(test) >= 1 and not set(train) & set(test)


def test_more_clients_than_examples_is_a_config_error_naming_the_setting():
    """One client per device of a large population on a small dataset would build millions of
    empty clients (at 10^8 devices, more than the machine's memory): refused with the fix."""
    from asyncfl import config
    from asyncfl.build import build_data

    cfg = config.load(preset="quickstart", overrides=["population.devices=100000000"])
    with pytest.raises(config.ConfigError, match=r"population.devices .*100,000,000 clients for 1,437"):
        build_data(cfg)
    cfg = config.load(preset="quickstart", overrides=["population.devices=100000000", "data.num_clients=100"])
    assert build_data(cfg).num_clients == 100
