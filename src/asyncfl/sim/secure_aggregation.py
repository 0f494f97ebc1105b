"""What secure aggregation costs a simulated run, and what it does to the updates.

Bytes come from the protocols themselves: one in-process round (`secagg.run_round`, or a real
TSA upload and request) on a vector of `PROBE_LENGTH` coordinates is measured once per run, and
the masked vector's share is scaled to the model's length (`bits`/8 bytes per coordinate; the
test checks this against a round at the full length). Every transfer of a trip is charged to
it: the extra phases (advertise keys, share keys, unmask) lengthen the trip by their bytes over
the device's bandwidth, and client compute by the measured per-coordinate costs below. The
unmask phase follows the round's upload; charging it to the trip is the same round duration as
long as the last survivor's unmask takes about as long as the others'.

The aggregate is the plaintext one within the encoding bound, so the simulator folds plaintext
updates, but each update goes through what the client does first: clipping of every coordinate
to [-clip_range, clip_range] and (with `rounding`) the fixed-point encoding's stochastic
rounding (`FixedPointCodec`), decoded back to floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from asyncfl.config.secure_aggregation import SecureAggregationConfig, neighbours, sync_threshold
from asyncfl.secagg import FixedPointCodec, Ring, make_params, mask_for_tsa, run_round
from asyncfl.secagg.crypto import KeyPair
from asyncfl.secagg.messages import TsaContribution, TsaRequest, TsaResponse, wire_bytes

# Client compute per coordinate, measured on the development machine (one core, numpy 2, AES-NI)
# by timing FixedPointCodec.encode and prg.mask + Ring.add on a 10^6-coordinate vector
# (mean of 3 runs): encode 14 ns, one mask expansion and addition 7.2 ns. A SecAgg+ client
# expands its self mask and one pairwise mask per neighbour; a TSA client one mask.
ENCODE_SECONDS_PER_COORDINATE = 14e-9
MASK_SECONDS_PER_COORDINATE = 7.2e-9
PROBE_LENGTH = 16
_ROUND_ID = bytes(16)  # the probe's graph: any fixed id gives a k-regular graph of the same bytes


@dataclass(frozen=True)
class SecureCost:
    """Per trip: bytes up and down besides the model download, and client seconds; per sync
    round: the survivors needed (t); per server step: the TSA's request and response bytes."""

    upload_bytes: int
    extra_download_bytes: int
    client_seconds: float
    threshold: int | None = None
    tsa_step_bytes: int = 0


def sync_cost(s: SecureAggregationConfig, clients: int, length: int) -> SecureCost:
    """One client's share of a SecAgg / SecAgg+ round of `clients` clients on `length` coordinates."""
    k, t = neighbours(s, clients), sync_threshold(s, clients)
    params = make_params(clients, t, None if k == clients - 1 else k, PROBE_LENGTH, s.bits, _ROUND_ID)
    codec = FixedPointCodec(1.0, clients, Ring(s.bits))
    rng = np.random.default_rng(0)
    probe = {c: np.zeros(PROBE_LENGTH) for c in range(clients)}
    result = run_round(params, codec, probe, dict.fromkeys(probe, 1), rng)
    up, down = sum(result.upload_bytes.values()), sum(result.download_bytes.values())
    vector = (length - PROBE_LENGTH) * (s.bits // 8)
    seconds = length * (ENCODE_SECONDS_PER_COORDINATE + (1 + k) * MASK_SECONDS_PER_COORDINATE)
    return SecureCost(math.ceil(up / clients) + vector, math.ceil(down / clients), seconds, threshold=t)


def tsa_cost(s: SecureAggregationConfig, buffer_size: int, length: int) -> SecureCost:
    """A FedBuff upload to the TSA (masked vector and sealed seed) and one step's TSA request."""
    tsa = KeyPair()
    ring = Ring(s.bits)
    upload = mask_for_tsa(ring.zeros(PROBE_LENGTH), ring, tsa.public_bytes(), "task", "update-0000000000")
    vector = (length - PROBE_LENGTH) * ring.element_bytes
    contribution = TsaContribution(upload.update_id, 1, upload.sealed_seed)
    request = TsaRequest("step-0000000000", length, (contribution,) * buffer_size)
    response = wire_bytes(TsaResponse(request.step_id, bytes(length * ring.element_bytes)))
    seconds = length * (ENCODE_SECONDS_PER_COORDINATE + MASK_SECONDS_PER_COORDINATE)
    return SecureCost(wire_bytes(upload) + vector, 0, seconds, tsa_step_bytes=wire_bytes(request) + response)


class ClientEncoding:
    """What a client does to its update before masking, as floats: clip each coordinate to
    [-r, r], then (with `rounding`) round stochastically to the fixed-point grid of a sum of
    `max_total_weight` (updates per sum x the largest integer weight)."""

    def __init__(self, s: SecureAggregationConfig, max_total_weight: int):
        self.clip_range, self.rounding = s.clip_range, s.rounding
        self.codec = FixedPointCodec(s.clip_range, max_total_weight, Ring(s.bits))

    def __call__(self, delta: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.rounding:
            return delta.clamp(-self.clip_range, self.clip_range)
        ring = self.codec.ring
        encoded = self.codec.encode(delta.numpy(), np.random.default_rng((seed, 0x5EC)))
        decoded = ring.to_signed(encoded).astype(np.float64) / self.codec.scale
        return torch.from_numpy(decoded).to(delta.dtype)


class SecureAggregation:
    """A run's secure aggregation in the simulator: per-trip costs, the client's encoding, and
    the sync round's rule that fewer than t survivors cannot unmask (the round is lost and
    retried); counts failed rounds and the TSA's requests."""

    def __init__(self, spec, length: int, max_weight: int):
        s = spec.secure_aggregation
        self.protocol = s.protocol
        if spec.scheduler.mode == "sync":  # every selected device takes part from the first phase
            sc = spec.scheduler
            per_sum = math.ceil(sc.concurrency * (1 + sc.over_selection) - 1e-9)
            self.cost = sync_cost(s, per_sum, length)
        else:
            per_sum = spec.algorithm.buffer_size
            self.cost = tsa_cost(s, per_sum, length)
        self.vector_bytes = length * (s.bits // 8)
        self.encoding = ClientEncoding(s, per_sum * max_weight)
        self.reports = self.failed_rounds = self.tsa_requests = 0

    def round_unmasks(self) -> bool:
        """At a sync round's close: whether its reports reach t (then its sum can be unmasked)."""
        reports, self.reports = self.reports, 0
        if self.cost.threshold is None or reports >= self.cost.threshold:
            return True
        self.failed_rounds += 1
        return False

    def on_step(self) -> None:
        if self.protocol == "tsa":
            self.tsa_requests += 1

    def summary(self) -> dict:
        c = self.cost
        return {
            "secure_aggregation": self.protocol,
            "secagg_threshold": c.threshold,
            "secagg_failed_rounds": self.failed_rounds,
            "secagg_client_seconds": c.client_seconds,
            "tsa_requests": self.tsa_requests,
            "tsa_bytes": self.tsa_requests * c.tsa_step_bytes,
        }


def build_secure_aggregation(spec, length: int, data) -> SecureAggregation | None:
    """The run's secure aggregation (None without the section); integer weights go up to the
    largest client's example count."""
    if spec.secure_aggregation is None:
        return None
    return SecureAggregation(spec, length, int(max(data.client_sizes())))
