"""FedBuff over masked uploads: the server folds what it cannot read and steps with what the TSA
lets it unmask.

Each upload is a fixed-point encoded update plus a one-time mask, and the seed of that mask
sealed to the trusted secure aggregator (`asyncfl.secagg.tsa`). The server weights it with an
integer weight, round(LEVELS s(d) e(n)) (FedBuff's staleness weight times its example weight,
quantized to 1/LEVELS), and adds it into the open buffer in the ring. The K-th upload closes the
buffer: it gets a step id, and its (id, weight, sealed seed) list is then fixed. Closed buffers
wait in order for the TSA (`tsa_link.Unmasker`); its answer is the weighted mask sum, and
subtracting it leaves the weighted sum of the K clipped updates, which the server optimizer
steps with (divided by K LEVELS for normalize 'count', by the weight sum for 'weight').

Open and closed buffers are part of the aggregator's state, written in the same commit as the
upload that changed them, so an acknowledged upload is never lost; a closed buffer's request is
rebuilt from durable state after a crash, byte for byte, and the TSA answers an exact retry with
its first answer (it never uses a seed for two different sums).
"""

from __future__ import annotations

import math
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from asyncfl import wire
from asyncfl.algorithms.aggregators import EXAMPLE_WEIGHTS, Aggregator
from asyncfl.algorithms.server_opt import ServerOptimizer
from asyncfl.algorithms.staleness import StalenessFn
from asyncfl.algorithms.types import ServerState, Verdict
from asyncfl.config import ConfigError
from asyncfl.secagg import FixedPointCodec, MaskedBuffer, Ring
from asyncfl.secagg.crypto import KEY_BYTES, NONCE_BYTES, from_base64, to_base64
from asyncfl.secagg.messages import MaskedUpload, TsaContribution, TsaRequest, TsaResponse
from asyncfl.secagg.prg import SEED_BYTES
from asyncfl.server.errors import ApiError
from asyncfl.server.tsa_privacy import TsaAccounting, TsaNoise, tsa_noise

MAX_WAITING_BUFFERS = 2  # closed buffers awaiting the TSA before check-ins are deferred
LEVELS = 100  # integer weights resolve FedBuff's float weights to 1/LEVELS
SEALED_SEED_BYTES = KEY_BYTES + NONCE_BYTES + SEED_BYTES + 16  # ephemeral key, nonce, seed, GCM tag


@dataclass(frozen=True)
class TsaTerms:
    """What the server, the TSA and every client must agree on for a task."""

    length: int
    buffer_size: int
    max_weight: int
    bits: int
    clip_range: float
    noise: TsaNoise | None = None  # central DP: the TSA adds the noise
    max_contributions: int | None = None  # most uploads one buffer may sum (None: exactly K)

    @property
    def max_total_weight(self) -> int:
        """The most contributions a buffer sums times max_weight, plus ring headroom for the TSA's noise."""
        room = 0 if self.noise is None else self.noise.headroom(self.max_weight, self.clip_range)
        return (self.max_contributions or self.buffer_size) * self.max_weight + room

    @property
    def codec(self) -> FixedPointCodec:
        return FixedPointCodec(self.clip_range, self.max_total_weight, Ring(self.bits))

    @property
    def noise_std_in_ring(self) -> float:
        """The TSA's noise std in ring units (0 without DP)."""
        return 0.0 if self.noise is None else self.codec.noise_std_in_ring(self.noise.std(self.max_weight))

    @property
    def wire_codec(self) -> str:
        """An upload frame's codec name: its payload is the masked ring vector, then the sealed seed."""
        return f"tsa-masked-{self.bits}"

    @property
    def payload_bytes(self) -> int:
        return self.length * self.bits // 8 + SEALED_SEED_BYTES

    def advertised(self, tsa_public_key: str) -> dict:
        """The task's `secure_aggregation` entry: what a client encodes and seals with."""
        return {
            "protocol": "tsa",
            "codec": self.wire_codec,
            "bits": self.bits,
            "clip_range": self.clip_range,
            "max_total_weight": self.max_total_weight,
            "tsa_public_key": tsa_public_key,
        } | ({} if self.noise is None else {"clip_norm": self.noise.clip_norm})


def tsa_terms(spec, length: int, max_examples: int, max_contributions: int | None = None) -> TsaTerms:
    """A run's terms: K = buffer_size, and the largest integer weight an update of at most
    `max_examples` examples can get (staleness weights are at most 1)."""
    s, a = spec.secure_aggregation, spec.algorithm
    max_weight = math.ceil(LEVELS * EXAMPLE_WEIGHTS[a.example_weight](max_examples))
    return TsaTerms(length, a.buffer_size, max_weight, s.bits, s.clip_range, tsa_noise(spec), max_contributions)


def tsa_terms_of(cfg, settings, run: str | None) -> TsaTerms:
    """The terms `asyncfl serve` derives from the same config (for `asyncfl tsa serve --config`)."""
    from asyncfl.build import build_data, build_flat_model

    data = build_data(cfg)
    max_examples = settings.max_examples or int(data.client_sizes().max())
    return tsa_terms(cfg.run(run), build_flat_model(cfg, data).numel, max_examples)


def check_serve(spec, settings) -> None:
    """What `asyncfl serve` does not support with the TSA yet, refused with the reason."""
    missing = [k for k in ("tsa_url", "tsa_public_key") if getattr(settings, k) is None]
    if missing:
        raise ConfigError(f"secure_aggregation 'tsa' needs server.{' and server.'.join(missing)}")
    try:
        key = from_base64(settings.tsa_public_key)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError("server.tsa_public_key must be the base64 X25519 key `asyncfl tsa init` printed")


class MaskedFrames:
    """Reads masked update frames: the model's float32 tensor specs (what the masked vector
    encodes), a payload of exactly `payload_bytes`; anything else is 400/422 like any frame."""

    def __init__(self, terms: TsaTerms):
        self.terms, self.spec = terms, terms.wire_codec

    def check(self, body: bytes, check_specs: Callable[[list[wire.TensorSpec]], None]):
        from asyncfl.server.aggregation import Checked

        def decode(payload: memoryview, specs: list[wire.TensorSpec]) -> list[np.ndarray]:
            check_specs(specs)
            if len(payload) != self.terms.payload_bytes:
                raise wire.WireError(
                    f"masked payload of {len(payload)} bytes; this task's is {self.terms.payload_bytes} "
                    f"({self.terms.length} coordinates of {self.terms.bits} bits, then a sealed seed)",
                    422,
                    "bad_payload",
                )
            split = len(payload) - SEALED_SEED_BYTES
            return [np.frombuffer(payload[:split], np.uint8), np.frombuffer(payload[split:], np.uint8)]

        try:
            frame = wire.decode(body, wire.UpdateHeader, {self.spec: decode}, self.spec)
        except wire.WireError as err:
            raise ApiError(err.status, err.code, str(err)) from None
        masked, sealed = frame.arrays
        upload = MaskedUpload(frame.header.lease_id, masked.tobytes(), sealed.tobytes())
        return Checked(frame.header, torch.zeros(0), 0.0, wire.payload_length(body), masked=upload)


class MaskedFedBuff(Aggregator):
    """FedBuff's buffer of masked uploads (see the module docstring). `pending_request` and
    `accept` are the TSA's side; `flush` steps once the oldest closed buffer is unmasked."""

    def __init__(
        self,
        terms: TsaTerms,
        server_opt: ServerOptimizer,
        staleness: StalenessFn,
        example_weight: str = "uniform",
        normalize: str = "count",
        max_staleness: int | None = None,
    ):
        super().__init__(max_staleness)
        self.terms, self.codec = terms, terms.codec
        self.server_opt, self.staleness = server_opt, staleness
        self.example_weight, self.normalize = EXAMPLE_WEIGHTS[example_weight], normalize
        self.run_id = secrets.token_hex(8)  # step ids stay unique if a TSA outlives a server's state dir
        self.next_step = 1
        self.open = MaskedBuffer(self.codec, terms.length)
        self.closed: list[MaskedBuffer] = []
        self.unmasked: np.ndarray | None = None  # the oldest closed buffer's sum, once the TSA answered
        self.refusal: str | None = None  # the TSA's last refusal, for /status
        self.accounting = None if terms.noise is None else TsaAccounting(terms.noise, terms.buffer_size)
        self.open_users: list[int] = []  # under DP: one update per user per buffer

    def integer_weight(self, n_examples: int, staleness: int) -> int:
        a = self.staleness(staleness) * self.example_weight(n_examples)
        return max(1, min(self.terms.max_weight, round(LEVELS * a)))

    def submit(self, state: ServerState, update, base_w) -> Verdict:
        if self.too_stale(state, update):
            return Verdict.DISCARDED
        if update.masked is None:
            raise ValueError("a masked FedBuff buffer folds masked uploads only")
        if self.accounting is not None:
            if update.client_id in self.open_users:
                return Verdict.DISCARDED  # a user's second update in one buffer: the noise covers one
            self.open_users.append(update.client_id)
        # staleness at the version this buffer will step from: after every closed buffer's step
        applied_at = state.version + len(self.closed)
        self.open.fold(update.masked, self.integer_weight(update.n_examples, applied_at - update.base_version))
        self.close_if_full()
        return Verdict.BUFFERED

    def close_if_full(self) -> bool:
        """Once the open buffer holds K contributions: give it the next step id, queue it for
        the TSA and open a new one; whether it closed."""
        if len(self.open.contributions) < self.terms.buffer_size:
            return False
        self.open.request(f"{self.run_id}-{self.next_step}")
        self.closed.append(self.open)
        self.next_step += 1
        self.open, self.open_users = MaskedBuffer(self.codec, self.terms.length), []
        return True

    def pending_request(self) -> TsaRequest | None:
        """The oldest closed buffer's request (the same bytes every time), if it awaits the TSA."""
        if not self.closed or self.unmasked is not None:
            return None
        head = self.closed[0]
        return head.request(head.requested_step)

    def accept(self, response: TsaResponse) -> None:
        """The TSA's answer for the oldest closed buffer; raises ValueError when it is not one."""
        if not self.closed:
            raise ValueError("no closed buffer awaits an answer")
        self.unmasked = self.closed[0].unmask(response)

    def flush(self, state: ServerState) -> bool:
        if self.unmasked is None:
            return False
        head, total = self.closed.pop(0), self.unmasked
        self.unmasked = None
        denom = len(head.contributions) * LEVELS if self.normalize == "count" else head.total_weight
        state.w = self.server_opt.step(state.w, torch.from_numpy(total / denom).to(state.w.dtype))
        state.version += 1
        if self.accounting is not None:
            self.accounting.step()
        return True

    def waiting(self) -> bool:
        """Whether new trips should wait: two closed buffers wait for the TSA. One may (the TSA
        answers within milliseconds); more would be trips training on a model that cannot move,
        whose buffers would then step in a burst."""
        return len(self.closed) >= MAX_WAITING_BUFFERS

    @property
    def pending(self) -> int:
        return len(self.open.contributions)

    def privacy_report(self) -> dict | None:
        return None if self.accounting is None else self.accounting.report()

    def status(self) -> dict:
        return super().status() | {
            "buffer": {"fill": self.pending, "size": self.terms.buffer_size},
            "secure_aggregation": {"protocol": "tsa", "waiting_buffers": len(self.closed), "tsa_refusal": self.refusal},
        }

    def state_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "next_step": self.next_step,
            "open": self.buffer_state(self.open),
            "closed": [self.buffer_state(b) for b in self.closed],
            "server_opt": self.server_opt.state_dict(),
            "open_users": list(self.open_users),
            "accountant": None if self.accounting is None else self.accounting.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.run_id, self.next_step = state["run_id"], state["next_step"]
        self.open = self.buffer_of(state["open"])
        self.closed = [self.buffer_of(b) for b in state["closed"]]
        self.unmasked = None
        self.server_opt.load_state_dict(state["server_opt"])
        self.open_users = list(state["open_users"])
        if self.accounting is not None:
            self.accounting.load_state_dict(state["accountant"])

    def buffer_state(self, buffer: MaskedBuffer) -> dict:
        """A buffer as tensors and lists (`buffer_of` reads it back)."""
        rows = [[c.update_id, c.weight, to_base64(c.sealed_seed)] for c in buffer.contributions]
        return {
            "total": torch.from_numpy(self._wire_bytes(buffer.total)),
            "contributions": rows,
            "step": buffer.requested_step,
        }

    def _wire_bytes(self, total: np.ndarray) -> np.ndarray:
        """A buffer's total as its wire bytes (uint8), as `Ring.to_bytes` packs them. Where the
        ring's type is native and the machine little endian these are the array's own bytes, so
        a view saves two copies per buffer in every commit's snapshot, under the state lock (a
        total is replaced by each fold, never changed in place)."""
        ring = self.codec.ring
        if ring.native is not None and sys.byteorder == "little":
            return total.view(np.uint8)
        return np.frombuffer(ring.to_bytes(total), np.uint8).copy()

    def buffer_of(self, state: dict) -> MaskedBuffer:
        buffer = MaskedBuffer(self.codec, self.terms.length)
        buffer.total = self.codec.ring.from_bytes(state["total"].numpy().tobytes(), self.terms.length)
        buffer.contributions = [TsaContribution(i, int(w), from_base64(s)) for i, w, s in state["contributions"]]
        buffer.requested_step = state["step"]
        return buffer


def masked_fedbuff(spec, terms: TsaTerms) -> MaskedFedBuff:
    from asyncfl.algorithms.defs._common import build_server_opt, build_staleness

    a = spec.algorithm
    return MaskedFedBuff(
        terms,
        build_server_opt(a.server_opt),
        build_staleness(a.staleness),
        a.example_weight,
        a.normalize,
        a.max_staleness,
    )


@dataclass(frozen=True)
class TsaServing:
    """What `asyncfl serve` runs a TSA run with: the terms, the masked buffer, the frame reader."""

    terms: TsaTerms
    aggregator: MaskedFedBuff
    frames: MaskedFrames
    settings: object  # the server settings: the TSA's URL, public key and token file

    def advertised(self) -> dict:
        return self.terms.advertised(self.settings.tsa_public_key)

    def link(self):
        """A client of the TSA, with the token shared with it (server.tsa_token_file, else $ASYNCFL_TSA_TOKEN)."""
        from pathlib import Path

        from asyncfl.server.tsa_link import TsaLink
        from asyncfl.tsa.commands import read_token

        token_file = self.settings.tsa_token_file
        return TsaLink(self.settings.tsa_url, read_token(Path(token_file) if token_file else None))

    def unmasker(self, shared, commit):
        from asyncfl.server.tsa_link import Unmasker

        return Unmasker(shared, commit, self.link())


def tsa_serving(
    spec, settings, length: int, max_examples: int, max_contributions: int | None = None
) -> TsaServing | None:
    """None unless the run's secure aggregation is the TSA; refuses what does not fit yet."""
    if spec.secure_aggregation is None or spec.secure_aggregation.protocol != "tsa":
        return None
    check_serve(spec, settings)
    terms = tsa_terms(spec, length, max_examples, max_contributions)
    return TsaServing(terms, masked_fedbuff(spec, terms), MaskedFrames(terms), settings)
