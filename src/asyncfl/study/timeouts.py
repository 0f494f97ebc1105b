"""Sync runs' default round timeout: a percentile of the population's trip durations."""

from __future__ import annotations

import json

import numpy as np

from asyncfl.config import ExperimentConfig
from asyncfl.study.shared import shared_data

SAMPLE_DEVICES = 1_000_000


def trip_durations(cfg: ExperimentConfig) -> np.ndarray:
    """Virtual seconds of a whole trip (download, local steps, upload) for the devices of a
    population drawn as `cfg` draws it, from its own generator (the simulator's devices are
    another draw of the same distributions). Above SAMPLE_DEVICES devices, for that many drawn
    the same way, each with the example count of a device picked uniformly: a percentile of 10^6
    durations is within about 0.03 percentile points of the population's (the standard error
    of the 90th percentile's rank is sqrt(0.9 x 0.1 / 10^6) = 0.0003)."""
    from asyncfl.build import build_codecs, build_flat_model, build_trainer
    from asyncfl.sim.population import Population

    spec = cfg.runs[0]
    data = shared_data(cfg)
    model = build_flat_model(cfg, data)
    trainer = build_trainer(cfg, spec, model)
    down, up = build_codecs(spec).payload_bytes(model.numel)
    devices = cfg.population.devices
    sampled = cfg.population.model_copy(update={"devices": min(devices, SAMPLE_DEVICES), "profiles": "arrays"})
    pop = Population(sampled, np.random.SeedSequence([cfg.seed, 0x7D1]), shared=False)
    sizes = np.asarray(data.client_sizes())
    if devices > SAMPLE_DEVICES:
        ids = np.random.default_rng([cfg.seed, 0x7D2]).integers(0, devices, SAMPLE_DEVICES)
    else:
        ids = np.arange(devices)
    n = sizes[ids % len(sizes)]
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
