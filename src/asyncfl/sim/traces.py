"""Measured device traces read from local files: capacity (compute speed, bandwidths) and
availability (the intervals a device is online), one trace row per measured device.

Two formats. `fedscale`: FedScale's pickled dicts, the capacity file `client_id ->
{"computation": ms per example, "communication": kbit/s}` (one bandwidth, used both ways) and the
availability file `client_id -> {"active": [times it comes online], "inactive": [times it goes
offline], "finish_time" (else "duration"): seconds after which the trace repeats, ...}`.
`csv`, our own: capacity.csv with columns device,compute_s_per_example,download_bytes_per_s,
upload_bytes_per_s (one row per device) and availability.csv with columns device,start,end (one
row per online interval, seconds, repeating every `period`). Rows keep the order of their first
appearance (fedscale: sorted client ids). Everything here raises ValueError naming the file.
Online intervals are half-open, [start, end).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CAPACITY_COLUMNS = ("device", "compute_s_per_example", "download_bytes_per_s", "upload_bytes_per_s")
AVAILABILITY_COLUMNS = ("device", "start", "end")
BUILTIN = "builtin:"  # paths naming a trace the package generates (asyncfl.sim.trace_presets)


@dataclass(frozen=True)
class CapacityTrace:
    """Per trace row: its device id, seconds of compute per example, download and upload bytes
    per second."""

    ids: tuple
    compute: np.ndarray
    download: np.ndarray
    upload: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.compute)


class AvailabilityTrace:
    """Per trace row, sorted disjoint online intervals [start, end) within its period.

    Row r's intervals are shifted by r x span (span > every period) into one sorted array, so
    which interval a time falls in is one binary search for any number of devices at once."""

    def __init__(self, ids: tuple, intervals: list[list[tuple[float, float]]], periods: list[float]):
        self.ids = ids
        self.period = np.asarray(periods, dtype=np.float64)
        self.first = np.zeros(len(intervals) + 1, dtype=np.int64)
        self.first[1:] = np.cumsum([len(iv) for iv in intervals])
        self.span = float(self.period.max()) * 2.0 + 1.0
        self.row_of = np.repeat(np.arange(len(intervals)), np.diff(self.first))
        flat = np.array([p for iv in intervals for p in iv], dtype=np.float64).reshape(-1, 2)
        self.starts = flat[:, 0] + self.row_of * self.span
        self.ends = flat[:, 1] + self.row_of * self.span

    @property
    def rows(self) -> int:
        return len(self.period)

    def on_fraction(self) -> float:
        """The mean fraction of its period a row is online."""
        online = np.bincount(self.row_of, weights=self.ends - self.starts, minlength=self.rows)
        return float(np.mean(online / self.period))

    def active(self, rows: np.ndarray, t: float) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        q = rows * self.span + t % self.period[rows]
        i = np.searchsorted(self.starts, q, side="right") - 1
        return (i >= self.first[rows]) & (q < self.ends[np.maximum(i, 0)])

    def active_one(self, row: int, t: float) -> bool:
        q = row * self.span + t % float(self.period[row])
        i = int(np.searchsorted(self.starts, q, side="right")) - 1
        return i >= int(self.first[row]) and q < float(self.ends[i])


def _number(value, what: str, where: str, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} is not a number") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{where}: {what} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return x


def _csv_rows(text: str, columns: tuple[str, ...], where: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(c.strip() for c in reader.fieldnames or ())
    if header != columns:
        raise ValueError(f"{where}: columns must be {','.join(columns)}; got {','.join(header) or 'none'}")
    rows = [{k.strip(): v for k, v in row.items()} for row in reader]
    if not rows:
        raise ValueError(f"{where}: no rows")
    return rows


def _pickled(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            data = pickle.load(f)  # noqa: S301 - the user's own local trace file
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as err:
        raise ValueError(f"{path}: not a pickled FedScale trace ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: a FedScale trace is a non-empty dict of client id -> record")
    return data


def _capacity_fedscale(path: Path, compute_scale: float) -> CapacityTrace:
    compute, bandwidth = [], []
    records = sorted(_pickled(path).items())
    for cid, rec in records:
        if not isinstance(rec, dict) or "computation" not in rec or "communication" not in rec:
            raise ValueError(f"{path}: client {cid!r} needs 'computation' and 'communication'")
        compute.append(_number(rec["computation"], "computation", f"{path}: client {cid!r}") / 1000.0)
        bandwidth.append(_number(rec["communication"], "communication", f"{path}: client {cid!r}", True) * 125.0)
    bw = np.asarray(bandwidth, dtype=np.float32)  # kbit/s x 1000 / 8 = bytes/s
    ids = tuple(cid for cid, _ in records)
    return CapacityTrace(ids, np.asarray(compute, dtype=np.float32) * np.float32(compute_scale), bw, bw.copy())


def _capacity_csv(text: str, where: str, compute_scale: float) -> CapacityTrace:
    rows, seen = _csv_rows(text, CAPACITY_COLUMNS, where), set()
    values = []
    for n, row in enumerate(rows, start=2):
        if row["device"] in seen:
            raise ValueError(f"{where}: line {n}: device {row['device']!r} appears twice")
        seen.add(row["device"])
        at = f"{where}: line {n}"
        values.append(
            (
                _number(row["compute_s_per_example"], "compute_s_per_example", at),
                _number(row["download_bytes_per_s"], "download_bytes_per_s", at, True),
                _number(row["upload_bytes_per_s"], "upload_bytes_per_s", at, True),
            )
        )
    a = np.asarray(values, dtype=np.float32)
    ids = tuple(row["device"] for row in rows)
    return CapacityTrace(ids, a[:, 0] * np.float32(compute_scale), a[:, 1].copy(), a[:, 2].copy())


def _online_intervals(active, inactive, period: float, where: str) -> list[tuple[float, float]]:
    """FedScale's sorted on/off times as intervals: online from each `active` time to the next
    `inactive` one (from 0 when the first event goes offline, to the period's end after the last)."""
    if not isinstance(active, list | tuple) or not isinstance(inactive, list | tuple):
        raise ValueError(f"{where}: 'active' and 'inactive' must be lists of times")
    events = [(_number(t, "active time", where), 1) for t in active]
    events += [(_number(t, "inactive time", where), 0) for t in inactive]
    events.sort()
    out, since = [], 0.0 if events and events[0][1] == 0 else None
    for t, on in events:
        if on and since is None:
            since = t
        elif not on and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, period))
    return [(max(0.0, s), min(e, period)) for s, e in out if min(e, period) > max(0.0, s)]


def _availability_fedscale(path: Path) -> AvailabilityTrace:
    intervals, periods = [], []
    records = sorted(_pickled(path).items())
    for cid, rec in records:
        where = f"{path}: client {cid!r}"
        if not isinstance(rec, dict) or "active" not in rec or "inactive" not in rec:
            raise ValueError(f"{where}: needs 'active' and 'inactive'")
        if "finish_time" not in rec and "duration" not in rec:
            raise ValueError(f"{where}: needs 'finish_time' or 'duration' (the trace's period)")
        period = _number(rec.get("finish_time", rec.get("duration")), "period", where, True)
        intervals.append(_online_intervals(rec["active"], rec["inactive"], period, where))
        periods.append(period)
    return AvailabilityTrace(tuple(cid for cid, _ in records), intervals, periods)


def _availability_csv(text: str, where: str, period: float | None) -> AvailabilityTrace:
    by_device: dict[str, list[tuple[float, float]]] = {}
    for n, row in enumerate(_csv_rows(text, AVAILABILITY_COLUMNS, where), start=2):
        at = f"{where}: line {n}"
        start, end = _number(row["start"], "start", at), _number(row["end"], "end", at)
        if end <= start:
            raise ValueError(f"{at}: end ({end}) must come after start ({start})")
        by_device.setdefault(row["device"], []).append((start, end))
    latest = max(e for iv in by_device.values() for _, e in iv)
    period = latest if period is None else period
    if latest > period:
        raise ValueError(f"{where}: an interval ends at {latest}, after the period {period}")
    merged = []
    for iv in by_device.values():
        out: list[tuple[float, float]] = []
        for s, e in sorted(iv):  # overlapping or touching intervals become one
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        merged.append(out)
    return AvailabilityTrace(tuple(by_device), merged, [period] * len(merged))


def _text(path: str) -> tuple[str, str]:
    """(CSV text, where) of a file or of a generated trace `builtin:NAME/FILE`."""
    if path.startswith(BUILTIN):
        from asyncfl.sim.trace_presets import builtin_csv

        return builtin_csv(path[len(BUILTIN) :]), path
    p = _existing(path)
    return p.read_text(), str(p)


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"trace file {path} does not exist")
    return p


def _stamp(path: str) -> tuple | None:
    """The file's modification time and size, so that a rewritten file is read again."""
    if path.startswith(BUILTIN):
        return None
    st = _existing(path).stat()
    return st.st_mtime_ns, st.st_size


def load_capacity(path: str, fmt: str, compute_scale: float = 1.0) -> CapacityTrace:
    """A capacity trace, read once per process while the file stays the same."""
    return _load_capacity(path, fmt, compute_scale, _stamp(path))


def load_availability(path: str, fmt: str, period: float | None = None) -> AvailabilityTrace:
    """An availability trace, read once per process while the file stays the same."""
    return _load_availability(path, fmt, period, _stamp(path))


@functools.lru_cache(maxsize=8)
def _load_capacity(path: str, fmt: str, compute_scale: float, _stamp) -> CapacityTrace:
    if fmt == "fedscale":
        return _capacity_fedscale(_existing(path), compute_scale)
    return _capacity_csv(*_text(path), compute_scale)


@functools.lru_cache(maxsize=8)
def _load_availability(path: str, fmt: str, period: float | None, _stamp) -> AvailabilityTrace:
    if fmt == "fedscale":
        return _availability_fedscale(_existing(path))
    return _availability_csv(*_text(path), period)
