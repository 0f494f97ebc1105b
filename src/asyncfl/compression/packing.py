"""Tight bit packing of small integer codes (2, 4 or 8 bits) into bytes, and its checked inverse."""

from __future__ import annotations

import numpy as np
import torch


def pack(q: torch.Tensor, bits: int) -> bytes:
    """Pack uint8 codes < 2^bits tightly, little-endian within each byte (element 0 in the low bits)."""
    if bits == 8:
        return q.numpy().tobytes()
    per = 8 // bits
    pad = (-q.numel()) % per
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    q = q.view(-1, per)
    out = q[:, 0].clone()
    for j in range(1, per):  # at most 3 iterations: over bit slots, not elements
        out |= q[:, j] << (j * bits)
    return out.numpy().tobytes()


def unpack(raw: np.ndarray, bits: int, n: int, what: str) -> torch.Tensor:
    """The first `n` codes of packed bytes; non-zero padding after them raises ValueError."""
    b = torch.from_numpy(raw.copy())
    if bits == 8:
        return b
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    q = ((b.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if q.numel() > n and q[n:].any():
        raise ValueError(f"{what}: non-zero padding bits after the last code")
    return q[:n]
