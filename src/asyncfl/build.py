"""Builds the objects a config names: data, model, trainer, aggregator, scheduling policy, codecs.

Kept free of the simulator, reports, rich and matplotlib so that the network server and client
can build exactly what the simulator runs without loading them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from asyncfl import plugins
from asyncfl.algorithms import aggregators
from asyncfl.algorithms.defs._common import build_server_opt, build_staleness
from asyncfl.algorithms.defs.registry import ClientOptions, definition
from asyncfl.algorithms.norm_guard import NormGuard, initial_bound
from asyncfl.algorithms.private import PrivateAggregator
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.compression import RunCodecs, parse_codec
from asyncfl.config import ConfigError, ExperimentConfig, RunSpec
from asyncfl.config.server import NormGuardConfig
from asyncfl.data import cifar, digits, idx, leaf, shakespeare
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.partition import partition
from asyncfl.data.synthetic import SyntheticFederated
from asyncfl.data.user import FederatedData
from asyncfl.models import FlatModel, build_model
from asyncfl.models.custom import user_flat_model
from asyncfl.scheduling import build_policy

__all__ = [
    "build_aggregator",
    "build_client_rule",
    "build_codecs",
    "build_data",
    "build_flat_model",
    "build_norm_guard",
    "build_policy",
    "build_private_aggregator",
    "build_server_opt",
    "build_staleness",
    "build_trainer",
    "client_options",
    "num_users",
    "split_client_tests",
]


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
    if d.loader is not None:
        params = {"alpha": p.alpha, "classes_per_client": p.classes_per_client, "exponent": p.exponent}
        data = plugins.load_federated(d.loader, d.kwargs, p.kind, num_clients, cfg.seed, **params)
        if isinstance(data, FederatedData):
            data = dataclasses.replace(data, source=d.loader)
        return split_client_tests(data, d.client_test_fraction, cfg.seed)
    if d.dataset == "synthetic":
        s = d.synthetic
        synth = SyntheticFederated(
            num_clients,
            s.alpha,
            s.beta,
            cfg.seed,
            num_features=s.num_features,
            num_classes=s.num_classes,
            size_median=s.size_median,
            size_sigma=s.size_sigma,
            max_size=s.max_size,
            test_size=s.test_size,
            test_devices=s.test_devices,
            common_model=s.common_model,
        )
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
    if num_clients > len(y):  # every client would not even get one example; at 10^8, gigabytes of empty clients
        source = "data.num_clients" if d.num_clients else "population.devices (data.num_clients unset)"
        raise ConfigError(
            f"{source}: {num_clients:,} clients for {len(y):,} training examples of {d.dataset}; set data.num_clients "
            "to at most the examples (devices then share clients' data)"
        )
    try:
        parts = partition(
            p.kind,
            y.numpy(),
            num_clients,
            cfg.seed,
            alpha=p.alpha,
            classes_per_client=p.classes_per_client,
            exponent=p.exponent,
        )
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
    for client in data.client_indices:
        k = min(len(client) - 1, max(1, round(fraction * len(client))))
        shuffled = rng.permutation(client)
        test.append(np.sort(shuffled[:k]))
        train.append(np.sort(shuffled[k:]))
    return dataclasses.replace(data, client_indices=train, client_test_indices=test)


def build_flat_model(cfg: ExperimentConfig, data, module: torch.nn.Module | None = None) -> FlatModel:
    """The config's model for `data`, or `module` (a user's torch module) when given."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    if module is not None:
        return user_flat_model(module, data)
    if m.factory is not None:
        return user_flat_model(plugins.build_module(m.factory, m.kwargs, data), data, f"model.factory {m.factory}")
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


def build_aggregator(
    spec: RunSpec, trainer_lr: float | None = None, *, num_users: int | None = None, seed: int = 0
) -> aggregators.Aggregator:
    """`trainer_lr` sets q-FedAvg's default L = 1 / lr. With `spec.privacy`, the DP aggregator;
    `num_users` (distinct users who may contribute) sets its default sample rate, `seed` its noise,
    and is SCAFFOLD's N unless its config sets `algorithm.num_clients`."""
    if spec.privacy is not None:
        return build_private_aggregator(spec, num_users, seed)
    d = definition(spec.algorithm.name)
    if d.sized_by_users:
        return d.build_aggregator(spec.algorithm, trainer_lr, num_users)
    return d.build_aggregator(spec.algorithm, trainer_lr)


def build_private_aggregator(spec: RunSpec, num_users: int | None, seed: int = 0) -> PrivateAggregator:
    """DP-FedBuff / DP-FedAvg (`asyncfl.algorithms.private`), as the algorithm defines it."""
    return definition(spec.algorithm.name).build_private_aggregator(spec, num_users, seed)


def client_options(spec: RunSpec) -> ClientOptions:
    """What a run's local trainer needs from its algorithm (proximal term, meta step)."""
    return definition(spec.algorithm.name).client_options(spec.algorithm)


def build_client_rule(spec: RunSpec, trainer_lr: float):
    """The client's side of the algorithm's per-client state (`AlgorithmDefinition.client_rule`);
    None for stateless clients."""
    d = definition(spec.algorithm.name)
    return None if d.client_rule is None else d.client_rule(spec.algorithm, trainer_lr)


def build_trainer(cfg: ExperimentConfig, spec: RunSpec, model: FlatModel) -> LocalTrainer:
    """The local trainer a run uses: the shared SGD, with the algorithm's client-side terms."""
    t, o = cfg.trainer, client_options(spec)
    return LocalTrainer(
        model,
        t.lr,
        t.batch_size,
        t.local_steps,
        t.local_epochs,
        o.prox_mu,
        meta=o.meta,
        meta_lr=o.meta_lr,
        meta_delta=o.meta_delta,
        start_loss=o.start_loss,
    )


def build_norm_guard(c: NormGuardConfig | None, w0: torch.Tensor) -> NormGuard | None:
    """The adaptive norm defence for a task whose model starts at w0; None when off."""
    return None if c is None else NormGuard(c.multiple, c.window, c.warmup, initial_bound(w0, c.multiple))


def num_users(cfg: ExperimentConfig, data) -> int:
    """Distinct users (data partitions) that devices can bring: devices reuse partitions modulo."""
    return min(cfg.population.devices, int(getattr(data, "num_clients", cfg.population.devices)))


def build_codecs(spec: RunSpec) -> RunCodecs:
    """A run's codecs: dense float32 both ways without a compression section."""
    c = spec.compression
    if c is None:
        return RunCodecs()
    return RunCodecs(parse_codec(c.upload), parse_codec(c.download), c.error_feedback)
