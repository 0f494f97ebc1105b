"""Peak resident memory, as summaries report it (MB): what a run or a study needed at most."""

from __future__ import annotations

import resource


def process_peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_rss_mb() -> dict:
    """Peak resident set size of this process and of the largest finished child (MB)."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main": process_peak_rss_mb(), "largest_worker": round(child, 1) if child else None}
