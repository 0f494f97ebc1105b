"""Shared by the cluster's tests: small async tasks and rows as selectors would write them."""

from __future__ import annotations

import torch

from asyncfl import config
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.cluster.members import session
from asyncfl.cluster.partials import Partial, encode_partial

FEDBUFF = {"name": "fedbuff", "algorithm": {"name": "fedbuff", "buffer_size": 4}, "scheduler": {"concurrency": 8}}
FEDASYNC = {"name": "fedasync", "algorithm": {"name": "fedasync", "alpha": 0.5}, "scheduler": {"concurrency": 4}}
FEDBUFF_ADAM = {
    "name": "fedbuff_adam",
    "algorithm": {"name": "fedbuff", "buffer_size": 3, "server_opt": {"name": "adam", "lr": 0.01}},
    "scheduler": {"concurrency": 6},
}


def experiment(*runs: dict, hidden: int = 16, **extra) -> config.ExperimentConfig:
    """A digits experiment whose runs are `runs` (a few hundred model parameters)."""
    return config.validate(
        {
            "name": "cluster",
            "seed": 3,
            "target_accuracy": 0.99,
            "data": {"num_clients": 8, "partition": {"kind": "iid"}},
            "model": {"name": "mlp", "hidden": [hidden]},
            "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
            "runs": list(runs),
        }
        | extra
    )


def updates(n: int, numel: int, base_version: int = 0, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            client_id=i,
            base_version=base_version,
            delta=0.01 * torch.randn(numel, generator=g),
            n_examples=10 + i,
            steps=2,
            loss=0.5,
        )
        for i in range(n)
    ]


def insert_partial(url: str, task: str, partial: Partial, selector: str = "sel-test") -> int:
    """A partials row as a selector's group commit writes it; its id."""
    with session(url) as conn:
        return conn.execute(
            "INSERT INTO partials(task, selector, count, weight_sum, body) VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (task, selector, partial.count, partial.weight_sum, encode_partial(partial)),
        ).fetchone()[0]


def fetch(url: str, sql: str, *params):
    with session(url) as conn:
        return conn.execute(sql, params).fetchall()
