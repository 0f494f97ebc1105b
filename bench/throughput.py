"""Client-update throughput: sequential vs batched executor vs the centralized equivalent.

Same task for all three, measured in one run: digits, 10 local steps, batch 16, a pool of
clients that all started from the same global model. "Centralized" trains one model on the
same samples: at local step h it takes one minibatch made of every pooled client's step-h
examples (pool x 16), so it does the same gradient work with the best possible batching.

    python bench/throughput.py [--json] [--pool 256] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.data import digits
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.partition import partition
from asyncfl.models import FlatModel, build_model
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import SequentialExecutor, TrainJob

STEPS, BATCH, LR = 10, 16, 0.1


def make_data(num_clients: int) -> FederatedDataset:
    x, y, xt, yt, c = digits.load(0.2, 0)
    parts = partition("iid", y.numpy(), num_clients, 0, alpha=0.5, classes_per_client=2, exponent=1.0)
    return FederatedDataset(x, y, parts, xt, yt, c)


def make_model(name: str, data: FederatedDataset) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"hidden": (64,)} if name == "mlp" else {}
    return build_model(name, data.num_features, data.num_classes, **kwargs)


def jobs(pool: int, data: FederatedDataset, w0: torch.Tensor, offset: int = 0) -> list[TrainJob]:
    return [TrainJob(offset + k, k % data.num_clients, 0, w0, 10_000 + offset + k, STEPS) for k in range(pool)]


def time_executor(ex, pool_jobs: list[TrainJob]) -> float:
    t = time.perf_counter()
    for j in pool_jobs:
        ex.submit(j)
    for j in pool_jobs:
        ex.result(j.job_id)
    return time.perf_counter() - t


def time_centralized(module: torch.nn.Module, data: FederatedDataset, trainer: LocalTrainer, pool: int) -> float:
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    idx = np.stack(
        [
            data.client_indices[k % data.num_clients][
                trainer.batch_indices(len(data.client_indices[k % data.num_clients]), STEPS, 10_000 + k)
            ]
            for k in range(pool)
        ],
        1,
    )  # [steps, pool, b]; built before the clock starts: a central
    idx = torch.from_numpy(idx.reshape(STEPS, -1))  # trainer would shuffle its data in one call
    t = time.perf_counter()
    for h in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(data.x[idx[h]]), data.y[idx[h]])
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def measure(name: str, pool: int, seq_pool: int, repeats: int) -> dict:
    data = make_data(64)  # ~22 examples per client: every client takes full batches of 16
    module = make_model(name, data)
    model = FlatModel(module)
    trainer = LocalTrainer(model, LR, BATCH, local_steps=STEPS)
    w0 = model.initial_weights()
    seq = SequentialExecutor(trainer, data)
    bat = BatchedExecutor(trainer, data)
    time_executor(seq, jobs(4, data, w0, 10**6))  # warm up
    time_executor(bat, jobs(pool, data, w0, 10**6))
    time_centralized(module, data, trainer, pool)
    t_seq, t_bat, t_cen = [], [], []
    for r in range(repeats):  # interleaved, so drifts in machine speed hit all three alike
        t_seq.append(time_executor(seq, jobs(seq_pool, data, w0, r * pool)) / seq_pool)
        t_bat.append(time_executor(bat, jobs(pool, data, w0, r * pool)) / pool)
        t_cen.append(time_centralized(module, data, trainer, pool) / pool)
    s, b, c = (1 / float(np.median(t)) for t in (t_seq, t_bat, t_cen))
    return {
        "model": name,
        "params": model.numel,
        "pool": pool,
        "local_steps": STEPS,
        "batch_size": BATCH,
        "kernel": type(bat.kernel).__name__.strip("_"),
        "sequential_updates_per_s": s,
        "batched_updates_per_s": b,
        "centralized_updates_per_s": c,
        "batched_over_sequential": b / s,
        "batched_over_centralized": b / c,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--pool", type=int, default=256, help="clients trained per batched pass (>= 200)")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice); 1 is "
        "steadier on a shared machine, where waiting OpenMP threads slow small ops down",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [
        measure(m, args.pool, min(args.pool, 48), args.repeats if m == "mlp" else min(args.repeats, 3))
        for m in args.models.split(",")
    ]
    if args.json:
        out = dict(rows[0])  # the MLP task's figures at the top level
        out["tasks"] = rows
        print(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"client updates / s on digits ({STEPS} local steps, batch {BATCH}, {torch.get_num_threads()} threads)"
    )
    for col in (
        "model",
        "params",
        "pool",
        "sequential",
        "batched",
        "centralized",
        "batched / seq",
        "batched / central",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["params"]),
            str(r["pool"]),
            f"{r['sequential_updates_per_s']:,.0f}",
            f"{r['batched_updates_per_s']:,.0f}",
            f"{r['centralized_updates_per_s']:,.0f}",
            f"{r['batched_over_sequential']:.1f}x",
            f"{r['batched_over_centralized']:.2f}x",
        )
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    main()
