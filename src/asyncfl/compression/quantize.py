"""Unbiased stochastic uniform quantization to 2, 4 or 8 bits with a scale per chunk."""

from __future__ import annotations

import struct

import numpy as np
import torch

from asyncfl.compression.codec import Codec
from asyncfl.compression.frame import HEADER_BYTES, MAX_NUMEL, QUANT, as_vector, f32_bytes
from asyncfl.compression.packing import pack, unpack

_QUANT_PARAMS = struct.Struct("<BI")  # bits, chunk (0 = whole tensor)
DEFAULT_CHUNK = 1024


class StochasticQuantizer(Codec):
    """Unbiased stochastic uniform quantization to `bits` in {2, 4, 8} bits, scale per chunk.

    Each chunk of `chunk` consecutive elements (0: the whole tensor is one chunk) is mapped to
    the L + 1 = 2^bits levels lo + j*step, j = 0..L, with lo = min, step = (max - min) / L over the
    chunk. An element at u = (x - lo) / step is sent as floor(u) + 1 with probability
    frac(u), else floor(u), so E[decode] = x exactly (up to float32 rounding of u).

    Error: |decode(encode(x)) - x| < step = (max - min) / (2^bits - 1) of its chunk (and the
    variance is at most step^2 / 4). A constant chunk (step 0) is exact.

    Layout after the header: bits uint8, chunk uint32; then per chunk (lo float32, step float32);
    then the codes packed tightly (8 bits: one byte each; 4: two per byte; 2: four per byte,
    first element in the low bits, zero padding at the end).
    Bytes: 8 + 5 + 8 * ceil(n / chunk) + ceil(n * bits / 8)   (one chunk when chunk = 0).
    Raises ValueError for non-finite inputs or a range too wide for float32.
    """

    codec_id = QUANT
    BITS = (2, 4, 8)

    def __init__(self, bits: int, chunk: int = DEFAULT_CHUNK):
        if bits not in self.BITS:
            raise ValueError(f"quantization bits must be one of {self.BITS}, got {bits}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk <= MAX_NUMEL:
            raise ValueError(f"chunk must be an integer in [0, {MAX_NUMEL}] (0 = whole tensor), got {chunk!r}")
        self.bits, self.chunk = bits, chunk

    @property
    def spec(self):
        return f"int{self.bits}:chunk={self.chunk}"

    @property
    def stochastic(self):
        return True

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _chunking(self, numel: int) -> tuple[int, int]:
        if numel == 0:
            return 0, 0
        size = min(self.chunk or numel, numel)  # a chunk never exceeds the vector (no huge padding)
        return size, -(-numel // size)

    def bytes_for(self, numel):
        _, n_chunks = self._chunking(numel)
        return HEADER_BYTES + _QUANT_PARAMS.size + 8 * n_chunks + -(-numel * self.bits // 8)

    def _chunked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size, n_chunks = self._chunking(x.numel())
        pad = size * n_chunks - x.numel()
        xp = torch.cat([x, x[-1:].expand(pad)]) if pad else x  # repeat the last value: same range
        xc = xp.view(n_chunks, size)
        lo, hi = torch.aminmax(xc, dim=1)
        step = (hi - lo) / self.levels
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and torch.isfinite(step).all()):
            raise ValueError(f"{self.spec}: cannot quantize non-finite values or a range beyond float32")
        return xc, lo, step

    def error_bound(self, x):
        x = as_vector(x)
        if x.numel() == 0:
            return x.clone()
        xc, _, step = self._chunked(x)
        return step.unsqueeze(1).expand_as(xc).reshape(-1)[: x.numel()].clone()

    def _encode_body(self, x, gen):
        n = x.numel()
        params = _QUANT_PARAMS.pack(self.bits, self.chunk)
        if n == 0:
            return params
        xc, lo, step = self._chunked(x)
        inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0)
        u = (xc - lo.unsqueeze(1)).mul_(inv.unsqueeze(1))
        u.add_(torch.rand(u.shape, generator=gen)).floor_().clamp_(0, self.levels)
        q = u.reshape(-1)[:n].to(torch.uint8)
        scales = torch.stack([lo, step], dim=1).reshape(-1)
        return params + f32_bytes(scales) + pack(q, self.bits)

    @classmethod
    def _decode_body(cls, r, numel):
        bits, chunk = r.unpack(_QUANT_PARAMS, "quantization parameters")
        if bits not in cls.BITS:
            raise ValueError(f"{r.what}: invalid bit width {bits} (must be one of {cls.BITS})")
        qz = cls(bits, chunk)
        r.what = what = f"int{bits}"
        size, n_chunks = qz._chunking(numel)
        scales = torch.from_numpy(r.array("<f4", 2 * n_chunks, "chunk scales").astype(np.float32))
        codes = r.array("u1", -(-numel * bits // 8), "codes")
        if numel == 0:
            return torch.zeros(0), qz.spec
        lo, step = scales.view(n_chunks, 2).unbind(1)
        top = lo + qz.levels * step
        if not (torch.isfinite(lo).all() and torch.isfinite(step).all() and torch.isfinite(top).all()):
            raise ValueError(f"{what}: non-finite chunk scale in payload")
        if (step < 0).any():
            raise ValueError(f"{what}: negative chunk step in payload")
        q = unpack(codes, bits, numel, what).to(torch.float32)
        pad = size * n_chunks - numel
        if pad:
            q = torch.cat([q, q.new_zeros(pad)])
        out = torch.addcmul(lo.unsqueeze(1), q.view(n_chunks, size), step.unsqueeze(1))
        return out.reshape(-1)[:numel].contiguous(), qz.spec
