"""Counter-based minibatch order: a pure, vectorisable function of (n, steps, b, seed).

Each epoch orders a client's examples by a 64-bit hash of (seed, epoch, example), so any number
of clients' orders come out of one array computation; the sequential trainer calls the same
function for one client, which is what makes batched and sequential training agree exactly.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TOP = np.uint64(1 << 63)


def _fmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 with good avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix(*words) -> np.ndarray:
    """Hash of integer words (Python ints or broadcastable arrays) to uint64, element-wise."""
    h = np.zeros(1, dtype=np.uint64)  # 1-d: numpy warns on scalar overflow, never on arrays
    for w in words:
        w = np.atleast_1d(np.asarray(w & _MASK64 if isinstance(w, int) else w)).astype(np.uint64)
        h = _fmix((h + _GOLDEN) ^ _fmix(w + _GOLDEN))
    return h


def minibatches(ns, steps, bs, seeds) -> np.ndarray:
    """[max steps, clients, max b] local example indices; client j's step h takes the next b_j
    examples of its stream of epochs (each a fresh permutation). Entries beyond steps[j] or
    b_j are 0: callers give them zero weight."""
    ns, steps, bs = (np.asarray(a, dtype=np.int64) for a in (ns, steps, bs))
    seeds = np.asarray(seeds, dtype=np.uint64)
    j = len(ns)
    s_max, b_max = int(steps.max(initial=0)), int(bs.max(initial=0))
    out = np.zeros((s_max, j, b_max), dtype=np.int64)
    if j == 0 or s_max == 0:
        return out
    epochs = -(-steps * bs // ns)
    h = np.arange(s_max)[:, None, None]
    k = np.arange(b_max)[None, None, :]
    # clients of similar size share one padded sort, so padding stays below 2x; a small pass is
    # one sort, as per-bucket calls would cost more than the padding
    small = len(ns) * int(epochs.max()) * int(ns.max()) <= 1 << 16
    bucket = np.zeros(len(ns), dtype=np.int64) if small else np.floor(np.log2(ns)).astype(np.int64)
    for b in np.unique(bucket):
        sel = np.flatnonzero(bucket == b)
        n, e, s, bb = ns[sel], epochs[sel], steps[sel], bs[sel]
        n_max, e_max = int(n.max()), int(e.max())
        if e_max == 0:
            continue
        epoch_keys = mix(seeds[sel, None, None], np.arange(e_max)[None, :, None])
        keys = _fmix(epoch_keys ^ (np.arange(n_max, dtype=np.uint64) * _GOLDEN)[None, None, :])
        keys[np.broadcast_to(np.arange(n_max) >= n[:, None, None], keys.shape)] = np.uint64(_MASK64)
        # [clients, epochs, n_max]; padding sorts last. The keys of one epoch are distinct (a
        # bijection of distinct words), so every sort gives the same order: torch's is the
        # fastest, on int64 once the top bit is flipped (which maps uint64 order onto int64's)
        perm = torch.from_numpy((keys ^ _TOP).view(np.int64)).argsort(dim=2).numpy()
        stream = perm[np.broadcast_to(np.arange(n_max) < n[:, None, None], perm.shape)]  # each client's epochs, back to back
        start = np.concatenate([[0], np.cumsum(n * e_max)[:-1]])
        t = (h * bb[None, :, None] + k) + start[None, :, None]  # step h, slot k: the (h b + k)-th of the stream
        if (s == s_max).all() and (bb == b_max).all():
            out[:, sel, :] = stream[t]
        else:
            valid = (h < s[None, :, None]) & (k < bb[None, :, None])
            out[:, sel, :] = np.where(valid, stream[np.where(valid, t, 0)], 0)
    return out
