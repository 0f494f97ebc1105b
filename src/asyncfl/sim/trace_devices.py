"""Which trace row each simulated device follows, and its traced profile and availability.

A population no larger than the trace takes a seeded random subset of its rows (device i ->
row i of a permutation). A larger one samples rows with replacement: device i follows row
floor(u x rows), u the device's uniform hashed from (seed, i) as on-demand profiles hash theirs,
so the mapping costs nothing per device and is the same whether profiles are arrays or on demand.
"""

from __future__ import annotations

import numpy as np

from asyncfl.sim.profiles import _uniform, _uniforms
from asyncfl.sim.traces import AvailabilityTrace, load_availability, load_capacity

CHUNK = 1 << 22  # devices mapped at a time when the rows are materialised


class HashedRows:
    """device -> trace row, read like an int array: `.item(device)` and `[devices]`."""

    def __init__(self, key: int, rows: int):
        self.key, self.rows = key, rows

    def item(self, device: int) -> int:
        return min(int(_uniform(self.key, device) * self.rows), self.rows - 1)

    def __getitem__(self, devices):
        if np.ndim(devices) == 0:
            return self.item(int(devices))
        rows = (_uniforms(self.key, np.asarray(devices)) * self.rows).astype(np.int64)
        return np.minimum(rows, self.rows - 1)

    def materialise(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        for start in range(0, n, CHUNK):
            out[start : start + CHUNK] = self[np.arange(start, min(n, start + CHUNK))]
        return out


def device_rows(n: int, rows: int, seed: np.random.SeedSequence, materialise: bool):
    """Each of n devices' trace row: an int array, or a `HashedRows` reader (above `rows`
    devices, unless `materialise`)."""
    if n <= rows:
        return np.random.default_rng(seed).permutation(rows)[:n]
    hashed = HashedRows(int(seed.generate_state(1, np.uint64)[0]), rows)
    return hashed.materialise(n) if materialise else hashed


class TracedColumn:
    """One traced quantity read per device through its row, like the profile array it replaces."""

    def __init__(self, values: np.ndarray, rows):
        self.values, self.rows = values, rows

    def item(self, device: int):
        return self.values[self.rows.item(device)].item()

    def __getitem__(self, devices):
        return self.values[self.rows[devices]]


class TracedAvailability:
    """Whether devices are online at virtual time t, by their rows' intervals."""

    def __init__(self, trace: AvailabilityTrace, rows):
        self.trace, self.rows = trace, rows

    def active(self, devices: np.ndarray, t: float) -> np.ndarray:
        return self.trace.active(self.rows[devices], t)

    def active_one(self, device: int, t: float) -> bool:
        return self.trace.active_one(self.rows.item(device), t)


def traced_profiles(traces, n: int, seed: np.random.SeedSequence, profiles: tuple, on_demand: bool):
    """`profiles` (compute_per_example, download_bandwidth, upload_bandwidth, phase, malicious)
    with the traced quantities replaced (phase by None under an availability trace), and the
    TracedAvailability or None. `traces` is a TraceConfig. When both traces hold the same device
    ids, a device follows one measured device in both; otherwise the two map devices to rows
    independently (FedScale's two traces hold different clients)."""
    compute, download, upload, phase, malicious = profiles
    base = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, 0x7ACE))
    capacity_ss, availability_ss = base.spawn(2)
    cap = cap_rows = None
    if traces.capacity is not None:
        cap = load_capacity(traces.capacity, traces.format, traces.compute_scale)
        rows = cap_rows = device_rows(n, cap.rows, capacity_ss, materialise=not on_demand)
        columns = [TracedColumn(v, rows) if on_demand else v[rows] for v in (cap.compute, cap.download, cap.upload)]
        for column in columns:
            if isinstance(column, np.ndarray):
                column.flags.writeable = False
        compute, download, upload = columns
    availability = None
    if traces.availability is not None:
        trace = load_availability(traces.availability, traces.format, traces.period)
        if cap is not None and set(cap.ids) == set(trace.ids):
            row_of_id = {device: r for r, device in enumerate(trace.ids)}
            same = np.array([row_of_id[device] for device in cap.ids], dtype=np.int64)
            rows = same[cap_rows] if isinstance(cap_rows, np.ndarray) else TracedColumn(same, cap_rows)
        else:
            rows = device_rows(n, trace.rows, availability_ss, materialise=not on_demand)
        availability = TracedAvailability(trace, rows)
        phase = None
    return (compute, download, upload, phase, malicious), availability
