"""The client's side of secure aggregation with a TSA: clip, encode, mask, seal.

The update is clipped to [-r, r] per coordinate and encoded in fixed point with stochastic
rounding (seeded from the lease's seed, as the simulator seeds it), masked with a fresh one-time
seed, and the seed sealed to the TSA's public key bound to the task and the lease id
(`asyncfl.secagg.mask_for_tsa`). The server sees the masked vector and a ciphertext only.

The TSA's key is pinned: the client refuses a task that advertises any other key, so a server
cannot have seeds sealed to a key of its own. In a real deployment the pinned key comes from
the TSA enclave's attestation report (docs/secure-aggregation.md).
"""

from __future__ import annotations

import numpy as np
import torch

from asyncfl.privacy import clip
from asyncfl.secagg import FixedPointCodec, Ring, mask_for_tsa
from asyncfl.secagg.crypto import from_base64


class TsaMasking:
    def __init__(self, advertised: dict, pinned_key: bytes, task: str):
        self.key, self.task = pinned_key, task
        self.spec = advertised["codec"]
        self.clip_norm = advertised.get("clip_norm")
        self.codec = FixedPointCodec(advertised["clip_range"], advertised["max_total_weight"], Ring(advertised["bits"]))

    def payload(self, delta: torch.Tensor, seed: int, lease_id: str) -> bytes:
        """The masked vector, then the sealed seed: a masked frame's payload."""
        if self.clip_norm is not None:  # central DP: the L2 clipping the server cannot do
            delta = clip(delta, self.clip_norm)[0]
        encoded = self.codec.encode(delta.numpy(), np.random.default_rng((seed, 0x5EC)))
        upload = mask_for_tsa(encoded, self.codec.ring, self.key, self.task, lease_id)
        return upload.masked + upload.sealed_seed


def tsa_masking(task: dict, pinned_key: str | None) -> TsaMasking | None:
    """The masking a task asks for (None without secure aggregation); ValueError naming the
    problem when the task uses a TSA this client cannot or must not seal to."""
    advertised = task.get("secure_aggregation")
    if advertised is None:
        return None
    if advertised.get("protocol") != "tsa":
        raise ValueError(f"the task uses secure aggregation {advertised.get('protocol')!r}, which this client lacks")
    if pinned_key is None:
        raise ValueError(
            "the task masks updates for a TSA: pin its public key with --tsa-key (from the TSA's attestation, "
            "or `asyncfl tsa init` output)"
        )
    try:
        pinned = from_base64(pinned_key)
    except ValueError:
        raise ValueError("--tsa-key is not base64") from None
    if from_base64(advertised["tsa_public_key"]) != pinned:
        raise ValueError(
            f"the task advertises TSA key {advertised['tsa_public_key']}, not the pinned {pinned_key}: refusing "
            "to seal seeds to it"
        )
    return TsaMasking(advertised, pinned, task["task"])
