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
    if not np.issubdtype(a.dtype, np.number) or np.any(a < 0) or not np.all(np.isfinite(a)):
        raise ValueError("client sizes must be finite non-negative numbers")
    return a.astype(np.float64)


def gini(sizes) -> float:
    """Gini coefficient: 0 when every client holds as many examples, (n-1)/n when one holds all."""
    a = np.sort(_sizes(sizes))
    total = a.sum()
    if total == 0:
        return 0.0
    n = a.size
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * np.dot(ranks, a) / (n * total) - (n + 1.0) / n)


def imbalance_stats(sizes) -> dict:
    """{clients, examples, min, median, mean, p90, max, gini} of examples per client."""
    a = _sizes(sizes)
    return {
        "clients": int(a.size),
        "examples": int(a.sum()),
        "min": float(a.min()),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "gini": gini(a),
    }


def plot_client_sizes(sizes, path: str | Path, title: str | None = None) -> dict:
    """Write a histogram of examples per client to `path` (PNG) and return `imbalance_stats`.

    Bins are log-spaced (and the count axis logarithmic) when sizes span more than 100x.
    """
    a = _sizes(sizes)
    stats = imbalance_stats(a)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lo, hi = max(a.min(), 1.0), max(a.max(), 1.0)
    wide = hi / lo > 100
    bins = np.geomspace(lo, hi * 1.001, 50) if wide else min(50, max(1, int(hi - a.min()) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        ax.hist(np.maximum(a, lo) if wide else a, bins=bins, color="tab:blue", edgecolor="white", linewidth=0.5)
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
