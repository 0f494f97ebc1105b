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
        # keys[r, c]: example r of column c = client * e_max + epoch. Long rows keep the
        # broadcast operations fast. The keys of one epoch are distinct (a bijection of distinct
        # words), so every sort gives the same order; flipping the top bit maps uint64 order onto
        # int64's, and padding gets the largest int64, so it sorts last
        cols = len(sel) * e_max
        epoch_keys = mix(seeds[sel, None], np.arange(e_max)[None, :]).reshape(-1)
        keys = _fmix(epoch_keys[None, :] ^ (np.arange(n_max, dtype=np.uint64) * _GOLDEN)[:, None])
        keys ^= _TOP
        keys = keys.view(np.int64)
        if int(n.min()) < n_max:
            np.putmask(keys, np.arange(n_max)[:, None] >= np.repeat(n, e_max)[None, :], np.iinfo(np.int64).max)
        perm = np.argsort(keys, axis=0).reshape(-1)  # perm[r * cols + c]: the r-th example of column c
        # step h, slot k takes the q-th example of the client's stream of epochs, q = h b + k:
        # position q % n of epoch q // n. That depends on (n, b, steps) alone: one table per
        # distinct triple (a pass has few), then each client's first column
        triple = (n * (b_max + 1) + bb) * (s_max + 1) + s
        _, first, inv = np.unique(triple, return_index=True, return_inverse=True)
        nu, bu, su = n[first, None, None], bb[first, None, None], s[first, None, None]
        epoch, pos = np.divmod(h.reshape(1, -1, 1) * bu + k, nu)  # [triples, s_max, b_max]
        table = pos * cols + epoch
        padded = not ((s == s_max).all() and (bb == b_max).all())
        if padded:  # slots past a client's steps or batch: pushed below zero, then to -1, which reads index 0
            table[(h.reshape(1, -1, 1) >= su) | (k >= bu)] = -(1 << 62)
        flat = np.add(table.transpose(1, 0, 2)[:, inv, :], (np.arange(len(sel)) * e_max)[None, :, None], order="C")
        if padded:
            flat = np.maximum(flat, -1)
            perm = np.append(perm, 0)
        if len(sel) == j:  # a single bucket
            return perm[flat]
        out[:, sel, :] = perm[flat]
    return out


def epoch_batches(n: int, batches: int, batch_size: int, seed) -> np.ndarray:
    """[batches, min(batch_size, n)] local example indices of one client in epochs mode: epoch e
    is a fresh permutation (the one `minibatches` gives the same client's epoch e) cut into
    ceil(n / batch_size) batches in order, the last holding what is left; a short batch's row
    is padded with 0 past its size (callers weigh padding zero). Row t is batch t % per_epoch of
    epoch t // per_epoch, so any prefix of rows is the start of the same sequence."""
    per_epoch = -(-n // batch_size)
    epoch, slot = np.divmod(np.arange(batches), per_epoch)
    epoch_keys = mix(seed, np.arange(int(epoch.max(initial=-1)) + 1))
    order = np.argsort(_fmix(epoch_keys[:, None] ^ (np.arange(n, dtype=np.uint64) * _GOLDEN)[None, :]), axis=1)
    pos = slot[:, None] * batch_size + np.arange(min(batch_size, n))[None, :]
    return np.where(pos < n, order[epoch[:, None], np.minimum(pos, n - 1)], 0)
