"""Sync runs' default round timeout: a percentile of the population's trip durations."""

from __future__ import annotations

import json

import numpy as np

from asyncfl.config import ExperimentConfig


def trip_durations(cfg: ExperimentConfig) -> np.ndarray:
    """Virtual seconds of a whole trip (download, local steps, upload) for every device of the
    population as `cfg` draws it, from its own generator (the simulator's devices are another
    draw of the same distributions)."""
    from asyncfl.build import build_codecs, build_data, build_flat_model, build_trainer
    from asyncfl.sim.population import Population

    spec = cfg.runs[0]
    data = build_data(cfg)
    model = build_flat_model(cfg, data)
    trainer = build_trainer(cfg, spec, model)
    down, up = build_codecs(spec).payload_bytes(model.numel)
    pop = Population(cfg.population, np.random.default_rng([cfg.seed, 0x7D1]))
    sizes = np.asarray(data.client_sizes())
    n = sizes[np.arange(pop.size) % len(sizes)]
    uniq, inverse = np.unique(n, return_inverse=True)
    steps = np.array([trainer.num_steps(int(u)) for u in uniq], dtype=np.float64)[inverse]
    per_step = np.array([trainer.examples_per_step(int(u)) for u in uniq], dtype=np.float64)[inverse]
    return pop.trip_durations(steps, per_step, down, up)


def round_timeout(cfg: ExperimentConfig, percentile: float, cache: dict | None = None) -> float:
    """The `percentile`-th percentile of trip durations (seconds, 3 significant digits)."""
    key = json.dumps(
        [
            cfg.seed,
            percentile,
            cfg.population.model_dump(mode="json"),
            cfg.trainer.model_dump(mode="json"),
            cfg.model.model_dump(mode="json"),
            cfg.data.model_dump(mode="json"),
            cfg.runs[0].compression and cfg.runs[0].compression.model_dump(mode="json"),
        ],
        sort_keys=True,
    )
    if cache is not None and key in cache:
        return cache[key]
    value = float(np.percentile(trip_durations(cfg), percentile))
    value = float(f"{value:.3g}")
    if cache is not None:
        cache[key] = value
    return value
