"""Error feedback: what a lossy codec dropped from a device's update is added to its next one;
and `encode_upload`, the one upload step (compensate, encode, decode as the server will) that the
simulator and the client runtime share.

Per device d with residual e_d (0 when absent):

    v = update + e_d;   payload = codec.encode(v);   e_d <- v - decode(payload)

so the sum over rounds of what the server decoded equals the sum of the true updates minus
the current residual: nothing is lost, only delayed (a coordinate too small for top-k grows
in the residual until it is sent).

Memory: only devices that have trained hold a residual (a dict keyed by device id), so a
population of 10^6 costs nothing for the devices that never train; each holder costs
numel * 4 bytes (float32) or numel * 2 bytes with ``storage_dtype=torch.float16``. fp16 storage
halves memory but rounds the residual (relative 2^-11 per stored value, values beyond +-65504
saturate to +-65504), so a small part of the dropped mass is lost each round. Residuals that are
exactly zero (lossless codec) are not stored. ``max_devices`` bounds the store: the least recently
used residual is dropped when it is full (its mass is lost; the device restarts from zero).

In deployment the residual lives on the device; the simulator holds all of them here. With
asynchronous participation a residual waits until its device trains again, possibly many
server versions later, and is then added to an update computed on a newer model.

When the residual advances is the caller's choice: `encode_upload` leaves it as it was and
`record` advances it. The simulator records every upload at once (`ErrorFeedback.encode`); a
client records only after the server accepted the update, so an upload that did not count
leaves the residual as it was before that trip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple

import torch

from asyncfl.compression.codec import Codec
from asyncfl.compression.frame import Generator
from asyncfl.compression.spec import parse_codec


class ErrorFeedback:
    def __init__(self, codec: Codec | str, storage_dtype: torch.dtype = torch.float32, max_devices: int | None = None):
        if storage_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"storage_dtype must be torch.float32 or torch.float16, got {storage_dtype}")
        if max_devices is not None and max_devices < 1:
            raise ValueError(f"max_devices must be >= 1 or None, got {max_devices}")
        self.codec = parse_codec(codec) if isinstance(codec, str) else codec
        self.storage_dtype = storage_dtype
        self.max_devices = max_devices
        self._residuals: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.evicted = 0

    # -- the two halves, for callers that encode themselves
    def compensate(self, device_id: Hashable, update: torch.Tensor) -> torch.Tensor:
        """update + this device's residual (a new float32 tensor; the update is untouched)."""
        update = update.detach().to(torch.float32)
        res = self._residuals.get(device_id)
        if res is None:
            return update.clone()
        if res.shape != update.shape:
            raise ValueError(
                f"device {device_id!r}: residual has shape {tuple(res.shape)}, update {tuple(update.shape)}"
            )
        return update + res.to(torch.float32)

    def record(self, device_id: Hashable, compensated: torch.Tensor, decoded: torch.Tensor) -> None:
        """Store residual = compensated - decoded for the device (dropped when exactly zero)."""
        res = compensated.to(torch.float32) - decoded.to(torch.float32)
        if not torch.count_nonzero(res):
            self._residuals.pop(device_id, None)
            return
        if self.storage_dtype == torch.float16:
            res = res.clamp(-65504.0, 65504.0)
        self._residuals[device_id] = res.to(self.storage_dtype)
        self._residuals.move_to_end(device_id)
        if self.max_devices is not None:
            while len(self._residuals) > self.max_devices:
                self._residuals.popitem(last=False)
                self.evicted += 1

    # -- the whole step
    def encode(
        self, device_id: Hashable, update: torch.Tensor, generator: Generator = None
    ) -> tuple[bytes, torch.Tensor]:
        """Encode update + residual; returns (payload, decoded vector) and updates the residual."""
        upload = encode_upload(self.codec, update, generator, self, device_id)
        self.record(device_id, upload.compensated, upload.decoded)
        return upload.payload, upload.decoded

    # -- inspection and persistence
    def residual(self, device_id: Hashable) -> torch.Tensor | None:
        res = self._residuals.get(device_id)
        return None if res is None else res.to(torch.float32)

    def forget(self, device_id: Hashable) -> None:
        self._residuals.pop(device_id, None)

    def __len__(self) -> int:
        return len(self._residuals)

    def __contains__(self, device_id: Hashable) -> bool:
        return device_id in self._residuals

    @property
    def nbytes(self) -> int:
        """Memory held by residual data (tensor payloads only)."""
        return sum(r.numel() * r.element_size() for r in self._residuals.values())

    def state_dict(self) -> dict:
        return {
            "codec": self.codec.spec,
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "residuals": dict(self._residuals),
            "evicted": self.evicted,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["codec"] != self.codec.spec:
            raise ValueError(f"state is for codec {state['codec']!r}, this store uses {self.codec.spec!r}")
        self._residuals = OrderedDict((k, v.to(self.storage_dtype).clone()) for k, v in state["residuals"].items())
        self.evicted = int(state.get("evicted", 0))


class Upload(NamedTuple):
    payload: bytes  # what the device sends
    decoded: torch.Tensor  # what the server decodes from it
    compensated: torch.Tensor  # what was encoded: the update plus the device's residual


def encode_upload(
    codec: Codec,
    update: torch.Tensor,
    generator: Generator,
    feedback: ErrorFeedback | None = None,
    device_id: Hashable = None,
) -> Upload:
    """Encode a device's update for upload, with `feedback`'s residual for `device_id` added.

    The residual is not advanced: `feedback.record(device_id, upload.compensated,
    upload.decoded)` does that once the update counts. The payload's length is checked against
    `codec.bytes_for` (transfers are timed and charged from that formula).
    """
    v = update if feedback is None else feedback.compensate(device_id, update)
    payload = codec.encode(v, generator)
    if len(payload) != codec.bytes_for(v.numel()):
        raise RuntimeError(f"{codec.spec}: payload of {len(payload)} bytes, charged {codec.bytes_for(v.numel())}")
    return Upload(payload, codec.decode(payload, v.numel()), v)
