"""Device profiles computed on demand: a device's speed, bandwidths, availability phase and
whether it attacks are pure functions of (seed, device id), so a population of 10^8 devices
costs nothing until a device is picked, and a study's cost grows with its trips.

Each quantity has its own 64-bit key from the run's seed; a device's uniform number for it is
splitmix64(key xor id x golden ratio), whose top 53 bits give a double in (0, 1). Normals come
from two such uniforms (Box-Muller), the other distributions by inverting their CDF. The hash is
computed the same way in Python integers (one device) and numpy uint64 (many), so both give the
same bits. These are other draws of the distributions the drawn-up-front arrays use
(`population.profiles: arrays`), not the same values.
"""

from __future__ import annotations

import math

import numpy as np

from asyncfl.config import Dist, PopulationConfig

_MASK = (1 << 64) - 1
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _uniform(key: int, device: int) -> float:
    x = (key ^ ((device * _GOLDEN) & _MASK)) + _GOLDEN & _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return (((x ^ (x >> 31)) >> 11) + 0.5) * 2.0**-53


def _uniforms(key: int, devices: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (np.uint64(key) ^ (devices.astype(np.uint64) * np.uint64(_GOLDEN))) + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    return (((x ^ (x >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


class OnDemandDist:
    """One per-device quantity of `Dist`, read like the array it replaces: `.item(device)`
    (the simulator's per-trip read) and `[devices]`."""

    def __init__(self, dist: Dist, keys: tuple[int, int]):
        self.dist, self.keys = dist, keys

    def item(self, device: int) -> float:
        d, (k1, k2) = self.dist, self.keys
        u = _uniform(k1, device)
        if d.kind in ("lognormal", "halfnormal"):
            z = math.sqrt(-2.0 * math.log(u)) * math.cos(2.0 * math.pi * _uniform(k2, device))
            v = d.scale * math.exp(d.sigma * z) if d.kind == "lognormal" else abs(d.scale * z)
        elif d.kind == "exponential":
            v = -d.scale * math.log(u)
        elif d.kind == "pareto":  # P(X > x) = (x_m / x)^shape, x_m = scale / 2^(1/shape)
            v = d.scale * 2.0 ** (-1.0 / d.shape) * u ** (-1.0 / d.shape)
        else:
            v = d.scale
        return float(np.float32(max(v, d.minimum)))  # float32, as the arrays hold it

    def __getitem__(self, devices):
        if np.ndim(devices) == 0:
            return np.float32(self.item(int(devices)))
        return np.array([self.item(int(i)) for i in np.asarray(devices)], dtype=np.float32)


class OnDemandUniform:
    """A per-device uniform in (0, 1), or whether it falls below `below` (the malicious flag)."""

    def __init__(self, key: int, below: float | None = None):
        self.key, self.below = key, below

    def __getitem__(self, devices):
        if np.ndim(devices) == 0:
            u = _uniform(self.key, int(devices))
            return u < self.below if self.below is not None else np.float32(u)
        u = _uniforms(self.key, np.asarray(devices))
        return u < self.below if self.below is not None else u.astype(np.float32)


def on_demand_profiles(cfg: PopulationConfig, seed: np.random.SeedSequence) -> tuple:
    """(compute_per_example, download_bandwidth, upload_bandwidth, phase, malicious) as
    on-demand readers; phase and malicious are None where the arrays would be."""
    keys = [int(k) for k in seed.generate_state(8, np.uint64)]
    phase = OnDemandUniform(keys[6]) if cfg.availability.on_fraction < 1 else None
    malicious = OnDemandUniform(keys[7], cfg.attack.fraction) if cfg.attack.fraction else None
    return (
        OnDemandDist(cfg.compute_per_example, (keys[0], keys[1])),
        OnDemandDist(cfg.download_bandwidth, (keys[2], keys[3])),
        OnDemandDist(cfg.upload_bandwidth, (keys[4], keys[5])),
        phase,
        malicious,
    )
