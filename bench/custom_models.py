"""Batched vs sequential client-update throughput for user modules (the generic torch.func
path), one line per architecture of tests/custom_modules.py: MLP, CNN with pooling, GRU, a
2-layer LSTM, embedding + linear, and the BatchNorm and dropout modules that fall back to
sequential training (their "batched" figure is the fallback's).

    python bench/custom_models.py [--json] [--pool 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from custom_modules import CASES  # noqa: E402

from asyncfl.algorithms.trainer import LocalTrainer  # noqa: E402
from asyncfl.models import FlatModel  # noqa: E402
from asyncfl.sim.batched import BatchedExecutor, make_executor  # noqa: E402
from asyncfl.sim.executor import SequentialExecutor, TrainJob  # noqa: E402


def updates_per_second(ex, trainer: LocalTrainer, pool: int, steps: int, clients: int) -> float:
    w0 = trainer.model.initial_weights()
    t = time.perf_counter()
    for k in range(pool):
        ex.submit(TrainJob(k, k % clients, 0, w0, 1000 + k, steps))
    for k in range(pool):
        ex.result(k)
    return pool / (time.perf_counter() - t)


def measure(name: str, pool: int, steps: int) -> dict:
    module_factory, data_factory, _ = CASES[name]
    torch.manual_seed(0)
    data = data_factory()
    trainer = LocalTrainer(FlatModel(module_factory()), 0.1, 16, local_steps=steps)
    notices: list[str] = []
    batched = make_executor("batched", trainer, data, memory_mb=512.0, notify=notices.append)
    return {
        "model": name,
        "parameters": trainer.model.numel,
        "batched": isinstance(batched, BatchedExecutor),
        "fallback_reason": notices[0] if notices else None,
        "sequential_updates_per_s": updates_per_second(
            SequentialExecutor(trainer, data), trainer, pool, steps, data.num_clients
        ),
        "batched_updates_per_s": updates_per_second(batched, trainer, pool, steps, data.num_clients),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=128, help="client updates per measurement")
    ap.add_argument("--steps", type=int, default=10, help="local steps per update")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(name, args.pool, args.steps) for name in CASES]
    for r in rows:
        r["speedup"] = r["batched_updates_per_s"] / r["sequential_updates_per_s"]
    if args.json:
        print(json.dumps({"pool": args.pool, "steps": args.steps, "threads": torch.get_num_threads(), "rows": rows}))
        return
    print(f"{'model':<18}{'params':>8}{'sequential/s':>14}{'batched/s':>12}{'speedup':>9}  path")
    for r in rows:
        path = "torch.func" if r["batched"] else "sequential fallback"
        print(
            f"{r['model']:<18}{r['parameters']:>8}{r['sequential_updates_per_s']:>14.1f}"
            f"{r['batched_updates_per_s']:>12.1f}{r['speedup']:>8.2f}x  {path}"
        )


if __name__ == "__main__":
    main()
