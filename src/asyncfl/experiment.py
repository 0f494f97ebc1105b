"""Builds the objects a config names and runs them; writes results, config and plots."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from asyncfl.algorithms import aggregators, server_opt, staleness
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.algorithms.private import PrivateAggregator
from asyncfl.algorithms.shuffle import mix
from asyncfl.compression import parse_codec
from asyncfl.config import ConfigError, ExperimentConfig, RunSpec, ServerOptConfig, StalenessConfig, privacy_denominator
from asyncfl.privacy import AdaptiveClipping
from asyncfl.data import cifar, digits, idx, leaf, shakespeare
from asyncfl.data.imbalance import plot_client_sizes
from asyncfl.data.synthetic import SyntheticFederated
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.partition import partition
from asyncfl.models import FlatModel, build_model
from asyncfl.report.clients import client_accuracies, spread
from asyncfl.report.metrics import Metrics
from asyncfl.report.plots import write_plots
from asyncfl.report.table import summary_table
from asyncfl.scheduling import build_policy
from asyncfl.sim.batched import make_executor
from asyncfl.sim.simulator import Simulation


def _load_pool(cfg: ExperimentConfig) -> FederatedDataset | tuple:
    """A dataset with its natural clients, or (x, y, x_test, y_test, classes) to partition."""
    d = cfg.data
    if d.dataset == "digits":
        return digits.load(d.test_fraction, cfg.seed)
    if d.dataset == "fashion_mnist":
        return idx.load_fashion_mnist(d.path)
    if d.dataset == "cifar10":
        return cifar.load_cifar10(d.path)
    if d.dataset == "shakespeare" and d.path is None:
        s = d.shakespeare
        return shakespeare.load_shakespeare(s.min_lines, s.stride, s.max_windows_per_client, max_test=s.max_test)
    return leaf.load_leaf(d.path, d.dataset, max_users=d.max_users)


def build_data(cfg: ExperimentConfig) -> FederatedDataset | SyntheticFederated:
    d, p = cfg.data, cfg.data.partition
    if d.seed is not None:  # the data stay fixed while the run's seed varies
        cfg = cfg.model_copy(update={"seed": d.seed})
    num_clients = d.num_clients or cfg.population.devices
    if d.dataset == "synthetic":
        s = d.synthetic
        synth = SyntheticFederated(num_clients, s.alpha, s.beta, cfg.seed, num_features=s.num_features,
                                   num_classes=s.num_classes, size_median=s.size_median, size_sigma=s.size_sigma,
                                   max_size=s.max_size, test_size=s.test_size, test_devices=s.test_devices,
                                   common_model=s.common_model)
        if d.client_test_fraction == 0:
            return synth  # generated per device on demand
        # per-client test splits need the examples stored: fine for the populations they are used with
        return split_client_tests(synth.materialize(), d.client_test_fraction, cfg.seed)
    try:
        pool = _load_pool(cfg)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data ({d.dataset}): {err}") from None
    if isinstance(pool, FederatedDataset):
        if p.kind == "natural":
            return split_client_tests(pool, d.client_test_fraction, cfg.seed)
        train = np.concatenate(pool.client_indices)  # re-partition the users' pooled training examples
        pool = (pool.x[train], pool.y[train], pool.x_test, pool.y_test, pool.num_classes)
    x, y, x_test, y_test, classes = pool
    try:
        parts = partition(p.kind, y.numpy(), num_clients, cfg.seed, alpha=p.alpha,
                          classes_per_client=p.classes_per_client, exponent=p.exponent)
    except ValueError as err:
        raise ConfigError(f"data.partition: {err}") from None
    return split_client_tests(FederatedDataset(x, y, parts, x_test, y_test, classes), d.client_test_fraction, cfg.seed)


def split_client_tests(data: FederatedDataset, fraction: float, seed: int) -> FederatedDataset:
    """Hold out `fraction` of each client's examples (at least one, when it has two) as its
    own test set; datasets that come with per-client test sets keep theirs."""
    if fraction == 0 or data.client_test_indices is not None:
        return data
    rng = np.random.default_rng([seed, 7])
    train, test = [], []
    for idx in data.client_indices:
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        shuffled = rng.permutation(idx)
        test.append(np.sort(shuffled[:k]))
        train.append(np.sort(shuffled[k:]))
    return dataclasses.replace(data, client_indices=train, client_test_indices=test)


def build_flat_model(cfg: ExperimentConfig, data) -> FlatModel:
    torch.manual_seed(cfg.seed)
    m = cfg.model
    kwargs: dict = {}
    if m.name == "mlp":
        kwargs = {"hidden": tuple(m.hidden)}
    elif m.name == "cnn":
        kwargs = {"width": m.width, "channels": 3 if cfg.data.dataset == "cifar10" else 1}
    elif m.name == "char_gru":
        if data.x_test.dtype.is_floating_point:
            raise ConfigError(f"model.name: char_gru reads token ids; {cfg.data.dataset} has float features")
        vocab = int(max(data.x_test.max(), data.x.max() if hasattr(data, "x") else 0)) + 1
        kwargs = {"vocab": max(vocab, data.num_classes), "embed": m.embed, "hidden": m.hidden[0]}
    try:
        return FlatModel(build_model(m.name, data.num_features, data.num_classes, **kwargs))
    except ValueError as err:
        raise ConfigError(f"model ({m.name}): {err}") from None


def build_server_opt(c: ServerOptConfig) -> server_opt.ServerOptimizer:
    if c.name == "sgd":
        return server_opt.SGD(c.lr, c.momentum)
    return server_opt.Adaptive(c.name, c.lr, c.beta1, c.beta2, c.tau)


def build_staleness(c: StalenessConfig) -> staleness.StalenessFn:
    return staleness.make(c.kind, c.a, c.b)


def build_aggregator(spec: RunSpec, trainer_lr: float | None = None, *, num_users: int | None = None,
                     seed: int = 0) -> aggregators.Aggregator:
    """`trainer_lr` sets q-FedAvg's default L = 1 / lr. With `spec.privacy`, the DP aggregator;
    `num_users` (distinct users who may contribute) sets its default sample rate, `seed` its noise."""
    if spec.privacy is not None:
        return build_private_aggregator(spec, num_users, seed)
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


def build_private_aggregator(spec: RunSpec, num_users: int | None, seed: int = 0) -> PrivateAggregator:
    """DP-FedBuff / DP-FedAvg (`asyncfl.algorithms.private`): FedBuff keeps its staleness weights
    (<= 1) and divides by K; the FedAvg family weighs uniformly (times the work fraction of a
    partial update, <= 1) and divides by the cohort. Sample rate: privacy.sample_rate, else
    (updates per server step) / num_users."""
    p, a = spec.privacy, spec.algorithm
    m = privacy_denominator(spec)
    if p.sample_rate is not None:
        q = p.sample_rate
    elif num_users:
        q = min(1.0, m / num_users)
    else:
        raise ConfigError("privacy.sample_rate: set it (the number of users is not known here)")
    if a.name == "fedbuff":
        s = build_staleness(a.staleness)
        weight, buffer_size, max_staleness = (lambda u, d: s(d)), a.buffer_size, a.max_staleness
    else:
        weight, buffer_size, max_staleness = (lambda u, d: u.work_fraction), None, None
    adaptive = None
    if p.adaptive is not None:
        ad = p.adaptive
        sb = m / 20 if ad.count_noise_std is None else ad.count_noise_std
        adaptive = AdaptiveClipping(p.clip_norm, ad.target_quantile, ad.learning_rate, expected_count=m,
                                    count_noise_std=sb if p.noise_multiplier > 0 else ad.count_noise_std or 0.0)
    noise_seed = p.noise_seed if p.noise_seed is not None else int(mix(seed, 0xD1FF)[0])
    return PrivateAggregator(build_server_opt(a.server_opt), weight, clip_norm=p.clip_norm,
                             noise_multiplier=p.noise_multiplier, denominator=m, sample_rate=q,
                             buffer_size=buffer_size, max_staleness=max_staleness, adaptive=adaptive,
                             delta=p.delta, seed=noise_seed)


def build_trainer(cfg: ExperimentConfig, spec: RunSpec, model: FlatModel) -> LocalTrainer:
    """The local trainer a run uses: the shared SGD, with the algorithm's client-side terms."""
    t, a = cfg.trainer, spec.algorithm
    meta = {"meta": a.variant, "meta_lr": a.meta_lr, "meta_delta": a.meta_delta} if a.name == "perfedavg" else {}
    if a.name == "qfedavg":  # F_k: the loss over the client's whole data, as q-FedAvg defines it
        meta["start_loss"] = "full"
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
        aggregator=build_aggregator(spec, cfg.trainer.lr, num_users=num_users(cfg, data), seed=cfg.seed),
        policy=build_policy(spec.scheduler), population=cfg.population,
        eval_cfg=cfg.eval, stop=cfg.stop, target_accuracy=cfg.target_accuracy, seed=cfg.seed,
        w0=model.initial_weights(), progress=progress, **build_codecs(spec),
    )


def num_users(cfg: ExperimentConfig, data) -> int:
    """Distinct users (data partitions) that devices can bring: devices reuse partitions modulo."""
    return min(cfg.population.devices, int(getattr(data, "num_clients", cfg.population.devices)))


def build_codecs(spec: RunSpec) -> dict:
    """The simulator's compression arguments for a run (none without a compression section)."""
    c = spec.compression
    if c is None:
        return {}
    return {"upload_codec": parse_codec(c.upload), "download_codec": parse_codec(c.download),
            "error_feedback": c.error_feedback}


def run_one(cfg: ExperimentConfig, spec: RunSpec, data: FederatedDataset | None = None, progress=None) -> Metrics:
    sim = build_simulation(cfg, spec, data, progress)
    m = sim.run()
    if getattr(sim.data, "client_test_indices", None) is not None:  # per-client spread of the final model
        m.extra["client_accuracy"] = spread(client_accuracies(sim.model, sim.state.w, sim.data))
        if spec.algorithm.name == "perfedavg" or cfg.eval.personalize:
            lr = spec.algorithm.meta_lr if spec.algorithm.name == "perfedavg" else cfg.trainer.lr
            m.extra["personalized_accuracy"] = spread(client_accuracies(sim.model, sim.state.w, sim.data, lr))
    return m


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
        "torch_threads": torch.get_num_threads(),  # wall times depend on it, and the last bits of floats
        "runs": [run_entry(cfg, spec, results[spec.name]) for spec in specs],
        # examples per client: the imbalance every run above trained on
        "data": {"dataset": cfg.data.dataset, "partition": cfg.data.partition.kind,
                 **plot_client_sizes(data.client_sizes(), out / "client_sizes.png",
                                     f"{cfg.data.dataset}, {cfg.data.partition.kind} partition")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_plots(results, cfg.target_accuracy, out, cfg.name)
    console.print(summary_table(summary))
    console.print(f"results in {out}/ (summary.json, config.yaml, */metrics.csv, accuracy_vs_time.png, "
                  "accuracy_vs_trips.png, staleness.png, client_sizes.png)")
    return summary
