"""Counter-based minibatch order: a pure, vectorisable function of (n, steps, b, seed).

Each epoch orders a client's examples by a 64-bit hash of (seed, epoch, example), so any number
of clients' orders come out of one array computation; the sequential trainer calls the same
function for one client, which is what makes batched and sequential training agree exactly.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TOP = np.uint64(1 << 63)


def _fmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 with good avalanche (a new array; the
    steps after the first work in place, as this runs on every key of every pass)."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


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
        # [clients, epochs, n_max]. The keys of one epoch are distinct (a bijection of distinct
        # words), so every sort gives the same order; flipping the top bit maps uint64 order onto
        # int64's, and padding gets the largest int64, so it sorts last
        keys ^= _TOP
        keys = keys.view(np.int64)
        if int(n.min()) < n_max:
            keys[np.broadcast_to(np.arange(n_max) >= n[:, None, None], keys.shape)] = np.iinfo(np.int64).max
        perm = np.argsort(keys, axis=2).reshape(-1)
        # step h, slot k takes the q-th example of the client's stream of epochs, q = h b + k:
        # position q % n of epoch q // n
        q = h * bb[None, :, None] + k
        epoch, pos = np.divmod(q, n[None, :, None])
        flat = (epoch + (np.arange(len(sel)) * e_max)[None, :, None]) * n_max + pos
        if not ((s == s_max).all() and (bb == b_max).all()):
            valid = (h < s[None, :, None]) & (k < bb[None, :, None])
            flat = np.where(valid, flat, -1)  # -1: a slot past a client's steps or batch reads index 0
            perm = np.append(perm, 0)
        if len(sel) == j:  # a single bucket
            return perm[flat]
        out[:, sel, :] = perm[flat]
    return out
