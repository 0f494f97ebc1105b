"""The ring Z_(2^b): vectors of b-bit integers that masks and weights act on.

Secure aggregation only works if masking is exact modular arithmetic: a mask added by one party
and subtracted by another must cancel bit for bit. For b = 8, 16, 32 or 64 vectors are numpy
arrays of the unsigned type of that width, whose arithmetic wraps modulo 2^b by itself: a
server folds a masked upload at memory speed, and the wire bytes are the array's bytes. Other
widths hold values in [0, 2^b) in uint64, which wraps modulo 2^64; 2^b divides 2^64, so adding,
subtracting and multiplying there and reducing with a bit mask afterwards is arithmetic modulo
2^b. On the wire an element takes b/8 bytes (little endian), which is what the cost model charges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ring:
    """Z_(2^bits) for bits a multiple of 8 in [8, 64]."""

    bits: int = 32

    def __post_init__(self) -> None:
        if not (8 <= self.bits <= 64 and self.bits % 8 == 0):
            raise ValueError(f"ring bits must be a multiple of 8 in [8, 64], got {self.bits}")

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    @property
    def native(self) -> np.dtype | None:
        """The unsigned type whose arithmetic is this ring's, if numpy has one."""
        return _NATIVE.get(self.bits)

    @property
    def dtype(self) -> np.dtype:
        return self.native or np.dtype(np.uint64)

    @property
    def element_bytes(self) -> int:
        return self.bits // 8

    def reduce(self, values: np.ndarray) -> np.ndarray:
        if self.native is not None:  # truncating to the narrower unsigned type is the reduction
            return values.astype(self.native, copy=False)
        return np.bitwise_and(values.astype(np.uint64, copy=False), self.modulus_mask)

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=self.dtype)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.reduce(a + b)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.reduce(a - b)

    def scale(self, a: np.ndarray, weight: int) -> np.ndarray:
        """Multiply by an integer weight modulo 2^b (how the server weights a masked update)."""
        return self.reduce(a * self.dtype.type(int(weight) % (1 << self.bits)))

    def from_signed(self, values: np.ndarray) -> np.ndarray:
        """int64 -> ring, two's complement (negative v becomes 2^b + v)."""
        return self.reduce(values.astype(np.int64, copy=False).view(np.uint64))

    def to_signed(self, values: np.ndarray) -> np.ndarray:
        """Ring -> int64 in [-2^(b-1), 2^(b-1)): the inverse of `from_signed` on that range."""
        if self.native is not None:
            return self.reduce(values).view(self.native.str.replace("u", "i")).astype(np.int64)
        shift = np.uint64(64 - self.bits)
        return (self.reduce(values).astype(np.uint64) << shift).view(np.int64) >> np.int64(64 - self.bits)

    def to_bytes(self, values: np.ndarray) -> bytes:
        """Pack b/8 little-endian bytes per element (the size a masked vector has on the wire)."""
        if self.native is not None:
            return self.reduce(values).astype(self.native.newbyteorder("<"), copy=False).tobytes()
        wide = self.reduce(values).astype("<u8", copy=False)
        return wide.view(np.uint8).reshape(-1, 8)[:, : self.element_bytes].tobytes()

    def from_bytes(self, data: bytes, length: int | None = None) -> np.ndarray:
        """Inverse of `to_bytes`; `length`, when given, is checked against the payload."""
        if len(data) % self.element_bytes:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.bits}-bit elements")
        count = len(data) // self.element_bytes
        if length is not None and count != length:
            raise ValueError(f"expected {length} ring elements, got {count}")
        if self.native is not None:
            return np.frombuffer(data, dtype=self.native.newbyteorder("<")).astype(self.native)
        wide = np.zeros((count, 8), dtype=np.uint8)
        wide[:, : self.element_bytes] = np.frombuffer(data, dtype=np.uint8).reshape(count, self.element_bytes)
        return wide.reshape(-1).view("<u8").astype(np.uint64)


_NATIVE = {bits: np.dtype(f"uint{bits}") for bits in (8, 16, 32, 64)}
