"""The payload frame every codec shares: header, field checks and a bounds-checked reader.

Every payload starts with the same 8-byte header, little-endian::

    magic  b"AF"   2 bytes
    format 1       1 byte   (layout version)
    codec  id      1 byte   (0 raw float32, 1 fp16, 2 stochastic quantization, 3 top-k)
    numel          uint32   (elements of the vector this payload decodes to)

followed by the codec's parameters and data (see each codec's module).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

MAGIC = b"AF"
FORMAT = 1
_HEADER = struct.Struct("<2sBBI")
HEADER_BYTES = _HEADER.size  # 8
MAX_NUMEL = 2**32 - 1

RAW, FP16, QUANT, TOPK = 0, 1, 2, 3
CODEC_NAMES = {RAW: "none", FP16: "fp16", QUANT: "int", TOPK: "topk"}

Generator = torch.Generator | int | None


def as_vector(x: torch.Tensor) -> torch.Tensor:
    """`x` as a contiguous float32 CPU vector; anything a header cannot describe raises."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"expected a flat (1-D) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"vector too long for the payload header: {x.numel()} > {MAX_NUMEL}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def as_generator(generator: Generator) -> torch.Generator | None:
    """A torch.Generator from a generator, an int seed, or None (torch's global generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def header(codec_id: int, numel: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT, codec_id, numel)


def f32_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().astype("<f4", copy=False).tobytes()


class Reader:
    """Bounds-checked cursor over a payload; every short read is a clear ValueError."""

    def __init__(self, buf: memoryview, what: str):
        self.buf, self.pos, self.what = buf, 0, what

    def take(self, n: int, field: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(
                f"{self.what}: truncated payload: {field} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.buf) - self.pos} left"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, field: str):
        return st.unpack(self.take(st.size, field))

    def array(self, dtype: str, count: int, field: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(itemsize * count, field), dtype=dtype, count=count)

    def rest(self) -> memoryview:
        return self.take(len(self.buf) - self.pos, "rest")

    def finish(self) -> None:
        left = len(self.buf) - self.pos
        if left:
            raise ValueError(f"{self.what}: {left} trailing bytes after the data")


def read_header(r: Reader) -> tuple[int, int]:
    """(codec id, numel) of the header at the reader's position, every field validated."""
    if len(r.buf) < HEADER_BYTES:
        raise ValueError(f"payload too short for a header: {len(r.buf)} bytes, need {HEADER_BYTES}")
    magic, fmt, codec_id, numel = r.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}: not an asyncfl payload (expected {MAGIC!r})")
    if fmt != FORMAT:
        raise ValueError(f"unsupported payload format version {fmt} (this build reads {FORMAT})")
    if codec_id not in CODEC_NAMES:
        raise ValueError(f"unknown codec id {codec_id} in payload header")
    return codec_id, numel
