"""Device population held as arrays, so 10^6 devices cost a few tens of MB."""

from __future__ import annotations

import json

import numpy as np

from asyncfl.config import Dist, PopulationConfig
from asyncfl.data.streams import chunked
from asyncfl.sim.profiles import on_demand_profiles
from asyncfl.sim.trace_devices import traced_profiles


def _draw(dist: Dist, k: int, rng: np.random.Generator) -> np.ndarray:
    if dist.kind == "lognormal":
        return dist.scale * np.exp(dist.sigma * rng.standard_normal(k))
    if dist.kind == "halfnormal":
        return np.abs(dist.scale * rng.standard_normal(k))
    if dist.kind == "exponential":
        return rng.exponential(dist.scale, k)
    if dist.kind == "pareto":  # scale is the median: x_m = scale / 2^(1/shape)
        return dist.scale * 2.0 ** (-1.0 / dist.shape) * (1.0 + rng.pareto(dist.shape, k))
    return np.full(k, dist.scale)


def sample(dist: Dist, n: int, rng: np.random.Generator) -> np.ndarray:
    return chunked(n, lambda k: np.maximum(_draw(dist, k, rng), dist.minimum))


TRACED_ROUNDS, MAX_DRAWS = 12, 1 << 20  # traced pick(): rounds of rejection sampling, most ids a round draws
EXHAUSTIVE_UP_TO = 1_000_000  # above, a traced pick() does not scan every free device for the last few

_PROFILES: dict[str, tuple] = {}  # the last population drawn in this process, by config and seed


def _shared_profiles(cfg: PopulationConfig, seed: np.random.SeedSequence) -> tuple:
    """(compute_per_example, download_bandwidth, upload_bandwidth, phase, malicious), read-only,
    drawn once per process for the last (config, seed) asked for."""
    key = json.dumps([cfg.model_dump(mode="json"), str(seed.entropy), list(seed.spawn_key)])
    if key not in _PROFILES:
        _PROFILES.clear()  # one population at a time: at 10^8 devices each holds gigabytes
        _PROFILES[key] = _draw_profiles(cfg, seed)
    return _PROFILES[key]


def _draw_profiles(cfg: PopulationConfig, seed: np.random.SeedSequence) -> tuple:
    rng = np.random.default_rng(seed)
    n = cfg.devices
    arrays = [sample(cfg.compute_per_example, n, rng), sample(cfg.download_bandwidth, n, rng)]
    arrays.append(sample(cfg.upload_bandwidth, n, rng))
    arrays.append(chunked(n, rng.random) if cfg.availability.on_fraction < 1 else None)
    a = cfg.attack  # drawn last, so a run without attackers keeps every other draw
    arrays.append(chunked(n, lambda k: rng.random(k) < a.fraction, bool) if a.fraction else None)
    for array in arrays:
        if array is not None:
            array.flags.writeable = False
    return tuple(arrays)


def trip_timing(
    compute_per_example, download_bandwidth, upload_bandwidth, steps, per_step, download_bytes, upload_bytes
):
    """(download time, time per local step, whole trip duration) in virtual seconds: the model's
    download, `steps` steps of `per_step` gradient examples each, then the update's upload.

    The one formula for the simulator (Python floats, once per trip) and the study (float64
    arrays over every device): elementwise the same operations in the same order, so both give
    bit-identical durations.
    """
    download = download_bytes / download_bandwidth
    step_time = compute_per_example * per_step
    return download, step_time, download + steps * step_time + upload_bytes / upload_bandwidth


class Population:
    """Every device's profile (speeds, bandwidths, availability phase, whether it attacks) as
    arrays, and which devices are busy now.

    The profile arrays are drawn from `seed` (a SeedSequence) and read-only: runs of one process
    with the same population config and seed (a study's grid, a robustness matrix's defences)
    share one draw (`_shared_profiles`); only the busy flags are the run's own. With
    `profiles: on_demand` (by default above 10^7 devices) they are readers that compute a
    device's values when asked (`asyncfl.sim.profiles`), and a population costs its busy flags.
    With `traces`, measured capacities replace the drawn ones and measured online intervals
    the diurnal model (`asyncfl.sim.trace_devices`).
    """

    def __init__(self, cfg: PopulationConfig, seed: np.random.SeedSequence, shared: bool = True):
        """`shared=False`: a draw of this population alone, which leaves the process's shared
        draw in place (a study's round-timeout sample between its runs)."""
        n = cfg.devices
        self.size = n
        if cfg.on_demand():
            profiles = on_demand_profiles(cfg, seed)
        else:
            profiles = _shared_profiles(cfg, seed) if shared else _draw_profiles(cfg, seed)
        self.traced = None  # TracedAvailability: devices online by their trace rows' intervals
        if cfg.traces is not None:
            profiles, self.traced = traced_profiles(cfg.traces, n, seed, profiles, cfg.on_demand())
        self.compute_per_example, self.download_bandwidth, self.upload_bandwidth, self.phase, self.malicious = profiles
        self.period = cfg.availability.period
        self.on_fraction = cfg.availability.on_fraction
        self.busy = np.zeros(n, dtype=bool)
        self.attack = cfg.attack.attack()  # what the malicious devices do; None without attackers
        self._stream: list[int] = []  # pre-drawn uniform device ids for small picks

    def trip_durations(
        self, steps: np.ndarray, per_step: np.ndarray, download_bytes: int, upload_bytes: int
    ) -> np.ndarray:
        """Every device's trip duration (seconds), device i training steps[i] steps of per_step[i]
        examples (the simulator times one trip with `trip_timing` on the same device's values)."""
        return trip_timing(
            self.compute_per_example.astype(np.float64),
            self.download_bandwidth.astype(np.float64),
            self.upload_bandwidth.astype(np.float64),
            steps,
            per_step,
            download_bytes,
            upload_bytes,
        )[2]

    def available(self, ids: np.ndarray, t: float) -> np.ndarray:
        if self.traced is not None:
            return self.traced.active(ids, t)
        if self.phase is None:
            return np.ones(len(ids), dtype=bool)
        return (t / self.period + self.phase[ids]) % 1.0 < self.on_fraction

    def _pick_few(self, k: int, t: float, rng: np.random.Generator) -> list[int]:
        """Walk a pre-drawn stream of uniform ids, skipping ineligible ones: an async report asks
        for one device, and a vectorised draw per report would dominate the loop at 10^4 in flight."""
        out: list[int] = []
        busy, stream, traced = self.busy, self._stream, self.traced
        for _ in range(16 * k):
            if not stream:
                stream = self._stream = rng.integers(0, self.size, 4096).tolist()[::-1]
            d = stream.pop()
            if busy[d] or d in out:
                continue
            if self.phase is not None and (t / self.period + self.phase[d]) % 1.0 >= self.on_fraction:
                continue
            if traced is not None and not traced.active_one(d, t):
                continue
            out.append(d)
            if len(out) == k:
                break
        return out

    def pick(self, k: int, t: float, rng: np.random.Generator) -> list[int]:
        """Up to k distinct idle, eligible devices, uniformly at random."""
        if k <= 0:
            return []
        if k <= 16:
            few = self._pick_few(k, t, rng)
            if len(few) == k:
                return few
            chosen = np.array(few, dtype=np.int64)
        else:
            chosen = np.empty(0, dtype=np.int64)
        # rejection sampling: cheap when most devices are free. A trace can leave few devices
        # online at once, and a large population is too large to scan for them: there, it goes
        # on with 4x more candidates each round
        sparse = self.traced is not None and self.size > EXHAUSTIVE_UP_TO
        for r in range(TRACED_ROUNDS if sparse else 4):
            draws = 2 * (k - len(chosen)) + 8
            draws = draws if r < 4 else min(draws << 2 * (r - 3), MAX_DRAWS)
            cand = np.unique(rng.integers(0, self.size, size=draws))
            ok = ~self.busy[cand]
            if self.phase is not None or self.traced is not None:
                ok &= self.available(cand, t)
            cand = cand[ok]
            if len(chosen):  # the fast path may have found some
                cand = np.setdiff1d(cand, chosen, assume_unique=True)
                chosen = np.concatenate([chosen, rng.permutation(cand)[: k - len(chosen)]])
            else:
                chosen = rng.permutation(cand)[:k]
            if len(chosen) == k:
                return chosen.tolist()
        if sparse:
            return chosen.tolist()  # ~10^6 uniform candidates found too few: hardly any is online
        free = np.flatnonzero(~self.busy)
        free = free[self.available(free, t)]
        free = np.setdiff1d(free, chosen, assume_unique=True)
        extra = rng.choice(free, size=min(k - len(chosen), len(free)), replace=False)
        return np.concatenate([chosen, extra]).astype(np.int64).tolist()
