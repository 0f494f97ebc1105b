"""Builds the objects a config names and runs them; writes results, config and plots."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from asyncfl.algorithms import aggregators, server_opt, staleness
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.config import ConfigError, ExperimentConfig, RunSpec, ServerOptConfig, StalenessConfig
from asyncfl.data import digits
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.partition import partition
from asyncfl.models import FlatModel, build_model
from asyncfl.report.metrics import Metrics
from asyncfl.report.plots import write_plots
from asyncfl.report.table import summary_table
from asyncfl.scheduling import build_policy
from asyncfl.sim.batched import make_executor
from asyncfl.sim.simulator import Simulation


def build_data(cfg: ExperimentConfig) -> FederatedDataset:
    x, y, x_test, y_test, classes = digits.load(cfg.data.test_fraction, cfg.seed)
    num_clients = cfg.data.num_clients or cfg.population.devices
    p = cfg.data.partition
    try:
        parts = partition(p.kind, y.numpy(), num_clients, cfg.seed, alpha=p.alpha,
                          classes_per_client=p.classes_per_client, exponent=p.exponent)
    except ValueError as err:
        raise ConfigError(f"data.partition: {err}") from None
    return FederatedDataset(x, y, parts, x_test, y_test, classes)


def build_flat_model(cfg: ExperimentConfig, data: FederatedDataset) -> FlatModel:
    torch.manual_seed(cfg.seed)
    kwargs = {"hidden": tuple(cfg.model.hidden)} if cfg.model.name == "mlp" else {}
    if cfg.model.name == "cnn":
        kwargs = {"width": cfg.model.width}
    return FlatModel(build_model(cfg.model.name, data.num_features, data.num_classes, **kwargs))


def build_server_opt(c: ServerOptConfig) -> server_opt.ServerOptimizer:
    if c.name == "sgd":
        return server_opt.SGD(c.lr, c.momentum)
    return server_opt.Adaptive(c.name, c.lr, c.beta1, c.beta2, c.tau)


def build_staleness(c: StalenessConfig) -> staleness.StalenessFn:
    return staleness.make(c.kind, c.a, c.b)


def build_aggregator(spec: RunSpec, trainer_lr: float | None = None) -> aggregators.Aggregator:
    """`trainer_lr` sets q-FedAvg's default L = 1 / lr."""
    a = spec.algorithm
    if a.name in ("fedavg", "fedprox", "perfedavg"):
        if a.aggregation != "mean":
            return aggregators.RobustAggregator(build_server_opt(a.server_opt), a.aggregation, a.trim_fraction,
                                                a.clip_norm)
        return aggregators.fedavg(build_server_opt(a.server_opt), a.clip_norm)
    if a.name == "qfedavg":
        if a.lipschitz is None and trainer_lr is None:
            raise ConfigError("qfedavg: set algorithm.lipschitz (no trainer learning rate to derive it from)")
        return aggregators.QFedAvg(a.q, a.lipschitz or 1.0 / trainer_lr, a.buffer_size, a.max_staleness)
    if a.name == "fedasync":
        return aggregators.FedAsync(a.alpha, build_staleness(a.staleness), a.max_staleness)
    return aggregators.fedbuff(build_server_opt(a.server_opt), a.buffer_size, build_staleness(a.staleness),
                               a.example_weight, a.normalize, a.max_staleness, a.clip_norm)


def build_trainer(cfg: ExperimentConfig, spec: RunSpec, model: FlatModel) -> LocalTrainer:
    """The local trainer a run uses: the shared SGD, with the algorithm's client-side terms."""
    t, a = cfg.trainer, spec.algorithm
    meta = {"meta": a.variant, "meta_lr": a.meta_lr, "meta_delta": a.meta_delta} if a.name == "perfedavg" else {}
    return LocalTrainer(model, t.lr, t.batch_size, t.local_steps, t.local_epochs, proximal_coefficient(spec), **meta)


def proximal_coefficient(spec: RunSpec) -> float:
    return {"fedprox": getattr(spec.algorithm, "mu", 0.0), "fedasync": getattr(spec.algorithm, "rho", 0.0)}.get(
        spec.algorithm.name, 0.0)


def build_simulation(cfg: ExperimentConfig, spec: RunSpec, data: FederatedDataset | None = None,
                     progress=None) -> Simulation:
    data = data or build_data(cfg)
    model = build_flat_model(cfg, data)
    trainer = build_trainer(cfg, spec, model)
    return Simulation(
        model=model, data=data, trainer=trainer,
        executor=make_executor(cfg.executor, trainer, data, cfg.executor_memory_mb),
        aggregator=build_aggregator(spec, cfg.trainer.lr), policy=build_policy(spec.scheduler), population=cfg.population,
        eval_cfg=cfg.eval, stop=cfg.stop, target_accuracy=cfg.target_accuracy, seed=cfg.seed,
        w0=model.initial_weights(), progress=progress,
    )


def run_one(cfg: ExperimentConfig, spec: RunSpec, data: FederatedDataset | None = None, progress=None) -> Metrics:
    return build_simulation(cfg, spec, data, progress).run()


def run_entry(cfg: ExperimentConfig, spec: RunSpec, m: Metrics) -> dict:
    return {
        "name": spec.name,
        "algorithm": spec.algorithm.name,
        "mode": spec.scheduler.mode,
        "concurrency": spec.scheduler.concurrency,
        "seed": cfg.seed,
        **m.summary(cfg.target_accuracy),
        "staleness_histogram": m.staleness_histogram(),
    }


def run_experiment(cfg: ExperimentConfig, out: Path, runs: list[str] | None = None,
                   console: Console | None = None) -> dict:
    """Run the named runs (all by default) and write everything under `out`."""
    console = console or Console()
    specs = [cfg.run(n) for n in runs] if runs else cfg.runs
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(update={"runs": specs})
    (out / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False))
    data = build_data(cfg)
    results: dict[str, Metrics] = {}
    progress = Progress(TextColumn("{task.description:>12}"), BarColumn(), TextColumn("{task.fields[acc]}"),
                        TimeElapsedColumn(), console=console, transient=False)
    with progress if console.is_terminal else nullcontext():
        for spec in specs:
            task = progress.add_task(spec.name, total=cfg.stop.max_time, acc="")

            def tick(t, _task=task):
                progress.update(_task, completed=t)

            m = run_one(cfg, spec, data, progress=tick)
            progress.update(task, completed=cfg.stop.max_time,
                            acc=f"acc {m.rows[-1]['test_accuracy']:.3f}")
            results[spec.name] = m
            run_dir = out / spec.name
            run_dir.mkdir(exist_ok=True)
            m.write_csv(run_dir / "metrics.csv")
            if not console.is_terminal:
                console.print(f"{spec.name}: final accuracy {m.rows[-1]['test_accuracy']:.3f} "
                              f"in {m.wall_seconds:.1f} s wall")
    summary = {
        "preset": cfg.name,
        "target_accuracy": cfg.target_accuracy,
        "seed": cfg.seed,
        "runs": [run_entry(cfg, spec, results[spec.name]) for spec in specs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_plots(results, cfg.target_accuracy, out, cfg.name)
    console.print(summary_table(summary))
    console.print(f"results in {out}/ (summary.json, config.yaml, */metrics.csv, accuracy_vs_time.png, "
                  "accuracy_vs_trips.png, staleness.png)")
    return summary
