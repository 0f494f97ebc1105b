"""The SecAgg+ neighbour graph: who masks with and holds shares of whom.

All-pairs SecAgg costs O(n^2) keys, shares and PRG expansions; SecAgg+ (Bell et al. 2020) pairs
each client with only k others on a random k-regular graph, which keeps the guarantees with
high probability for k = O(log n). The graph is a Harary-style circulant: clients in a random
order on a ring, each joined to the k/2 nearest on either side, so it is exactly k-regular for
even k. The order is derived from the public round id, so every party computes the same graph
without an extra message; k >= n - 1 gives the complete graph, i.e. the original SecAgg.
"""

from __future__ import annotations

import hashlib

import numpy as np


def neighbour_graph(clients: int, degree: int, round_id: bytes) -> dict[int, frozenset[int]]:
    """Each client's neighbours (itself excluded) in the round's k-regular graph."""
    if clients < 2:
        raise ValueError(f"a round needs at least 2 clients, got {clients}")
    if degree >= clients - 1:
        everyone = frozenset(range(clients))
        return {client: everyone - {client} for client in range(clients)}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse neighbour graph needs an even degree >= 2, got {degree} for {clients} clients")
    digest = hashlib.sha256(b"asyncfl secagg graph" + round_id).digest()
    order = np.random.default_rng(int.from_bytes(digest, "big")).permutation(clients)
    graph: dict[int, set[int]] = {int(client): set() for client in order}
    for position, client in enumerate(order):
        for step in range(1, degree // 2 + 1):
            other = int(order[(position + step) % clients])
            graph[int(client)].add(other)
            graph[other].add(int(client))
    return {client: frozenset(peers) for client, peers in graph.items()}
