"""The messages of both protocols: plain frozen dataclasses of ints, strings and bytes.

The protocol cores never touch a transport; a runtime moves these objects. `to_json` /
`from_json` give the JSON form (bytes as base64, integer dict keys as strings), and `wire_bytes`
the payload size a cost model charges (bytes fields at their length, 4 bytes per integer, strings
at their UTF-8 length), independent of JSON's base64 overhead.

Synchronous SecAgg+ (client ids are indices 0..n-1 into the round's cohort):
  client -> server  AdvertiseKeys     phase 0: two X25519 public keys
  server -> client  KeyDirectory      the advertised keys of the client's neighbours
  client -> server  ShareKeys         phase 1: one AEAD ciphertext of shares per neighbour
  server -> client  IncomingShares    the ciphertexts addressed to the client, by sender
  client -> server  MaskedInput       phase 2: the masked, weighted, encoded update
  server -> client  UnmaskRequest     phase 3: which neighbours survived, which dropped
  client -> server  UnmaskResponse    shares of survivors' self-mask seeds, dropped ones' keys
Asynchronous with a TSA:
  client -> server  MaskedUpload      masked update + seed sealed to the TSA
  server -> TSA     TsaRequest        a buffer's (id, weight, sealed seed) list
  TSA -> server     TsaResponse       the weighted sum of the buffer's masks (plus DP noise)
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from asyncfl.secagg.crypto import from_base64, to_base64


@dataclass(frozen=True)
class RoundParams:
    """A SecAgg+ round as the server announces it: cohort size n, threshold t, graph degree k, ring bits, vector length.

    `round_id` (random, public) binds every key, ciphertext and mask to this round and seeds the
    neighbour graph; k = n - 1 is the original all-pairs SecAgg.
    """

    round_id: bytes
    clients: int
    threshold: int
    neighbours: int
    length: int
    bits: int = 32


@dataclass(frozen=True)
class AdvertiseKeys:
    client: int
    cipher_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class KeyDirectory:
    cipher_keys: dict[int, bytes]
    mask_keys: dict[int, bytes]


@dataclass(frozen=True)
class ShareKeys:
    client: int
    ciphertexts: dict[int, bytes]  # recipient -> sealed (sender, recipient, self-mask share, key share)


@dataclass(frozen=True)
class IncomingShares:
    ciphertexts: dict[int, bytes]  # sender -> sealed shares


@dataclass(frozen=True)
class MaskedInput:
    client: int
    weight: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    client: int
    self_mask_shares: dict[int, bytes]  # surviving peer -> share of its self-mask seed
    key_shares: dict[int, bytes]  # dropped peer -> share of its masking private key


@dataclass(frozen=True)
class MaskedUpload:
    update_id: str
    masked: bytes
    sealed_seed: bytes


@dataclass(frozen=True)
class TsaContribution:
    update_id: str
    weight: int
    sealed_seed: bytes


@dataclass(frozen=True)
class TsaRequest:
    step_id: str
    length: int
    contributions: tuple[TsaContribution, ...]


@dataclass(frozen=True)
class TsaResponse:
    step_id: str
    mask_sum: bytes


def to_json(message: Any) -> Any:
    """A JSON-ready form of a message (dataclasses become dicts, bytes base64 strings)."""
    if dataclasses.is_dataclass(message):
        return {f.name: to_json(getattr(message, f.name)) for f in dataclasses.fields(message)}
    if isinstance(message, bytes):
        return to_base64(message)
    if isinstance(message, dict):
        return {str(key): to_json(value) for key, value in message.items()}
    if isinstance(message, tuple | list):
        return [to_json(value) for value in message]
    return message


def from_json(cls: type, data: Any) -> Any:
    """Inverse of `to_json` for message class `cls`; malformed input raises ValueError."""
    try:
        return _convert(cls, data)
    except (TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"malformed {cls.__name__}: {error}") from error


def wire_bytes(message: Any) -> int:
    """Payload size of a message as a binary transport would carry it."""
    if dataclasses.is_dataclass(message):
        return sum(wire_bytes(getattr(message, f.name)) for f in dataclasses.fields(message))
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, str):
        return len(message.encode())
    if isinstance(message, dict):
        return sum(wire_bytes(key) + wire_bytes(value) for key, value in message.items())
    if isinstance(message, tuple | list):
        return sum(wire_bytes(value) for value in message)
    return 4


def _convert(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: _convert(hints[f.name], value[f.name]) for f in dataclasses.fields(hint)})
    if hint is bytes:
        return from_base64(value)
    if hint is int or hint is str:
        if type(value) is not hint:
            raise ValueError(f"expected {hint.__name__}, got {value!r}")
        return value
    if origin is dict:
        return {
            _convert(args[0], int(key) if args[0] is int else key): _convert(args[1], v) for key, v in value.items()
        }
    if origin is tuple:
        return tuple(_convert(args[0], v) for v in value)
    raise TypeError(f"unsupported field type {hint}")  # a programming error, not bad input
