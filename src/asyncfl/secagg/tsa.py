"""Asynchronous secure aggregation with a trusted secure aggregator (TSA), as in Papaya.

Buffered async FL has no round in which clients could exchange pairwise masks, so each client
masks its encoded update with a fresh one-time seed, y = x + PRG(seed) mod 2^b, and seals the
seed to the TSA's public key, bound to the task and its update id. The untrusted server folds
w * y into its buffer; at a step it hands the TSA the buffer's (id, weight, sealed seed) list
and gets back sum_i w_i PRG(seed_i) (minus Gaussian noise when central DP is on), which it
subtracts to obtain sum_i w_i x_i (+ noise). The server never holds a seed or the TSA's private
key; the TSA never sees a masked update. The TSA refuses to help unless it can authenticate at
least K distinct contributions that were never used before with weights in range, and it
records them durably before answering (`tsa_store`), so no mask can be revealed alone or twice.
The server only folds an upload the TSA has verified (`verify`: the seed opens under its id and
is reserved to it), so one client's bad sealed seed costs that upload, never a buffer's step.

The TSA process stands in for a TEE enclave: in production its key pair is generated inside the
enclave and clients pin the public key from an attestation report (see
docs/secure-aggregation.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from asyncfl.secagg import prg
from asyncfl.secagg.crypto import AuthenticationError, KeyPair, hkdf, seal_to, unseal_by
from asyncfl.secagg.encoding import FixedPointCodec
from asyncfl.secagg.messages import MaskedUpload, TsaContribution, TsaRequest, TsaResponse
from asyncfl.secagg.ring import Ring
from asyncfl.secagg.tsa_store import ReplayedContribution, TsaRefusal, UsedContributionStore

_SEAL_INFO = b"asyncfl tsa seed"
_NOISE_INFO = b"asyncfl tsa noise"


class TooFewContributions(TsaRefusal):
    """Fewer than K distinct contributions: the sum would not hide an individual update."""


class WeightOutOfRange(TsaRefusal):
    """A weight that is not an integer in [1, max_weight]: it could single one update out."""


class UnauthenticatedContribution(TsaRefusal):
    """A sealed seed that fails authentication under its claimed id: tampered, or a forged id."""


def seal_binding(task: str, update_id: str) -> bytes:
    """Associated data of a sealed seed: the task and the update (lease) id it was drawn for."""
    task_bytes, id_bytes = task.encode(), update_id.encode()
    return b"asyncfl tsa" + struct.pack(">I", len(task_bytes)) + task_bytes + id_bytes


def seal_seed(seed: bytes, tsa_public_key: bytes, task: str, update_id: str) -> bytes:
    """A mask seed encrypted to the TSA, readable only under this task and update id."""
    return seal_to(tsa_public_key, seed, seal_binding(task, update_id), _SEAL_INFO)


def mask_for_tsa(encoded: np.ndarray, ring: Ring, tsa_public_key: bytes, task: str, update_id: str) -> MaskedUpload:
    """Client side: mask an encoded update with a fresh seed and seal the seed to the TSA."""
    seed = os.urandom(prg.SEED_BYTES)
    masked = ring.add(encoded, prg.mask(seed, encoded.shape[0], ring))
    return MaskedUpload(update_id, ring.to_bytes(masked), seal_seed(seed, tsa_public_key, task, update_id))


@dataclass
class MaskedBuffer:
    """Server side: the weighted ring sum of masked uploads and what the TSA needs to unmask it.

    Refuses (`RingOverflowError`) a fold that would take the total weight past the codec's
    `max_total_weight`, so a decoded sum can never have wrapped. Folding commutes, so a restarted
    server rebuilds its buffer by folding its persisted uploads again.
    """

    codec: FixedPointCodec
    length: int
    total: np.ndarray = field(init=False)
    contributions: list[TsaContribution] = field(init=False, default_factory=list)
    requested_step: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.total = self.codec.ring.zeros(self.length)

    @property
    def total_weight(self) -> int:
        return sum(contribution.weight for contribution in self.contributions)

    def fold(self, upload: MaskedUpload, weight: int) -> None:
        if int(weight) != weight or weight < 1:
            raise ValueError(f"a weight is a positive integer, got {weight}")
        if any(contribution.update_id == upload.update_id for contribution in self.contributions):
            raise ValueError(f"update {upload.update_id!r} is already in the buffer")
        self.codec.check_weight(self.total_weight + int(weight))
        ring = self.codec.ring
        self.total = ring.add(self.total, ring.scale(ring.from_bytes(upload.masked, self.length), weight))
        self.contributions.append(TsaContribution(upload.update_id, int(weight), upload.sealed_seed))

    def request(self, step_id: str) -> TsaRequest:
        """What to send the TSA for this buffer; `step_id` must be unique to the step."""
        self.requested_step = step_id
        return TsaRequest(step_id, self.length, tuple(self.contributions))

    def unmask(self, response: TsaResponse) -> np.ndarray:
        """The decoded weighted sum of the buffer's (clipped) updates, plus the TSA's noise if any."""
        if self.requested_step is None or response.step_id != self.requested_step:
            raise ValueError(f"response for step {response.step_id!r}, requested {self.requested_step!r}")
        ring = self.codec.ring
        return self.codec.decode(
            ring.sub(self.total, ring.from_bytes(response.mask_sum, self.length)), self.total_weight
        )


class TrustedAggregator:
    """The TSA: turns a buffer's sealed seeds into their weighted mask sum, under its checks.

    `noise_std` is in ring units (`FixedPointCodec.noise_std_in_ring` converts from the units of
    the decoded sum); the noise is rounded to integers and subtracted from the mask sum, so the
    server's unmasked sum carries it. The noise of a request derives from the TSA's private key
    and the request, so an exact retry gets the same answer instead of a second noise draw.
    """

    def __init__(
        self,
        key_pair: KeyPair,
        store: UsedContributionStore,
        task: str,
        length: int,
        min_contributions: int,
        max_weight: int,
        bits: int = 32,
        noise_std: float = 0.0,
    ) -> None:
        if min_contributions < 1 or max_weight < 1 or length < 1:
            raise ValueError("min_contributions, max_weight and length must be positive")
        self._key_pair, self._store = key_pair, store
        self.task, self.length = task, length
        self.min_contributions, self.max_weight = min_contributions, max_weight
        self.ring = Ring(bits)
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise std must be a finite number >= 0, got {noise_std}")
        self.noise_std = float(noise_std)

    @property
    def public_key(self) -> bytes:
        return self._key_pair.public_bytes()

    def verify(self, update_id: str, sealed_seed: bytes) -> None:
        """Check one upload's sealed seed before the server folds it: it must open under its
        update id, and its seed and id must be fresh; the seed is then reserved to this id for
        good (durably), so any later upload reusing it is refused. Raises a `TsaRefusal`."""
        seed = self._open(update_id, sealed_seed)
        self._store.reserve(update_id, f"seed:{hashlib.sha256(seed).hexdigest()}")

    def unmask(self, request: TsaRequest) -> TsaResponse:
        """Check, durably claim, and answer one step's request; raises a `TsaRefusal` subclass."""
        contributions = request.contributions
        if request.length != self.length:
            raise TsaRefusal(f"request for {request.length} coordinates, the task's model has {self.length}")
        ids = [contribution.update_id for contribution in contributions]
        if len(set(ids)) != len(ids):
            raise ReplayedContribution(f"step {request.step_id!r} names an update id twice")
        if len(ids) < self.min_contributions:
            raise TooFewContributions(f"{len(ids)} distinct contributions, at least {self.min_contributions} needed")
        for contribution in contributions:
            weight = contribution.weight
            if type(weight) is not int or not 1 <= weight <= self.max_weight:
                raise WeightOutOfRange(
                    f"contribution {contribution.update_id!r} has weight {weight!r}, allowed 1..{self.max_weight}"
                )
        seeds = [self._open(contribution.update_id, contribution.sealed_seed) for contribution in contributions]
        seed_digests = [hashlib.sha256(seed).hexdigest() for seed in seeds]
        if len(set(seed_digests)) != len(seeds):
            raise ReplayedContribution(f"step {request.step_id!r} contains one seed twice")
        digest = _request_digest(request, seed_digests)
        self._store.claim(request.step_id, digest, [f"id:{i}" for i in ids] + [f"seed:{d}" for d in seed_digests])
        ring = self.ring
        total = ring.zeros(self.length)
        for seed, contribution in zip(seeds, contributions):
            total = ring.add(total, ring.scale(prg.mask(seed, self.length, ring), contribution.weight))
        if self.noise_std > 0:
            noise_seed = hkdf(self._key_pair.private_bytes(), _NOISE_INFO + digest)
            noise = np.rint(prg.gaussian(noise_seed, self.length, self.noise_std)).astype(np.int64)
            total = ring.sub(total, ring.from_signed(noise))
        return TsaResponse(request.step_id, ring.to_bytes(total))

    def _open(self, update_id: str, sealed_seed: bytes) -> bytes:
        try:
            seed = unseal_by(self._key_pair, sealed_seed, seal_binding(self.task, update_id), _SEAL_INFO)
        except AuthenticationError as error:
            raise UnauthenticatedContribution(
                f"contribution {update_id!r} failed authentication (tampered ciphertext or forged id)"
            ) from error
        if len(seed) != prg.SEED_BYTES:
            raise UnauthenticatedContribution(f"contribution {update_id!r} sealed a malformed seed")
        return seed


def _request_digest(request: TsaRequest, seed_digests: list[str]) -> bytes:
    """What an exact retry must repeat: step, length, and every (id, weight, seed) in order."""
    rows = [[c.update_id, c.weight, seed_digest] for c, seed_digest in zip(request.contributions, seed_digests)]
    return hashlib.sha256(json.dumps([request.step_id, request.length, rows]).encode()).digest()
