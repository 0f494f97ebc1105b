"""Client-update throughput of the Shakespeare character model (`char_gru`): sequential executor
(autograd through `CharGRU.forward`) vs batched executor (`CharGRU.stacked_grads`, hand-written
backpropagation through time), on the real Shakespeare clients, all starting from one model.

    python bench/char_throughput.py [--hidden 64] [--batch 16] [--steps 10] [--pool 50] [--json]

The pool is the number of clients trained together (about the concurrency of a run). Prints
updates/s by wall clock and by this process's CPU time (the latter is steadier on a shared
machine); torch uses one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.data.shakespeare import NUM_CHARS, load_shakespeare
from asyncfl.models import FlatModel, build_model
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import SequentialExecutor, TrainJob


def rate(ex, jobs: list[TrainJob]) -> tuple[float, float]:
    """(updates per wall second, updates per CPU second) for training these jobs."""
    wall, cpu = time.perf_counter(), time.process_time()
    for j in jobs:
        ex.submit(j)
    for j in jobs:
        ex.result(j.job_id)
    return len(jobs) / (time.perf_counter() - wall), len(jobs) / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--embed", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=50, help="clients per batched measurement")
    ap.add_argument("--sequential", type=int, default=10, help="clients for the sequential measurement")
    ap.add_argument("--repeats", type=int, default=3, help="batched pools measured (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = load_shakespeare()
    torch.manual_seed(0)
    model = FlatModel(
        build_model(
            "char_gru", data.num_features, data.num_classes, vocab=NUM_CHARS, embed=args.embed, hidden=args.hidden
        )
    )
    trainer = LocalTrainer(model, args.lr, args.batch, local_steps=args.steps)
    w0 = model.initial_weights()

    def jobs(n: int, offset: int) -> list[TrainJob]:
        return [
            TrainJob(offset + k, (offset + 7 * k) % data.num_clients, 0, w0, 1000 + offset + k, args.steps)
            for k in range(n)
        ]

    seq = rate(SequentialExecutor(trainer, data), jobs(args.sequential, 0))
    bex = BatchedExecutor(trainer, data, memory_mb=4096)  # one pass for the whole pool
    rate(bex, jobs(args.pool, 10_000))  # warm-up: allocates the kernel's workspace
    runs = [rate(bex, jobs(args.pool, 20_000 + r * args.pool)) for r in range(args.repeats)]
    bat = max(runs, key=lambda r: r[1])
    out = {
        "model": f"char_gru embed {args.embed} hidden {args.hidden}",
        "params": model.numel,
        "batch": args.batch,
        "steps": args.steps,
        "pool": args.pool,
        "threads": args.threads,
        "kernel": type(bex.kernel).__name__,
        "sequential_updates_per_s": {"wall": round(seq[0], 2), "cpu": round(seq[1], 2)},
        "batched_updates_per_s": {"wall": round(bat[0], 2), "cpu": round(bat[1], 2)},
    }
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"{out['model']} ({model.numel:,} parameters), {args.steps} local steps of batch {args.batch}, "
        f"{args.threads} thread(s)"
    )
    print(f"  sequential:           {seq[0]:7.2f} updates/s wall, {seq[1]:7.2f} per CPU second")
    print(
        f"  batched (pool {args.pool:4d}): {bat[0]:7.2f} updates/s wall, {bat[1]:7.2f} per CPU second [{out['kernel']}]"
    )


if __name__ == "__main__":
    main()
