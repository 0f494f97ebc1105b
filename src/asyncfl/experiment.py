"""Runs the objects a config names (`asyncfl.build` builds them); writes results, config and plots."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from asyncfl.algorithms.defs.registry import definition
from asyncfl.build import (  # noqa: F401
    build_aggregator,
    build_client_rule,
    build_codecs,
    build_data,
    build_flat_model,
    build_norm_guard,
    build_policy,
    build_private_aggregator,
    build_server_opt,
    build_staleness,
    build_trainer,
    client_options,
    num_users,
    split_client_tests,
)
from asyncfl.config import ExperimentConfig, RunSpec
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.imbalance import data_summary
from asyncfl.memory import peak_rss_mb, process_peak_rss_mb
from asyncfl.report.clients import client_accuracies, spread
from asyncfl.report.plots import write_plots
from asyncfl.report.table import summary_table
from asyncfl.sim import threads as thread_choice
from asyncfl.sim.batched import make_executor
from asyncfl.sim.metrics import Metrics, Target
from asyncfl.sim.secure_aggregation import build_secure_aggregation
from asyncfl.sim.simulator import RunParts, Simulation

# the most clients a thread-count probe trains in its pass: enough for large matmuls to show
# what threads gain, few enough that the probe stays short when threads wait on a busy machine
PROBE_CLIENTS = 128


def build_simulation(
    cfg: ExperimentConfig, spec: RunSpec, data: FederatedDataset | None = None, progress=None, module=None
) -> Simulation:
    """`module`: a user's torch module to train instead of the config's model."""
    data = data or build_data(cfg)
    model = build_flat_model(cfg, data, module)
    trainer = build_trainer(cfg, spec, model)
    parts = RunParts(
        model,
        data,
        trainer,
        make_executor(
            cfg.executor, trainer, data, cfg.executor_memory_mb, ray_actors=cfg.ray_actors, ray_address=cfg.ray_address
        ),
        build_aggregator(spec, cfg.trainer.lr, num_users=num_users(cfg, data), seed=cfg.seed),
        build_policy(spec.scheduler),
        build_client_rule(spec, cfg.trainer.lr),
        definition(spec.algorithm.name).upload_fields,
        build_norm_guard(spec.norm_guard, model.initial_weights()),
        build_secure_aggregation(spec, model.initial_weights().numel(), data),
    )
    return Simulation(parts, cfg, model.initial_weights(), build_codecs(spec), progress)


def run_one(
    cfg: ExperimentConfig, spec: RunSpec, data: FederatedDataset | None = None, progress=None, module=None
) -> Metrics:
    sim = build_simulation(cfg, spec, data, progress, module)
    try:
        m = sim.run()
        m.extra.update(sim.executor.measured())
    finally:
        sim.executor.close()
    if getattr(sim.data, "client_test_indices", None) is not None:  # per-client spread of the final model
        m.extra["client_accuracy"] = spread(client_accuracies(sim.model, sim.state.w, sim.data))
        meta = client_options(spec)  # a meta-trained model is meant to be evaluated after its personal step
        if meta.meta is not None or cfg.eval.personalize:
            lr = meta.meta_lr if meta.meta is not None else cfg.trainer.lr
            m.extra["personalized_accuracy"] = spread(client_accuracies(sim.model, sim.state.w, sim.data, lr))
    return m


def choose_threads(
    cfg: ExperimentConfig, spec: RunSpec, data, threads: int | str, module=None
) -> thread_choice.ThreadChoice:
    """Apply `threads` (a count, or "auto": time one training pass of `spec`, as many clients as
    will train together, with one thread and with torch's default, and keep the faster)."""
    if threads != "auto":
        return thread_choice.resolve(threads, None)
    model = build_flat_model(cfg, data, module)
    trainer = build_trainer(cfg, spec, model)

    def fresh_executor():  # a ray executor's actors train with the threads chosen here, by a local pass
        kind = "batched" if cfg.executor == "ray" else cfg.executor
        return make_executor(kind, trainer, data, cfg.executor_memory_mb, notify=lambda _: None)

    clients = min(spec.scheduler.concurrency, PROBE_CLIENTS)
    probe = thread_choice.training_probe(fresh_executor, model.initial_weights(), clients, data.num_clients, cfg.seed)
    return thread_choice.resolve("auto", probe)


def run_entry(cfg: ExperimentConfig, spec: RunSpec, m: Metrics) -> dict:
    return {
        "name": spec.name,
        "algorithm": spec.algorithm.name,
        "mode": spec.scheduler.mode,
        "concurrency": spec.scheduler.concurrency,
        "seed": cfg.seed,
        **m.summary(Target.of_config(cfg)),
        "staleness_histogram": m.staleness_histogram(),
        "peak_rss_mb": process_peak_rss_mb(),  # of the process that ran it, by the run's end
    }


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    runs: list[str] | None = None,
    console: Console | None = None,
    threads: int | str = "auto",
    data: FederatedDataset | None = None,
    module=None,
) -> dict:
    """Run the named runs (all by default) and write everything under `out`; `threads` is
    torch's intra-op thread count, or "auto" (see `choose_threads`)."""
    return execute(cfg, out, runs, console, threads, data, module)[0]


def execute(
    cfg: ExperimentConfig,
    out: Path,
    runs: list[str] | None = None,
    console: Console | None = None,
    threads: int | str = "auto",
    data: FederatedDataset | None = None,
    module=None,
) -> tuple[dict, dict[str, Metrics]]:
    """`run_experiment`, also returning each run's metrics; `data` and `module` (a torch module)
    replace the config's dataset and model (the Python API's user data and model)."""
    console = console or Console()
    specs = [cfg.run(n) for n in runs] if runs else cfg.runs
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(update={"runs": specs})
    (out / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    user_data = data is not None
    data = data if user_data else build_data(cfg)
    threads_used = choose_threads(cfg, specs[0], data, threads, module)
    results: dict[str, Metrics] = {}
    entries: list[dict] = []
    progress = Progress(
        TextColumn("{task.description:>12}"),
        BarColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress if console.is_terminal else nullcontext():
        for spec in specs:
            task = progress.add_task(spec.name, total=cfg.stop.max_time, acc="")

            def tick(t, _task=task):
                progress.update(_task, completed=t)

            m = run_one(cfg, spec, data, progress=tick, module=module)
            progress.update(task, completed=cfg.stop.max_time, acc=f"acc {m.rows[-1]['test_accuracy']:.3f}")
            results[spec.name] = m
            entries.append(run_entry(cfg, spec, m))  # now: its peak_rss_mb is the process's as this run ends
            run_dir = out / spec.name
            run_dir.mkdir(exist_ok=True)
            m.write_csv(run_dir / "metrics.csv")
            if not console.is_terminal:
                console.print(
                    f"{spec.name}: final accuracy {m.rows[-1]['test_accuracy']:.3f} in {m.wall_seconds:.1f} s wall"
                )
    summary = {
        "preset": cfg.name,
        "target_accuracy": cfg.target_accuracy,
        **({"target": cfg.target.model_dump()} if cfg.target is not None else {}),
        "seed": cfg.seed,
        "torch_threads": torch.get_num_threads(),  # wall times depend on it, and the last bits of floats
        "threads": threads_used.summary(),  # how it was chosen: asked for, or measured (probe seconds)
        "runs": entries,
        # examples per client: the imbalance every run above trained on
        "data": data_summary(
            _data_origin(data) if user_data or cfg.data.loader else cfg.data, data.client_sizes(), out
        ),
    }
    summary["peak_rss_mb"] = peak_rss_mb()  # this process's and its largest child's, MB
    if module is not None:
        summary["model"] = type(module).__name__
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_plots(results, Target.of_config(cfg), out, cfg.name)
    console.print(summary_table(summary))
    console.print(
        f"results in {out}/ (summary.json, config.yaml, */metrics.csv, accuracy_vs_time.png, "
        "accuracy_vs_trips.png, staleness.png, client_sizes.png)"
    )
    return summary, results


def _data_origin(data) -> SimpleNamespace:
    """What a summary says of data handed in by the caller: its source and partition."""
    kind = getattr(data, "partition_kind", "natural")
    return SimpleNamespace(dataset=getattr(data, "source", "custom"), partition=SimpleNamespace(kind=kind))
