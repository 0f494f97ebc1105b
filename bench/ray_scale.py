"""Client-update throughput of the ray executor (1 and 2 actors) against the local batched
executor, and optionally against Flower's simulation engine, measured side by side in one run.

What is timed: the executors are driven directly with the same pool of training jobs (one start
model, client k % clients, the same seeds), all submitted and then every result asked for, as
in bench/throughput.py; the clock covers submit to last result, so it holds the training, the
shipping to actors and the replies, and nothing of a simulation's event loop, evaluation or
aggregation, which are the same whatever the executor. Repeats are interleaved (local, 1 actor,
2 actors, the order rotated each repeat) so drifts in machine speed hit all three; the medians
set updates/s; ratios and the overhead are medians over repeats of each repeat's own ratio
(difference), so a load that changes between repeats weighs less (the MLP, whose repeats take
about a second, gets three times the repeats). `seconds_per_update` in the JSON holds every
timed repeat. Ray's start-up, the actors' start and a warm-up pool per executor are not timed.

Tasks: `heavy`, the cifar_cnn of the model zoo (1.76M parameters, two 5x5 convolutions of 64
channels) on generated 32x32x3 inputs (the synthetic dataset with 3,072 features; every client
holds 16 to 64 examples, so every step takes a full minibatch), 5 local steps of 16; and `mlp`,
the digits MLP of bench/throughput.py (10 local steps of 16), where a remote call costs more
than the training it carries.

Torch threads: `--threads` (default 1) in the driver, which the ray executor gives its actors,
so the local executor and each actor train with the same count: on a 2-core machine, 2 actors
of 1 thread fill the cores. Ray runs its workers at niceness 15 unless RAY_worker_niceness says
otherwise; on a machine shared with other work that hands the actors' CPU to everyone else while
the local executor trains at the driver's niceness, so the bench starts Ray (its own and
Flower's) with RAY_worker_niceness=0 unless the environment sets it. What two processes can get
of a shared machine varies: `machine_two_worker_speedup`, measured after each repeat, is two Ray
tasks of fixed work run at once against one alone (2.0 on two idle cores), a rough gauge of
what two processes could get of the cores at the time. The CPU time of the processes that train
(the driver, and the actors) is read from /proc for each timed repeat: CPU ms per update (the
work, whatever the load) and the cores they got (CPU time / wall time), which tell a shortfall
of the 2 actors / 1 actor ratio caused by the machine from one caused by the executor.

Figures: updates/s; the ratios 2 actors / 1 actor on the heavy model (goal >= 1.6x) and ray
(2 actors, the default `ray_actors`) / local on the MLP (goal >= 0.5x); the per-job overhead,
the wall time per update of 1 actor minus the local executor's on the MLP (whose training takes
a fraction of a millisecond), i.e. what shipping a job and its reply costs beyond training it
(each task row has it; on the heavy model it also holds the difference between the actors'
narrow passes and the local executor's wide ones, which vmapped convolutions train at another
speed per client); each actor's peak RSS and the driver's.

`--peer flower` runs the heavy task through Flower's simulation engine too (bench/flower_peer.py,
in its own venv under build/, installed on first use from PyPI with the torch build already in
use): FedAvg sampling all `clients` each round, client resources of one CPU (2 Ray workers on 2
cores), the same model, data, start weights, local steps, batch size and lr, and as many timed
client updates as the asyncfl pool (`rounds` x `clients`, after one untimed warm-up round). It
runs after asyncfl's repeats, with asyncfl's Ray shut down; its time includes FedAvg's
aggregation of each round (small next to training) and its round barriers. When Flower cannot
be installed or run, `flower` holds `error`, the reason, and no figures.

    python bench/ray_scale.py [--json] [--quick] [--threads 1] [--repeats 3] [--peer flower]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from throughput import make_data as digits_data
from throughput import make_model as digits_model
from throughput import time_executor

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.synthetic import SyntheticFederated
from asyncfl.memory import process_peak_rss_mb
from asyncfl.models import FlatModel, build_model
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import TrainJob
from asyncfl.sim.ray_executor import RayExecutor

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"model": "cifar_cnn", "features": 3072, "classes": 10, "steps": 5, "batch": 16, "lr": 0.05}
MLP = {"model": "mlp", "steps": 10, "batch": 16, "lr": 0.1, "clients": 64}
GOAL_TWO_OVER_ONE, GOAL_MLP_RAY_OVER_LOCAL = 1.6, 0.5
FLWR = "1.42.0"
EXECUTORS = ("local", "ray1", "ray2")


def heavy_data(clients: int) -> FederatedDataset:
    sizes = {"size_median": 32, "size_sigma": 0.3, "min_size": 16, "max_size": 64}
    features, classes = HEAVY["features"], HEAVY["classes"]
    gen = SyntheticFederated(
        clients, num_features=features, num_classes=classes, test_size=100, test_devices=10, **sizes
    )
    return gen.materialize()


def heavy_task(clients: int) -> tuple[LocalTrainer, FederatedDataset, torch.nn.Module]:
    data = heavy_data(clients)
    torch.manual_seed(0)
    module = build_model(HEAVY["model"], HEAVY["features"], HEAVY["classes"])
    return LocalTrainer(FlatModel(module), HEAVY["lr"], HEAVY["batch"], local_steps=HEAVY["steps"]), data, module


def mlp_task() -> tuple[LocalTrainer, FederatedDataset, torch.nn.Module]:
    data = digits_data(MLP["clients"])
    module = digits_model("mlp", data)
    return LocalTrainer(FlatModel(module), MLP["lr"], MLP["batch"], local_steps=MLP["steps"]), data, module


def pool_jobs(trainer: LocalTrainer, clients: int, pool: int, w0: torch.Tensor, repeat: int) -> list[TrainJob]:
    """The pool of one repeat: the same jobs (ids, clients, seeds) for every executor."""
    first = repeat * pool
    return [TrainJob(first + k, k % clients, 0, w0, first + k, trainer.local_steps) for k in range(pool)]


@ray.remote(num_cpus=1)
def _busy_seconds() -> float:
    """A fixed amount of single-threaded work (pure Python: nothing to import)."""
    t = time.perf_counter()
    sum(i * i for i in range(3_000_000))
    return time.perf_counter() - t


def two_worker_speedup() -> float:
    """What the machine gives two Ray workers now: 2 x (one worker's time for a fixed job) / (the
    time of two running it at once), one worker timed before and after the two. 2.0 on two idle
    cores; less when others share them."""

    def wall(tasks: int) -> float:
        t = time.perf_counter()
        ray.get([_busy_seconds.remote() for _ in range(tasks)])
        return time.perf_counter() - t

    before, both, after = wall(1), wall(2), wall(1)
    return (before + after) / both


def cpu_seconds(pids: list[int]) -> float:
    """CPU time these processes' threads have used so far, in nanoseconds' resolution (Linux
    schedstat; /proc/PID/stat counts 10 ms ticks, coarser than a quick run's MLP pass)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
    return total / 1e9


def measure(name: str, trainer: LocalTrainer, data: FederatedDataset, pool: int, repeats: int) -> dict:
    w0 = trainer.model.initial_weights()
    executors = {
        "local": BatchedExecutor(trainer, data),
        "ray1": RayExecutor(trainer, data, actors=1),
        "ray2": RayExecutor(trainer, data, actors=2),
    }
    for ex in executors.values():  # warm-up: actors up, kernels built, buffers allocated
        time_executor(ex, pool_jobs(trainer, data.num_clients, pool, w0, repeats))
    two_worker_speedup()  # starts the task workers
    workers = {e: [os.getpid()] for e in EXECUTORS}  # who trains: the driver, and the actors
    for e in ("ray1", "ray2"):
        workers[e] += ray.get([actor.pid.remote() for actor in executors[e].actors])
    seconds: dict[str, list[float]] = {e: [] for e in EXECUTORS}
    cores: dict[str, list[float]] = {e: [] for e in EXECUTORS}
    cpu: dict[str, list[float]] = {e: [] for e in EXECUTORS}
    speedups = []
    for r in range(repeats):
        for e in EXECUTORS[r % 3 :] + EXECUTORS[: r % 3]:
            used = cpu_seconds(workers[e])
            wall = time_executor(executors[e], pool_jobs(trainer, data.num_clients, pool, w0, r))
            used = cpu_seconds(workers[e]) - used
            seconds[e].append(wall / pool)
            cpu[e].append(used / pool)
            cores[e].append(used / wall)
        speedups.append(two_worker_speedup())
    row = {"task": name, "model": trainer.model.module.__class__.__name__, "params": trainer.model.numel}
    row.update(pool=pool, clients=data.num_clients, local_steps=trainer.local_steps, batch_size=trainer.batch_size)
    row.update(lr=trainer.lr, repeats=repeats)
    row["seconds_per_update"] = seconds
    for e in EXECUTORS:
        row[f"{e}_updates_per_s"] = 1 / statistics.median(seconds[e])
        row[f"{e}_cpu_ms_per_update"] = 1000 * statistics.median(cpu[e])
        row[f"{e}_cores_used"] = statistics.median(cores[e])

    def paired(fn) -> float:  # over repeats: each compares runs a few seconds apart
        return statistics.median(fn(*times) for times in zip(*seconds.values(), strict=True))

    row["ray2_over_ray1"] = paired(lambda local, ray1, ray2: ray1 / ray2)
    row["machine_two_worker_speedup"] = statistics.median(speedups)
    row["ray1_over_local"] = paired(lambda local, ray1, ray2: local / ray1)
    row["ray2_over_local"] = paired(lambda local, ray1, ray2: local / ray2)
    row["overhead_ms_per_job"] = paired(lambda local, ray1, ray2: 1000 * (ray1 - local))
    for e in ("ray1", "ray2"):
        row[f"{e}_actor_peak_rss_mb"] = executors[e].actor_peak_rss_mb()
        executors[e].close()
    return row


# ---- Flower ------------------------------------------------------------------------------------
def flower_python(venv: Path) -> Path:
    """The Python of a venv holding flwr[simulation] and this torch build; created on first use.
    Raises RuntimeError saying why when PyPI or the install fails."""
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import flwr.simulation, torch"], capture_output=True).returncode == 0
    ):
        return python

    def pip(*args: str, timeout: int) -> None:
        done = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"pip {args[0]} failed: {(done.stderr or done.stdout).strip()[-600:]}")

    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    with tempfile.TemporaryDirectory() as probe:  # is PyPI there at all? fails fast if not
        pip("download", "--no-deps", "-d", probe, f"flwr=={FLWR}", timeout=120)
    constraints = venv / "constraints.txt"  # the CPU build on disk, never a CUDA wheel
    constraints.write_text(f"torch=={torch.__version__}\n")
    pip("install", "-c", str(constraints), f"flwr[simulation]=={FLWR}", f"torch=={torch.__version__}", timeout=900)
    return python


def run_flower(module: torch.nn.Module, data: FederatedDataset, rounds: int, threads: int) -> dict:
    """Flower's figures for the heavy task, or {"error": why} when it cannot be installed or run."""
    try:
        python = flower_python(ROOT / "build" / "flower-venv")
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        return {"error": f"Flower could not be installed: {e}"}
    with tempfile.TemporaryDirectory() as task_dir:
        folder = Path(task_dir)
        offsets = np.concatenate([[0], np.cumsum([len(i) for i in data.client_indices])])
        order = np.concatenate(data.client_indices)
        np.savez(folder / "data.npz", x=data.x[order].numpy(), y=data.y[order].numpy(), offsets=offsets)
        torch.save(module.state_dict(), folder / "start.pt")
        task = {k: HEAVY[k] for k in ("model", "features", "classes", "steps", "batch", "lr")}
        task.update(clients=data.num_clients, rounds=rounds, threads=threads, workers=2)
        (folder / "task.json").write_text(json.dumps(task))
        peer = [python, str(ROOT / "bench" / "flower_peer.py"), task_dir]
        try:
            done = subprocess.run(peer, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return {"error": "Flower's simulation did not finish within 600 s"}
        if done.returncode or not (folder / "result.json").exists():
            return {"error": f"Flower's simulation failed: {(done.stderr or done.stdout).strip()[-800:]}"}
        result = json.loads((folder / "result.json").read_text())
    if result["failed_updates"]:
        return {"error": f"{result['failed_updates']} Flower client updates failed", **result}
    return {**result, "updates_per_s": result["client_updates"] / result["seconds"]}


# ---- report ------------------------------------------------------------------------------------
def goal(value: float, target: float) -> dict:
    return {"value": value, "goal": target, "met": value >= target}


def print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"client updates / s ({out['threads']} torch thread(s) per process, {out['cpus']} cores)")
    columns = ("task", "params", "pool", "steps", "local", "ray 1 actor", "ray 2 actors", "2 / 1", "ray 2 / local")
    for col in (*columns, "machine 2 / 1"):
        table.add_column(col, justify="right")
    for r in out["tasks"]:
        table.add_row(
            f"{r['task']} ({r['model']})",
            f"{r['params']:,}",
            str(r["pool"]),
            str(r["local_steps"]),
            *(f"{r[f'{e}_updates_per_s']:,.1f}" for e in EXECUTORS),
            f"{r['ray2_over_ray1']:.2f}x",
            f"{r['ray2_over_local']:.2f}x",
            f"{r['machine_two_worker_speedup']:.2f}x",
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for key, text in (
        ("heavy_ray2_over_ray1", "heavy, 2 actors / 1 actor"),
        ("mlp_ray2_over_local", "MLP, ray / local"),
    ):
        g = out["goals"][key]
        console.print(f"{text}: {g['value']:.2f}x (goal >= {g['goal']}x: {'met' if g['met'] else 'NOT met'})")
    console.print(f"per-job overhead (MLP, 1 actor - local, per update): {out['overhead_ms_per_job']:.2f} ms")
    for r in out["tasks"]:
        work = ", ".join(f"{r[f'{e}_cpu_ms_per_update']:,.2f}" for e in EXECUTORS)
        got = ", ".join(f"{r[f'{e}_cores_used']:.2f}" for e in EXECUTORS)
        console.print(f"{r['task']}, local; 1 actor; 2 actors: CPU ms per update {work}; cores they got {got}")
    for r in out["tasks"]:
        peaks = ", ".join(f"{p:,.0f}" for p in r["ray1_actor_peak_rss_mb"] + r["ray2_actor_peak_rss_mb"])
        console.print(f"actor peak RSS, {r['task']} (1 actor; 2 actors): {peaks} MB")
    console.print(f"driver peak RSS: {out['driver_peak_rss_mb']:,.0f} MB")
    flower = out.get("flower")
    if flower is None:
        return
    if "error" in flower:
        console.print(f"Flower: not measured. {flower['error']}")
    else:
        console.print(
            f"Flower {flower['flwr_version']} (Ray backend, {flower['workers']} workers): "
            f"{flower['updates_per_s']:.1f} updates/s over {flower['client_updates']} updates; "
            f"asyncfl (2 actors) / Flower: {out['asyncfl_over_flower']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="small pools, one repeat: a smoke test")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the driver and of each actor")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8, help="heavy task: clients (Flower: clients per round)")
    ap.add_argument("--rounds", type=int, default=3, help="heavy task: pool = rounds x clients updates")
    ap.add_argument("--mlp-pool", type=int, default=1024)
    ap.add_argument("--peer", choices=["flower"], help="also run the heavy task through this framework")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.clients, args.rounds, args.mlp_pool = 1, 2, 1, 64
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_worker_niceness", "0")  # before Ray starts: its workers inherit it
    trainer, data, module = heavy_task(args.clients)
    heavy = measure("heavy", trainer, data, args.clients * args.rounds, args.repeats)
    mlp = measure("mlp", *mlp_task()[:2], args.mlp_pool, 3 * args.repeats)
    ray.shutdown()
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
        "quick": args.quick,
        "tasks": [heavy, mlp],
        "goals": {
            "heavy_ray2_over_ray1": goal(heavy["ray2_over_ray1"], GOAL_TWO_OVER_ONE),
            "mlp_ray2_over_local": goal(mlp["ray2_over_local"], GOAL_MLP_RAY_OVER_LOCAL),
        },
        "overhead_ms_per_job": mlp["overhead_ms_per_job"],
        "driver_peak_rss_mb": process_peak_rss_mb(),
    }
    if args.peer == "flower":
        out["flower"] = run_flower(module, data, args.rounds, args.threads)
        if "updates_per_s" in out["flower"]:
            out["asyncfl_over_flower"] = heavy["ray2_updates_per_s"] / out["flower"]["updates_per_s"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)


if __name__ == "__main__":
    main()
