"""The server side of synchronous SecAgg / SecAgg+: route keys and shares, sum, remove the masks.

The server is honest but curious: it follows the phases, but everything it sees is either
public (keys, weights), encrypted to someone else (shares), or masked (inputs) until at least t
neighbours of a client help remove that client's masks. Each phase proceeds only with at least t
participants (`SecAggAbort` otherwise); clients that drop out after sharing keys have their
pairwise masks rebuilt from their reconstructed masking keys, survivors their self masks from
their reconstructed seeds. The result is the ring sum of the survivors' weighted encoded updates
and their total weight, which `FixedPointCodec.decode` turns back into floats.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from asyncfl.secagg import prg, shamir
from asyncfl.secagg.crypto import KeyPair
from asyncfl.secagg.graph import neighbour_graph
from asyncfl.secagg.messages import (
    AdvertiseKeys,
    IncomingShares,
    KeyDirectory,
    MaskedInput,
    RoundParams,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from asyncfl.secagg.ring import Ring
from asyncfl.secagg.secagg_client import ProtocolViolation, SecAggAbort, pairwise_mask_seed, pairwise_mask_sign


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked ring sum of the survivors' weighted updates, their total weight and ids."""

    total: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]


class SecAggServer:
    """The server's state for one round; call collect_keys, route_shares, collect_masked, unmask in order.

    A phase that raises (abort or violation) ends the round: the next call is out of turn.
    """

    def __init__(self, params: RoundParams) -> None:
        if not 1 <= params.threshold <= params.clients:
            raise ValueError(f"threshold must be in [1, {params.clients}], got {params.threshold}")
        self.params = params
        self.ring = Ring(params.bits)
        self.graph = neighbour_graph(params.clients, params.neighbours, params.round_id)
        if params.threshold > min(len(peers) for peers in self.graph.values()) + 1:
            raise ValueError(f"threshold {params.threshold} exceeds a neighbourhood of {params.neighbours} + 1 clients")
        self._phase = "collect_keys"
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shared_with: dict[int, set[int]] = {}  # client -> senders whose shares it received
        self._masked: dict[int, MaskedInput] = {}

    def collect_keys(self, adverts: Iterable[AdvertiseKeys]) -> dict[int, KeyDirectory]:
        """Phase 0: the key directory each advertising client receives (its neighbours' keys)."""
        self._advance("collect_keys", "route_shares")
        self._keys = _by_client((advert.client, advert) for advert in adverts)
        for client, advert in self._keys.items():
            if client not in self.graph or len(advert.cipher_key) != 32 or len(advert.mask_key) != 32:
                raise ProtocolViolation(f"client {client} is not in the round or advertised malformed keys")
        self._require(len(self._keys), "advertise")
        directories = {}
        for client in self._keys:
            peers = sorted(self.graph[client] & set(self._keys))
            directories[client] = KeyDirectory(
                {peer: self._keys[peer].cipher_key for peer in peers},
                {peer: self._keys[peer].mask_key for peer in peers},
            )
        return directories

    def route_shares(self, messages: Iterable[ShareKeys]) -> dict[int, IncomingShares]:
        """Phase 1: forward each encrypted share to its holder."""
        self._advance("route_shares", "collect_masked")
        shares = _by_client((message.client, message) for message in messages)
        for sender, message in shares.items():
            if sender not in self._keys or not set(message.ciphertexts) <= self.graph[sender] & set(self._keys):
                raise ProtocolViolation(f"client {sender} shared keys out of turn or with non-neighbours")
        self._require(len(shares), "share_keys")
        incoming = {client: {} for client in shares}
        for sender, message in shares.items():
            for recipient, ciphertext in message.ciphertexts.items():
                if recipient in incoming:
                    incoming[recipient][sender] = ciphertext
        self._shared_with = {client: set(ciphertexts) for client, ciphertexts in incoming.items()}
        return {client: IncomingShares(ciphertexts) for client, ciphertexts in incoming.items()}

    def collect_masked(self, inputs: Iterable[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Phase 2: keep the masked inputs; tell each survivor which of its peers survived or dropped."""
        self._advance("collect_masked", "unmask")
        self._masked = _by_client((message.client, message) for message in inputs)
        if not set(self._masked) <= set(self._shared_with):
            raise ProtocolViolation("a masked input from a client that did not share keys")
        expected_bytes = self.params.length * self.ring.element_bytes
        for client, message in self._masked.items():
            if type(message.weight) is not int or message.weight < 1 or len(message.masked) != expected_bytes:
                raise ProtocolViolation(f"client {client} sent a masked input of the wrong size or weight")
        self._require(len(self._masked), "masked_input")
        survivors = set(self._masked)
        requests = {}
        for client in sorted(survivors):
            holders = self._shared_with[client] | {client}
            requests[client] = UnmaskRequest(tuple(sorted(holders & survivors)), tuple(sorted(holders - survivors)))
            self._require(len(requests[client].survivors), "masked_input", f"surviving neighbours of client {client}")
        return requests

    def unmask(self, responses: Iterable[UnmaskResponse]) -> SecAggResult:
        """Phase 3: rebuild survivors' self-mask seeds and dropped clients' keys; remove all masks."""
        self._advance("unmask", "done")
        responses = _by_client((response.client, response) for response in responses)
        if not set(responses) <= set(self._masked):
            raise ProtocolViolation("an unmasking response from a client that sent no masked input")
        self._require(len(responses), "unmask")
        seed_shares: dict[int, list[bytes]] = {}
        key_shares: dict[int, list[bytes]] = {}
        for response in responses.values():
            for owner, share in response.self_mask_shares.items():
                seed_shares.setdefault(owner, []).append(share)
            for owner, share in response.key_shares.items():
                key_shares.setdefault(owner, []).append(share)
        ring, length = self.ring, self.params.length
        total = ring.zeros(length)
        for message in self._masked.values():
            total = ring.add(total, ring.from_bytes(message.masked, length))
        survivors = sorted(self._masked)
        for client in survivors:
            total = ring.sub(total, prg.mask(self._rebuild(client, seed_shares, "self-mask seed"), length, ring))
        dropped = sorted(set(self._shared_with) - set(self._masked))
        for gone in dropped:
            if not any(gone in self._shared_with[client] for client in survivors):
                continue  # no survivor masked with it: nothing to remove, and its key stays hidden
            gone_key = KeyPair.from_private_bytes(self._rebuild(gone, key_shares, "masking key"))
            for client in survivors:
                if gone in self._shared_with[client]:
                    seed = pairwise_mask_seed(gone_key, self._keys[client].mask_key, self.params.round_id, client, gone)
                    pairwise = prg.mask(seed, length, ring)
                    sign = pairwise_mask_sign(client, gone)
                    total = ring.sub(total, pairwise) if sign > 0 else ring.add(total, pairwise)
        total_weight = sum(message.weight for message in self._masked.values())
        return SecAggResult(total, total_weight, tuple(survivors))

    def _rebuild(self, owner: int, shares: dict[int, list[bytes]], what: str) -> bytes:
        received = shares.get(owner, [])
        try:
            return shamir.combine((shamir.Share.from_bytes(share) for share in received), self.params.threshold)
        except shamir.NotEnoughShares as error:
            raise SecAggAbort(
                "unmask", len(received), self.params.threshold, f"shares of client {owner}'s {what}"
            ) from error

    def _advance(self, expected: str, following: str) -> None:
        if self._phase != expected:
            raise ProtocolViolation(f"the server is in phase '{self._phase}', not '{expected}'")
        self._phase = following

    def _require(self, alive: int, phase: str, what: str = "clients") -> None:
        if alive < self.params.threshold:
            raise SecAggAbort(phase, alive, self.params.threshold, what)


def _by_client(pairs: Iterable[tuple[int, object]]) -> dict:
    """Messages keyed by sender; a sender twice is a protocol violation."""
    result: dict = {}
    for client, message in pairs:
        if client in result:
            raise ProtocolViolation(f"two messages from client {client} in one phase")
        result[client] = message
    return result
