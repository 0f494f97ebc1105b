"""Flower's simulation engine (its Ray backend) on bench/ray_scale.py's heavy task; run by that
bench with the Python of a separate venv that holds flwr[simulation].

    build/flower-venv/bin/python bench/flower_peer.py TASK_DIR

TASK_DIR holds what ray_scale.py wrote: task.json (model, clients, steps, batch, lr, rounds,
threads, workers), data.npz (x, y and each client's example offsets) and start.pt (the start
model's state dict). Every client trains `steps` SGD steps on minibatches of `batch` examples
drawn from its own data, as asyncfl's LocalTrainer does, and replies with its weights. FedAvg
samples all `clients` each round; round 1 is a warm-up (actors start, import torch, build the
model) and is not timed. Writes result.json: the timed client updates and their seconds, from
the start of round 2 to the end of the last round's aggregation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the very model definition

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from asyncfl.models.zoo import build_model  # noqa: E402

TASK_DIR = Path(os.environ.get("RAY_SCALE_TASK", sys.argv[1] if len(sys.argv) > 1 else "."))
_cache: dict = {}  # per client process: the task, its data and one model, built once


def _task() -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, torch.nn.Module]:
    if not _cache:
        task = json.loads((TASK_DIR / "task.json").read_text())
        torch.set_num_threads(task["threads"])
        data = np.load(TASK_DIR / "data.npz")
        module = build_model(task["model"], task["features"], task["classes"])
        _cache["all"] = (task, data["x"], data["y"], data["offsets"], module)
    return _cache["all"]


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    task, x, y, offsets, module = _task()
    k = int(context.node_config["partition-id"])
    xs = torch.from_numpy(x[offsets[k] : offsets[k + 1]])
    ys = torch.from_numpy(y[offsets[k] : offsets[k + 1]])
    module.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(module.parameters(), lr=task["lr"])
    rng = np.random.default_rng([k, int(msg.content["config"]["server-round"])])
    order = np.concatenate([rng.permutation(len(ys)) for _ in range(-(-task["steps"] * task["batch"] // len(ys)))])
    for s in range(task["steps"]):
        idx = torch.from_numpy(order[s * task["batch"] : (s + 1) * task["batch"]])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xs[idx]), ys[idx]).backward()
        opt.step()
    reply = RecordDict({"arrays": ArrayRecord(module.state_dict()), "metrics": MetricRecord({"num-examples": len(ys)})})
    return Message(content=reply, reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round starts and ends and how many clients replied."""

    def __init__(self, clients: int):
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
        )
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.replies: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):
        self.starts.append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.replies.append(sum(not r.has_error() for r in replies))
        out = super().aggregate_train(server_round, replies)
        self.ends.append(time.perf_counter())
        return out


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    task = json.loads((TASK_DIR / "task.json").read_text())
    strategy = TimedFedAvg(task["clients"])
    start = ArrayRecord(torch.load(TASK_DIR / "start.pt"))
    strategy.start(grid=grid, initial_arrays=start, num_rounds=task["rounds"] + 1)
    timed = strategy.replies[1:]
    result = {
        "rounds": task["rounds"],
        "client_updates": sum(timed),
        "failed_updates": task["clients"] * (task["rounds"] + 1) - sum(strategy.replies),
        "seconds": strategy.ends[-1] - strategy.starts[1],
        "warmup_round_seconds": strategy.ends[0] - strategy.starts[0],
    }
    (TASK_DIR / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    spec = json.loads((TASK_DIR / "task.json").read_text())
    os.environ["RAY_SCALE_TASK"] = str(TASK_DIR.resolve())  # Ray's workers inherit the environment
    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
    torch.set_num_threads(spec["threads"])
    begun = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=spec["clients"],
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": "local", "num_cpus": spec["workers"], "log_to_driver": False},
        },
    )
    import flwr

    result = json.loads((TASK_DIR / "result.json").read_text())
    result.update(flwr_version=flwr.__version__, total_seconds=time.perf_counter() - begun, workers=spec["workers"])
    (TASK_DIR / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))
