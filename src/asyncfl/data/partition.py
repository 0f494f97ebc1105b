"""Non-IID partitioners. Each returns one index array per client, none empty."""

from __future__ import annotations

import numpy as np


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    """Per class, split its examples over clients with proportions ~ Dir(alpha).

    Small alpha gives each client few classes. Resamples until every client has an example,
    which is how FL benchmarks commonly avoid empty clients.
    """
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"dirichlet(alpha={alpha}) left a client empty 1000 times: "
        f"{len(labels)} examples are too few for {num_clients} clients"
    )


def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator, classes_per_client: int) -> list[np.ndarray]:
    """Sort by label, cut into num_clients * k shards, give each client k shards (McMahan et al.)."""
    n_shards = num_clients * classes_per_client
    if n_shards > len(labels):
        raise ValueError(f"shards: {n_shards} shards need at least as many examples, have {len(labels)}")
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, n_shards)
    assignment = rng.permutation(n_shards).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def quantity_skew(labels: np.ndarray, num_clients: int, rng: np.random.Generator, exponent: float) -> list[np.ndarray]:
    """IID labels, power-law sizes: client k gets a share proportional to (k+1)^-exponent."""
    n = len(labels)
    if n < num_clients:
        raise ValueError(f"quantity_skew: {n} examples cannot give {num_clients} clients one each")
    shares = (np.arange(1, num_clients + 1, dtype=float) ** -exponent)[rng.permutation(num_clients)]
    sizes = 1 + np.floor(shares / shares.sum() * (n - num_clients)).astype(int)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    return [np.sort(p) for p in np.split(rng.permutation(n), np.cumsum(sizes)[:-1])]


def partition(kind: str, labels: np.ndarray, num_clients: int, seed: int, **params) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "iid":
        if len(labels) < num_clients:
            raise ValueError(f"iid: {len(labels)} examples cannot give {num_clients} clients one each")
        return iid(labels, num_clients, rng)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, rng, params["alpha"])
    if kind == "shards":
        return shards(labels, num_clients, rng, params["classes_per_client"])
    if kind == "quantity_skew":
        return quantity_skew(labels, num_clients, rng, params["exponent"])
    raise ValueError(f"unknown partition {kind!r}")
