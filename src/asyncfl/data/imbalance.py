"""Data-imbalance report from client sizes: summary statistics and a histogram PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _sizes(sizes) -> np.ndarray:
    a = np.asarray(sizes)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"client sizes must be a non-empty 1-D array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or a.min() < 0 or not np.isfinite(a.max()):
        raise ValueError("client sizes must be finite non-negative numbers")
    return a


def _counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct sizes ascending, how many clients hold each): the sorted sizes, run-length
    encoded. Example counts are small integers, so at 10^8 clients a bincount replaces a sort
    of the whole population (seconds and gigabytes) with one pass."""
    if np.issubdtype(a.dtype, np.integer) and int(a.max()) <= 1 << 24:
        counts = np.bincount(a)
        values = np.flatnonzero(counts)
        return values.astype(np.float64), counts[values]
    values, counts = np.unique(a, return_counts=True)
    return values.astype(np.float64), counts


def _percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """np.percentile (linear interpolation) of the sizes `values` repeated `counts` times."""
    ends = np.cumsum(counts)  # sorted position i holds values[searchsorted(ends, i, "right")]
    pos = q / 100 * (ends[-1] - 1)
    lo, hi = (values[np.searchsorted(ends, int(p), side="right")] for p in (np.floor(pos), np.ceil(pos)))
    return float(lo + (hi - lo) * (pos - np.floor(pos)))


def gini(sizes) -> float:
    """Gini coefficient: 0 when every client holds as many examples, (n-1)/n when one holds all."""
    values, counts = _counts(_sizes(sizes))
    return _gini(values, counts)


def _gini(values: np.ndarray, counts: np.ndarray) -> float:
    total = float(np.dot(values, counts))
    if total == 0:
        return 0.0
    n = float(counts.sum())
    before = np.cumsum(counts) - counts  # clients ranked below each size
    rank_sums = counts * before + counts * (counts + 1) / 2  # sum of the 1-based ranks holding it
    return float(2.0 * np.dot(rank_sums, values) / (n * total) - (n + 1.0) / n)


def imbalance_stats(sizes) -> dict:
    """{clients, examples, min, median, mean, p90, max, gini} of examples per client."""
    values, counts = _counts(_sizes(sizes))
    n, total = int(counts.sum()), float(np.dot(values, counts))
    return {
        "clients": n,
        "examples": int(total),
        "min": float(values[0]),
        "median": _percentile(values, counts, 50),
        "mean": total / n,
        "p90": _percentile(values, counts, 90),
        "max": float(values[-1]),
        "gini": _gini(values, counts),
    }


def plot_client_sizes(sizes, path: str | Path, title: str | None = None) -> dict:
    """Write a histogram of examples per client to `path` (PNG) and return `imbalance_stats`.

    Bins are log-spaced (and the count axis logarithmic) when sizes span more than 100x.
    """
    a = _sizes(sizes)
    values, counts = _counts(a)
    stats = imbalance_stats(a)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = max(values[0], 1.0), max(values[-1], 1.0)
    wide = hi / lo > 100
    bins = np.geomspace(lo, hi * 1.001, 50) if wide else min(50, max(1, int(hi - values[0]) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    try:  # a histogram of the distinct sizes weighted by their counts: the same bars as of every client
        ax.hist(
            np.maximum(values, lo) if wide else values,
            bins=bins,
            weights=counts,
            color="tab:blue",
            edgecolor="white",
            linewidth=0.5,
        )
        if wide:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("examples per client")
        ax.set_ylabel("clients")
        ax.set_title(
            f"{title or 'examples per client'}\n{stats['clients']} clients, median {stats['median']:g}, "
            f"mean {stats['mean']:.1f}, p90 {stats['p90']:g}, max {stats['max']:g}, "
            f"Gini {stats['gini']:.3f}",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return stats


def data_summary(cfg_data, sizes, out: Path, **extra) -> dict:
    """The `data` block of a summary: dataset, partition, `extra` fields and the imbalance of the
    examples per client every run trained on (its histogram written to out/client_sizes.png)."""
    kind = cfg_data.partition.kind
    title = f"{cfg_data.dataset}, {kind} partition"
    return {
        "dataset": cfg_data.dataset,
        "partition": kind,
        **extra,
        **plot_client_sizes(sizes, out / "client_sizes.png", title),
    }
