"""What the runs of one process share: their dataset. A study's runs differ in algorithm,
schedule and seed, rarely in data, and building the data of 10^8 synthetic devices (their
example counts alone are 800 MB) once per run would cost more than the runs' own set-up."""

from __future__ import annotations

import json

from asyncfl.config import ExperimentConfig

_DATA: dict[str, object] = {}  # the last dataset built in this process, by what builds it


def shared_data(cfg: ExperimentConfig):
    """`build_data(cfg)`, reused while the data config, the seed it uses and the device count
    stay the same (one dataset at a time)."""
    from asyncfl.build import build_data

    seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    key = json.dumps([cfg.data.model_dump(mode="json"), seed, cfg.population.devices], sort_keys=True)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = build_data(cfg)
    return _DATA[key]
