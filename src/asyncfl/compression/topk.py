"""Top-k sparsification: the k largest-magnitude coordinates, their values sent by a nested codec."""

from __future__ import annotations

import struct

import numpy as np
import torch

from asyncfl.compression.codec import Codec, decode_body
from asyncfl.compression.frame import HEADER_BYTES, MAX_NUMEL, TOPK, Reader, as_vector, read_header
from asyncfl.compression.raw import Raw

_TOPK_PARAMS = struct.Struct("<IB")  # k, index mode
_IDX_U16, _IDX_U32, _IDX_BITMAP = 0, 1, 2


class TopK(Codec):
    """Keep the k = clamp(round(fraction * n), 1, n) largest-magnitude coordinates.

    Kept values are encoded by `values` (raw float32 by default: exact on kept coordinates;
    else within that codec's bound); dropped coordinates decode to 0, so their error is |x_i|,
    which is <= the smallest kept magnitude. Use with error feedback so the dropped mass is
    sent later.

    Layout after the header: k uint32, index mode uint8; then the kept positions, either as a
    strictly increasing uint16 (n <= 65536) or uint32 list, or as a bitmap of ceil(n / 8)
    bytes (bit i of byte i // 8 = element i, LSB first), whichever is smaller (list on a tie);
    then a complete nested payload (own header) of the k kept values in index order.
    Bytes: 8 + 5 + min(w * k, ceil(n / 8)) + values.bytes_for(k), w = 2 if n <= 65536 else 4.
    """

    codec_id = TOPK

    def __init__(self, fraction: float | None = None, values: Codec | None = None, k: int | None = None):
        if (fraction is None) == (k is None):
            raise ValueError("top-k needs exactly one of a fraction or k")
        if fraction is not None:
            fraction = float(fraction)
            if not (0.0 < fraction <= 1.0):
                raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_NUMEL):
            raise ValueError(f"top-k k must be an integer >= 1, got {k!r}")
        values = values if values is not None else Raw()
        if isinstance(values, TopK):
            raise ValueError("top-k values cannot themselves be top-k")
        self.fraction, self.fixed_k, self.values = fraction, k, values

    @property
    def spec(self):
        head = f"topk:k={self.fixed_k}" if self.fixed_k is not None else f"topk:{self.fraction!r}"
        return head if isinstance(self.values, Raw) else f"{head}+{self.values.spec}"

    @property
    def stochastic(self):
        return self.values.stochastic

    def k_for(self, numel: int) -> int:
        if numel == 0:
            return 0
        k = self.fixed_k if self.fixed_k is not None else round(self.fraction * numel)
        return min(numel, max(1, k))

    @staticmethod
    def _index_mode(numel: int, k: int) -> tuple[int, int]:
        width, mode = (2, _IDX_U16) if numel <= 65536 else (4, _IDX_U32)
        bitmap = -(-numel // 8)
        return (mode, width * k) if width * k <= bitmap else (_IDX_BITMAP, bitmap)

    def bytes_for(self, numel):
        k = self.k_for(numel)
        return HEADER_BYTES + _TOPK_PARAMS.size + self._index_mode(numel, k)[1] + self.values.bytes_for(k)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted positions of the k largest |x| (ties broken by torch.topk, deterministically)."""
        x = as_vector(x)
        k = self.k_for(x.numel())
        if k == x.numel():
            return torch.arange(k)
        return torch.topk(x.abs(), k, sorted=False).indices.sort().values

    def error_bound(self, x):
        x = as_vector(x)
        bound = x.abs()
        idx = self.select(x)
        bound[idx] = self.values.error_bound(x[idx])
        return bound

    def _encode_body(self, x, gen):
        n = x.numel()
        k = self.k_for(n)
        idx = self.select(x)
        mode, _ = self._index_mode(n, k)
        if mode == _IDX_BITMAP:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[idx] = True
            index_bytes = np.packbits(mask.numpy(), bitorder="little").tobytes()
        else:
            index_bytes = idx.numpy().astype("<u2" if mode == _IDX_U16 else "<u4").tobytes()
        inner = self.values.encode(x[idx], gen)
        return _TOPK_PARAMS.pack(k, mode) + index_bytes + inner

    @classmethod
    def _decode_body(cls, r, numel):
        what = r.what
        k, mode = r.unpack(_TOPK_PARAMS, "top-k parameters")
        if k > numel:
            raise ValueError(f"{what}: k = {k} exceeds numel = {numel}")
        if mode not in (_IDX_U16, _IDX_U32, _IDX_BITMAP):
            raise ValueError(f"{what}: unknown index mode {mode}")
        if mode == _IDX_BITMAP:
            bitmap = r.array("u1", -(-numel // 8), "index bitmap")
            bits = np.unpackbits(bitmap, bitorder="little")
            if bits[numel:].any():
                raise ValueError(f"{what}: non-zero padding bits in the index bitmap")
            idx = np.flatnonzero(bits[:numel])
            if idx.size != k:
                raise ValueError(f"{what}: index bitmap has {idx.size} set bits, header says k = {k}")
        else:
            idx = r.array("<u2" if mode == _IDX_U16 else "<u4", k, "indices").astype(np.int64)
            if k and int(idx.max()) >= numel:
                raise ValueError(f"{what}: index {int(idx.max())} out of range for numel = {numel}")
            if k > 1 and not (np.diff(idx) > 0).all():
                raise ValueError(f"{what}: indices are not strictly increasing (unsorted or duplicate)")
        inner = Reader(r.rest(), what)
        inner_id, inner_numel = read_header(inner)
        if inner_id == TOPK:
            raise ValueError(f"{what}: nested top-k values are not supported")
        if inner_numel != k:
            raise ValueError(f"{what}: values payload has {inner_numel} elements, expected k = {k}")
        values, inner_signature = decode_body(inner, inner_id, k)
        inner.finish()
        out = torch.zeros(numel, dtype=torch.float32)
        out[torch.from_numpy(idx)] = values
        return out, f"topk(k={k})+{inner_signature}"

    def _signature(self, numel):
        k = self.k_for(numel)
        return f"topk(k={k})+{self.values._signature(k)}"
