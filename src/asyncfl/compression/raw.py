"""Uncompressed float32: the lossless reference codec (and top-k's default for kept values)."""

from __future__ import annotations

import numpy as np
import torch

from asyncfl.compression.codec import Codec
from asyncfl.compression.frame import HEADER_BYTES, RAW, as_vector, f32_bytes


class Raw(Codec):
    """Uncompressed float32, little-endian. Bytes: 8 + 4n. Exact (error 0)."""

    codec_id = RAW

    @property
    def spec(self):
        return "none"

    @property
    def lossless(self):
        return True

    def bytes_for(self, numel):
        return HEADER_BYTES + 4 * numel

    def error_bound(self, x):
        return torch.zeros_like(as_vector(x))

    def _encode_body(self, x, gen):
        return f32_bytes(x)

    @classmethod
    def _decode_body(cls, r, numel):
        arr = r.array("<f4", numel, "float32 data")
        return torch.from_numpy(arr.astype(np.float32)), "none"
