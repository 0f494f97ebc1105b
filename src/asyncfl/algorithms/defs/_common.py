"""Parts several algorithm definitions build from: server optimizers, staleness functions, the
FedAvg family's round aggregator and the differentially private aggregator."""

from __future__ import annotations

from collections.abc import Callable

from asyncfl.algorithms import aggregators, server_opt, staleness
from asyncfl.algorithms.defs.registry import privacy_denominator
from asyncfl.algorithms.kardam import LipschitzFilter
from asyncfl.algorithms.private import DPMechanism, PrivateAggregator
from asyncfl.algorithms.shuffle import mix
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.config.base import ConfigError
from asyncfl.config.training import KardamConfig, RoundAggregation, ServerOptConfig, StalenessConfig
from asyncfl.privacy import AdaptiveClipping


def build_server_opt(c: ServerOptConfig) -> server_opt.ServerOptimizer:
    if c.name == "sgd":
        return server_opt.SGD(c.lr, c.momentum)
    return server_opt.Adaptive(c.name, c.lr, c.beta1, c.beta2, c.tau)


def build_staleness(c: StalenessConfig) -> staleness.StalenessFn:
    return staleness.make(c.kind, c.a, c.b)


def with_filter(inner: aggregators.Aggregator, f: KardamConfig | None) -> aggregators.Aggregator:
    """The aggregator behind the configured Byzantine filter (none: unchanged)."""
    if f is None:
        return inner
    return LipschitzFilter(inner, f.byzantine_fraction, f.window, f.warmup)


def round_aggregator(a: RoundAggregation, trainer_lr: float | None = None) -> aggregators.Aggregator:
    """FedAvg, FedProx, Per-FedAvg: the example-weighted mean of a round, or a robust rule."""
    if a.aggregation != "mean":
        return aggregators.RobustAggregator(build_server_opt(a.server_opt), a.aggregation, a.trim_fraction, a.clip_norm)
    return aggregators.fedavg(build_server_opt(a.server_opt), a.clip_norm, a.partial_weight)


def round_private_aggregator(spec, num_users: int | None, seed: int = 0) -> PrivateAggregator:
    """DP-FedAvg: uniform weights (times the work fraction of a partial update, <= 1, which keeps
    the sensitivity bounded), divided by the cohort."""
    return private_aggregator(spec, num_users, seed, lambda u, d: u.work_fraction)


def private_aggregator(
    spec,
    num_users: int | None,
    seed: int,
    weight: Callable[[ClientUpdate, int], float],
    buffer_size: int | None = None,
    max_staleness: int | None = None,
) -> PrivateAggregator:
    """The DP aggregator (`asyncfl.algorithms.private`) with the algorithm's per-update weights
    (each <= 1). Sample rate: privacy.sample_rate, else (updates per server step) / num_users."""
    p, a = spec.privacy, spec.algorithm
    m = privacy_denominator(spec)
    if p.sample_rate is not None:
        q = p.sample_rate
    elif num_users:
        q = min(1.0, m / num_users)
    else:
        raise ConfigError("privacy.sample_rate: set it (the number of users is not known here)")
    adaptive = None
    if p.adaptive is not None:
        ad = p.adaptive
        sb = m / 20 if ad.count_noise_std is None else ad.count_noise_std
        adaptive = AdaptiveClipping(
            p.clip_norm,
            ad.target_quantile,
            ad.learning_rate,
            expected_count=m,
            count_noise_std=sb if p.noise_multiplier > 0 else ad.count_noise_std or 0.0,
        )
    noise_seed = p.noise_seed if p.noise_seed is not None else int(mix(seed, 0xD1FF)[0])
    mechanism = DPMechanism(
        p.clip_norm, p.noise_multiplier, denominator=m, sample_rate=q, delta=p.delta, seed=noise_seed, adaptive=adaptive
    )
    return PrivateAggregator(
        build_server_opt(a.server_opt), weight, mechanism, buffer_size=buffer_size, max_staleness=max_staleness
    )
