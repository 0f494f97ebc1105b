"""The client side of synchronous SecAgg / SecAgg+ as a pure state machine over four phases.

A client u hides its encoded, weighted update x_u behind two kinds of masks:
  y_u = w_u x_u + PRG(b_u) + sum_(v<u) PRG(s_uv) - sum_(v>u) PRG(s_uv)  (mod 2^b),
over its neighbours v that completed key sharing. Pairwise masks cancel in the sum of survivors;
the self mask PRG(b_u) protects u if the server wrongly believes u dropped (its pairwise masks
are then removed, but b_u is never revealed for a dropped client). Both b_u and the masking
private key s_u are t-of-(k+1) Shamir-shared among u's neighbours and u itself, each share
AEAD-encrypted to its holder. In the unmasking phase a client reveals, per peer, either the share
of b_v (v survived) or of s_v (v dropped) and refuses to ever reveal both for one peer: holding
both would let the server strip all of v's masks and read x_v.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from asyncfl.secagg import prg, shamir
from asyncfl.secagg.crypto import KeyPair, seal, unseal
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

_SHARE_BYTES = 3 + 66
_ID = struct.Struct(">I")


class SecAggAbort(RuntimeError):
    """Too few participants left to continue a phase safely; names the phase and the counts."""

    def __init__(self, phase: str, alive: int, needed: int, detail: str = "") -> None:
        self.phase, self.alive, self.needed = phase, alive, needed
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"secure aggregation aborted in phase '{phase}': {alive} left, {needed} needed{suffix}")


class ProtocolViolation(ValueError):
    """A message that breaks the protocol (wrong phase, unknown peer, a request to reveal too much)."""


def pairwise_mask_seed(own: KeyPair, peer_public: bytes, round_id: bytes, a: int, b: int) -> bytes:
    """The PRG seed s_uv that clients a and b (either order) agree on for this round."""
    return own.derive(peer_public, b"asyncfl secagg mask" + round_id + _pair(a, b))


def pairwise_mask_sign(client: int, peer: int) -> int:
    """+1 if `client` adds PRG(s_uv) for this peer (peer < client), -1 if it subtracts it."""
    return 1 if peer < client else -1


def _pair(a: int, b: int) -> bytes:
    return _ID.pack(min(a, b)) + _ID.pack(max(a, b))


class SecAggClient:
    """One client's view of one round; call advertise, share_keys, masked_input, unmask in order."""

    def __init__(self, params: RoundParams, client: int) -> None:
        if not 0 <= client < params.clients:
            raise ValueError(f"client id {client} outside the round's 0..{params.clients - 1}")
        self.params, self.client = params, client
        self.ring = Ring(params.bits)
        self.neighbours = neighbour_graph(params.clients, params.neighbours, params.round_id)[client]
        self._cipher_key, self._mask_key = KeyPair(), KeyPair()
        self._self_seed = os.urandom(prg.SEED_BYTES)
        self._phase = "advertise"
        self._directory: KeyDirectory | None = None
        self._share_keys: dict[int, bytes] = {}  # peer -> AEAD key for the shares exchanged with it
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (self-mask share, key share)
        self._revealed: dict[int, str] = {}  # peer -> "self_mask" or "key"

    def advertise(self) -> AdvertiseKeys:
        self._advance("advertise", "share_keys")
        return AdvertiseKeys(self.client, self._cipher_key.public_bytes(), self._mask_key.public_bytes())

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Shamir-share b_u and s_u among the neighbours that advertised keys, plus self."""
        self._advance("share_keys", "masked_input")
        peers = sorted(directory.cipher_keys)
        if set(peers) != set(directory.mask_keys) or not set(peers) <= self.neighbours:
            raise ProtocolViolation("the key directory names peers that are not this client's neighbours")
        self._directory = directory
        info = b"asyncfl secagg shares" + self.params.round_id
        self._share_keys = {
            peer: self._cipher_key.derive(directory.cipher_keys[peer], info + _pair(self.client, peer))
            for peer in peers
        }
        holders = [*peers, self.client]
        self._require(len(holders), "share_keys", "neighbours with keys, self included")
        points = [holder + 1 for holder in holders]
        seed_shares = shamir.split(self._self_seed, self.params.threshold, points)
        key_shares = shamir.split(self._mask_key.private_bytes(), self.params.threshold, points)
        own_point = self.client + 1
        self._held[self.client] = (seed_shares[own_point].to_bytes(), key_shares[own_point].to_bytes())
        ciphertexts = {}
        for peer in peers:
            plaintext = (
                _pair_ordered(self.client, peer) + seed_shares[peer + 1].to_bytes() + key_shares[peer + 1].to_bytes()
            )
            ciphertexts[peer] = seal(self._share_keys[peer], plaintext, self._share_binding(self.client, peer))
        return ShareKeys(self.client, ciphertexts)

    def masked_input(self, incoming: IncomingShares, encoded: np.ndarray, weight: int) -> MaskedInput:
        """Store the neighbours' shares and upload y_u for the encoded update times its integer weight."""
        self._advance("masked_input", "unmask")
        assert self._directory is not None
        if not set(incoming.ciphertexts) <= set(self._directory.cipher_keys):
            raise ProtocolViolation("shares from a peer that did not advertise keys to this client")
        if int(weight) != weight or weight < 1:
            raise ValueError(f"a weight is a positive integer, got {weight}")
        if encoded.shape != (self.params.length,):
            raise ValueError(f"the update has shape {encoded.shape}, the round expects ({self.params.length},)")
        for sender, ciphertext in incoming.ciphertexts.items():
            plaintext = unseal(self._share_keys[sender], ciphertext, self._share_binding(sender, self.client))
            if plaintext[: 2 * _ID.size] != _pair_ordered(sender, self.client):
                raise ProtocolViolation(f"shares from {sender} name other participants")
            body = plaintext[2 * _ID.size :]
            self._held[sender] = (body[:_SHARE_BYTES], body[_SHARE_BYTES:])
        self._require(len(self._held), "masked_input", "peers holding shares, self included")
        length, ring = self.params.length, self.ring
        masked = ring.add(ring.scale(encoded, weight), prg.mask(self._self_seed, length, ring))
        for peer in incoming.ciphertexts:
            seed = pairwise_mask_seed(
                self._mask_key, self._directory.mask_keys[peer], self.params.round_id, self.client, peer
            )
            pairwise = prg.mask(seed, length, ring)
            masked = (
                ring.add(masked, pairwise) if pairwise_mask_sign(self.client, peer) > 0 else ring.sub(masked, pairwise)
            )
        return MaskedInput(self.client, int(weight), ring.to_bytes(masked))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal b-shares for surviving peers and s-shares for dropped ones, never both for one peer."""
        self._advance("unmask", "unmask")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolViolation(f"peers {sorted(survivors & dropped)} announced both surviving and dropped")
        if self.client not in survivors:
            raise ProtocolViolation("this client is alive but not announced as a survivor")
        unknown = (survivors | dropped) - set(self._held)
        if unknown:
            raise ProtocolViolation(f"no shares held for peers {sorted(unknown)}")
        self._require(len(survivors), "unmask", "surviving peers, self included")
        for peer, kind in [(p, "self_mask") for p in survivors] + [(p, "key") for p in dropped]:
            if self._revealed.setdefault(peer, kind) != kind:
                raise ProtocolViolation(f"refusing to reveal both the self-mask and the key share of client {peer}")
        return UnmaskResponse(
            self.client,
            {peer: self._held[peer][0] for peer in sorted(survivors)},
            {peer: self._held[peer][1] for peer in sorted(dropped)},
        )

    def _advance(self, expected: str, following: str) -> None:
        if self._phase != expected:
            raise ProtocolViolation(f"client {self.client} is in phase '{self._phase}', not '{expected}'")
        self._phase = following

    def _require(self, alive: int, phase: str, what: str) -> None:
        if alive < self.params.threshold:
            raise SecAggAbort(phase, alive, self.params.threshold, f"client {self.client}: {what}")

    def _share_binding(self, sender: int, recipient: int) -> bytes:
        return b"asyncfl secagg shares" + self.params.round_id + _pair_ordered(sender, recipient)


def _pair_ordered(sender: int, recipient: int) -> bytes:
    return _ID.pack(sender) + _ID.pack(recipient)
