"""IEEE half precision: half the bytes of float32 at a relative error of 2^-11."""

from __future__ import annotations

import numpy as np
import torch

from asyncfl.compression.codec import Codec
from asyncfl.compression.frame import FP16, HEADER_BYTES, as_vector

FP16_MAX = 65504.0


class Float16(Codec):
    """IEEE half precision, round to nearest even, little-endian. Bytes: 8 + 2n.

    Error: |err| <= 2^-11 |x| for |x| >= 2^-14 (normal range), <= 2^-25 below it (subnormals),
    i.e. |err| <= max(2^-11 |x|, 2^-25). Finite values beyond +-65504 would become inf: encoding
    them raises ValueError instead (non-finite inputs pass through unchanged).
    """

    codec_id = FP16

    @property
    def spec(self):
        return "fp16"

    def bytes_for(self, numel):
        return HEADER_BYTES + 2 * numel

    def error_bound(self, x):
        x = as_vector(x)
        return torch.maximum(x.abs() * 2.0**-11, torch.tensor(2.0**-25))

    def _encode_body(self, x, gen):
        h = x.half()
        if x.numel() and not torch.isfinite(h).all():
            bad = torch.isfinite(x) & ~torch.isfinite(h)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(f"fp16 overflow: element {i} = {x[i].item():g} exceeds +-{FP16_MAX:g}")
        return h.numpy().astype("<f2", copy=False).tobytes()

    @classmethod
    def _decode_body(cls, r, numel):
        arr = r.array("<f2", numel, "float16 data")
        return torch.from_numpy(arr.astype(np.float32)), "fp16"
