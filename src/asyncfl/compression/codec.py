"""The codec interface, and decoding any payload by the codec id in its header.

A codec turns a flat float32 vector into compact self-describing bytes (`frame` header, then
its parameters and data) and back. `decode(payload, expected_numel)` needs nothing but the
payload: it reads the header, hands the rest to the codec class registered for its id, validates
every field and length and raises `ValueError` naming the problem; it never returns a tensor of
the wrong size.

Byte counts are exact and computable without encoding: `codec.bytes_for(numel) ==
len(codec.encode(x))` for every `x` with `numel` elements (the simulator may charge transfer
time from the formula).

Stochastic codecs take ``generator``: a ``torch.Generator``, an int seed, or None (torch's
global generator, deterministic under ``torch.manual_seed``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from asyncfl.compression.frame import CODEC_NAMES, Generator, Reader, as_generator, as_vector, header, read_header

_DECODERS: dict[int, type[Codec]] = {}  # codec id -> the class that decodes its payloads


class Codec(ABC):
    """A float32 vector <-> bytes codec. Subclasses document layout, bytes and error bound.

    A subclass that sets its own class attribute `codec_id` decodes the payloads carrying that
    id: it defines the classmethod ``_decode_body(reader, numel) -> (vector, signature)``, which
    reads what follows the header and returns what `_signature` returns for its parameters.
    """

    codec_id: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "codec_id" in cls.__dict__:
            if "_decode_body" not in cls.__dict__:
                raise TypeError(f"{cls.__name__} sets codec_id {cls.codec_id} but defines no _decode_body")
            _DECODERS[cls.codec_id] = cls

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string; `parse_codec(c.spec)` builds an equal codec."""

    @property
    def stochastic(self) -> bool:
        return False

    @property
    def lossless(self) -> bool:
        return False

    def encode(self, x: torch.Tensor, generator: Generator = None) -> bytes:
        x = as_vector(x)
        return header(self.codec_id, x.numel()) + self._encode_body(x, as_generator(generator))

    def decode(self, payload: bytes | bytearray | memoryview, expected_numel: int | None = None) -> torch.Tensor:
        """Decode a payload that must have been produced by this codec (same kind and parameters)."""
        return decode(payload, expected_numel, expect=self)

    def roundtrip(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        return self.decode(self.encode(x, generator), x.numel())

    @abstractmethod
    def bytes_for(self, numel: int) -> int:
        """len(self.encode(x)) for any x with `numel` elements, without encoding."""

    @abstractmethod
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound b with |decode(encode(x)) - x| <= b (up to float32 rounding)."""

    @abstractmethod
    def _encode_body(self, x: torch.Tensor, gen: torch.Generator | None) -> bytes: ...

    def _signature(self, numel: int) -> str:
        """What `_decode_body` reports for a payload of `numel` elements from this codec: its
        spec, unless the parameters on the wire depend on numel (top-k)."""
        return self.spec

    def compression_ratio(self, numel: int) -> float:
        """Raw float32 bytes (4 * numel) over this codec's payload bytes."""
        return 4.0 * numel / self.bytes_for(numel)

    def __eq__(self, other):
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    def __repr__(self):
        return f"parse_codec({self.spec!r})"


def decode_body(r: Reader, codec_id: int, numel: int) -> tuple[torch.Tensor, str]:
    """Decode what follows a header with the codec registered for `codec_id`."""
    r.what = CODEC_NAMES[codec_id]
    return _DECODERS[codec_id]._decode_body(r, numel)


def decode(
    payload: bytes | bytearray | memoryview, expected_numel: int | None = None, *, expect: Codec | None = None
) -> torch.Tensor:
    """Decode any payload into a float32 vector of exactly `expected_numel` elements.

    Validates magic, format, codec id, numel (against `expected_numel` when given), every
    length (truncation and trailing bytes), scales, indices and padding; with `expect`, the
    payload must also come from that codec with the same parameters. Raises ValueError.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    r = Reader(memoryview(payload).cast("B"), "payload")
    codec_id, numel = read_header(r)
    if expected_numel is not None and numel != expected_numel:
        raise ValueError(f"numel mismatch: payload has {numel} elements, expected {expected_numel}")
    out, signature = decode_body(r, codec_id, numel)
    r.finish()
    if expect is not None and signature != expect._signature(numel):
        raise ValueError(f"payload codec {signature} does not match the expected {expect.spec}")
    return out
