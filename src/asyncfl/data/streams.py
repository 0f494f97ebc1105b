"""Large random draws in chunks: the same values as one draw, without its temporaries."""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 22  # values drawn at a time: float64 temporaries stay at 32 MB whatever the size


def chunked(n: int, draw, dtype=np.float32) -> np.ndarray:
    """`draw(k)` for k = CHUNK at a time, into one array of `dtype`: the same values as one
    draw of n (numpy's generators produce a stream), without its float64 temporaries, which at
    10^8 devices are gigabytes."""
    out = np.empty(n, dtype=dtype)
    for start in range(0, n, CHUNK):
        out[start : start + CHUNK] = draw(min(CHUNK, n - start))
    return out
