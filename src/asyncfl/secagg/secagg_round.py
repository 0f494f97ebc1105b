"""One SecAgg / SecAgg+ round with all clients in process: for tests, the simulator and the bench.

It moves the messages between `SecAggClient`s and a `SecAggServer` exactly as a transport
would, drops the clients named in `dropouts` before the phase they are listed under (a dropped
client sends nothing from that phase on), and counts the bytes each phase sends up and down
(`messages.wire_bytes`) so a cost model can charge them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from asyncfl.secagg.encoding import FixedPointCodec
from asyncfl.secagg.messages import RoundParams, wire_bytes
from asyncfl.secagg.secagg_client import SecAggClient
from asyncfl.secagg.secagg_server import SecAggServer

PHASES = ("advertise", "share_keys", "masked_input", "unmask")


@dataclass(frozen=True)
class RoundResult:
    """The decoded weighted sum of the survivors' clipped updates, and what the round cost."""

    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    upload_bytes: dict[str, int]
    download_bytes: dict[str, int]
    client_seconds: dict[str, float]  # per phase, summed over the clients (encoding included)
    server_seconds: dict[str, float]  # per phase


def make_params(
    clients: int, threshold: int, neighbours: int | None, length: int, bits: int = 32, round_id: bytes | None = None
) -> RoundParams:
    """Round parameters; `neighbours=None` is all pairs (the original SecAgg)."""
    degree = clients - 1 if neighbours is None else neighbours
    return RoundParams(round_id or os.urandom(16), clients, threshold, degree, length, bits)


def run_round(
    params: RoundParams,
    codec: FixedPointCodec,
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, int],
    rng: np.random.Generator,
    dropouts: Mapping[str, Collection[int]] | None = None,
) -> RoundResult:
    """Run the four phases for clients `updates.keys()`; raises `SecAggAbort` if too few remain.

    `dropouts` maps a phase name in PHASES to the clients that drop just before it.
    """
    dropouts = dict(dropouts or {})
    if unknown := set(dropouts) - set(PHASES):
        raise ValueError(f"unknown phases {sorted(unknown)}; phases are {PHASES}")
    if codec.ring.bits != params.bits:
        raise ValueError(f"the codec's ring has {codec.ring.bits} bits, the round {params.bits}")
    server = SecAggServer(params)
    clients = {client: SecAggClient(params, client) for client in updates}
    up = dict.fromkeys(PHASES, 0)
    down = dict.fromkeys(PHASES, 0)
    alive = set(clients)

    def survivors_of(phase: str) -> list[int]:
        alive.difference_update(dropouts.get(phase, ()))
        return sorted(alive)

    def sent(phase: str, messages: list) -> list:
        up[phase] += sum(wire_bytes(message) for message in messages)
        return messages

    def delivered(phase: str, replies: dict) -> dict:
        down[phase] += sum(wire_bytes(reply) for reply in replies.values())
        return replies

    client_s = dict.fromkeys(PHASES, 0.0)
    server_s = dict.fromkeys(PHASES, 0.0)

    def on_clients(phase: str, work) -> list:
        t0 = time.perf_counter()
        out = sent(phase, [work(c) for c in survivors_of(phase)])
        client_s[phase] += time.perf_counter() - t0
        return out

    def on_server(phase: str, work, messages):
        t0 = time.perf_counter()
        out = work(messages)
        server_s[phase] += time.perf_counter() - t0
        return out

    directories = delivered(
        "advertise",
        on_server("advertise", server.collect_keys, on_clients("advertise", lambda c: clients[c].advertise())),
    )
    shares = on_clients("share_keys", lambda c: clients[c].share_keys(directories[c]))
    incoming = delivered("share_keys", on_server("share_keys", server.route_shares, shares))
    inputs = on_clients(
        "masked_input", lambda c: clients[c].masked_input(incoming[c], codec.encode(updates[c], rng), weights[c])
    )
    requests = delivered("masked_input", on_server("masked_input", server.collect_masked, inputs))
    t0 = time.perf_counter()
    responses = [clients[c].unmask(requests[c]) for c in survivors_of("unmask") if c in requests]
    client_s["unmask"] += time.perf_counter() - t0
    result = on_server("unmask", server.unmask, sent("unmask", responses))
    t0 = time.perf_counter()
    total = codec.decode(result.total, result.total_weight)
    server_s["unmask"] += time.perf_counter() - t0
    return RoundResult(total, result.total_weight, result.survivors, up, down, client_s, server_s)
