"""Binary wire format for models and updates: compact, self-describing, codec-ready.

A frame is `AFL1` | u32 little-endian header length | UTF-8 JSON header | payload. The header
lists the tensors (name, shape, dtype) and names the codec that produced the payload; with
codec `none` the payload is the tensors' raw little-endian bytes, back to back. Floats never
travel as JSON. A compression codec plugs in by registering an encoder/decoder pair in
`CODECS`; the header already carries its name, so old and new peers can tell each other apart.

Tensor sets besides the model's (an algorithm's `upload_fields`, or what its aggregator sends
with the model: SCAFFOLD's control variate and its change) follow the model's tensors in the
same frame, one tensor per model tensor, named `FIELD:NAME` (`field_names`); a frame without
them is exactly what it was before, and raw frames only carry them.

Compressed frames (a run's `compression:` section): the header's `codec` is an
`asyncfl.compression` spec (e.g. ``int8``, ``topk:0.1+int8``), its tensors still name the
decoded float32 tensors, and the payload is that codec's self-describing bytes for the flat
concatenation of the tensors (`compressed_frame`, `compressed_decoder`). Which codecs a peer
accepts is the caller's choice (`decode(..., codecs=...)`); `CODECS` is the default.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from asyncfl import strict_json

MAGIC = b"AFL1"
MAX_HEADER_BYTES = 64 * 1024
MAX_ELEMENTS = 2**31  # elements of one tensor, and of all of a compressed frame's together
DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
}


class WireError(ValueError):
    """A frame that cannot be read; `status` is the HTTP code it maps to (400 or 422)."""

    def __init__(self, message: str, status: int = 400, code: str = "malformed"):
        super().__init__(message)
        self.status, self.code = status, code


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(max_length=256)
    shape: list[int] = Field(max_length=8)
    dtype: str = Field(max_length=16)


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    codec: str = Field(default="none", max_length=64)
    tensors: list[TensorSpec] = Field(max_length=4096)


class ModelHeader(_Header):
    kind: Literal["model"]
    version: int = Field(ge=0)


class UpdateHeader(_Header):
    """What travels with every upload: the lease it answers, its base version, an idempotency
    key (re-sends are answered with the first result) and the client's example count."""

    kind: Literal["update"]
    lease_id: str = Field(min_length=1, max_length=128)
    base_version: int = Field(ge=0)
    idempotency_key: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    n_examples: int = Field(gt=0, le=10**9)
    steps: int = Field(ge=0, le=10**9)
    planned_steps: int | None = Field(default=None, ge=1, le=10**9, description="partial work: steps asked for")
    loss: float | None = Field(default=None, allow_inf_nan=False, description="mean training loss; null if unknown")
    start_loss: float | None = Field(default=None, allow_inf_nan=False, description="loss at the downloaded model")


@dataclass
class Frame:
    header: Any  # ModelHeader | UpdateHeader
    arrays: list[np.ndarray]


# codec name -> (encode arrays -> bytes, decode (bytes, specs) -> arrays)
Encoder = Callable[[list[np.ndarray]], bytes]
Decoder = Callable[[memoryview, list[TensorSpec]], list[np.ndarray]]


def _encode_raw(arrays: list[np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes() for a in arrays)


def _numel(i: int, s: TensorSpec) -> int:
    """Elements of tensor `i`, in Python integers (an int64 product can wrap around to a small
    count that a short payload then matches); 422 for a negative dimension or a shape numpy
    cannot make (its dimensions other than zero multiply to more than `MAX_ELEMENTS`)."""
    if any(d < 0 for d in s.shape):
        raise WireError(f"tensor {i} ({s.name!r}): negative dimension in shape {s.shape}", 422, "bad_shape")
    if math.prod(d or 1 for d in s.shape) > MAX_ELEMENTS:
        raise WireError(f"tensor {i} ({s.name!r}): shape {s.shape} exceeds {MAX_ELEMENTS} elements", 422, "bad_shape")
    return math.prod(s.shape)


def _decode_raw(payload: memoryview, specs: list[TensorSpec]) -> list[np.ndarray]:
    sizes = []
    for i, s in enumerate(specs):
        if s.dtype not in DTYPES:
            raise WireError(f"tensor {i} ({s.name!r}): unknown dtype {s.dtype!r}", 422, "bad_dtype")
        sizes.append(_numel(i, s) * DTYPES[s.dtype].itemsize)
    if sum(sizes) != len(payload):
        raise WireError(f"payload has {len(payload)} bytes but the header's tensors need {sum(sizes)}")
    out, pos = [], 0
    for s, n in zip(specs, sizes):
        a = np.frombuffer(payload, dtype=DTYPES[s.dtype], count=n // DTYPES[s.dtype].itemsize, offset=pos)
        out.append(a.reshape(s.shape))
        pos += n
    return out


CODECS: dict[str, tuple[Encoder, Decoder]] = {"none": (_encode_raw, _decode_raw)}


def dtype_name(a: np.ndarray) -> str:
    for name, dt in DTYPES.items():
        if a.dtype == dt or a.dtype == dt.newbyteorder("="):
            return name
    raise ValueError(f"dtype {a.dtype} has no wire name")


def encode(header: dict, arrays: list[np.ndarray], codec: str = "none") -> bytes:
    """Frame `arrays` under `header` (tensor specs and codec are filled in here)."""
    head = dict(
        header,
        codec=codec,
        tensors=[
            {"name": n, "shape": list(a.shape), "dtype": dtype_name(a)} for n, a in zip(header.pop("names"), arrays)
        ],
    )
    raw = json.dumps(head, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + CODECS[codec][0](arrays)


def decode(
    body: bytes, header_model: type[_Header], codecs: dict[str, Decoder] | None = None, expected: str | None = None
) -> Frame:
    """Parse and check a frame's structure; raises WireError naming what is wrong. `codecs`
    maps the codec names this peer accepts to their decoders (default: `CODECS`); `expected`
    is what an unsupported codec's error names as the one to use."""
    view = memoryview(body)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise WireError("body is not an asyncfl frame (expected magic b'AFL1' and a header length)")
    (hlen,) = struct.unpack("<I", view[4:8])
    if hlen > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    if 8 + hlen > len(view):
        raise WireError(f"frame header length {hlen} runs past the end of the body ({len(view)} bytes)")
    try:
        tree = strict_json.loads(bytes(view[8 : 8 + hlen]))
    except strict_json.JsonError as err:
        raise WireError(f"frame header is not valid UTF-8 JSON: {err}") from None
    if not isinstance(tree, dict):
        raise WireError("frame header must be a JSON object")
    try:
        header = header_model.model_validate(tree)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"]) or "(header)"
        raise WireError(f"frame header field {loc}: {e['msg']}") from None
    accepted = {name: pair[1] for name, pair in CODECS.items()} if codecs is None else codecs
    if header.codec not in accepted:
        wanted = f"expects codec {expected!r}" if expected else f"accepts {sorted(accepted)}"
        raise WireError(f"unsupported codec {header.codec!r}; this server {wanted}", 422, "unsupported_codec")
    arrays = accepted[header.codec](view[8 + hlen :], header.tensors)
    return Frame(header, arrays)


def _numels(specs: list[TensorSpec]) -> list[int]:
    """Element counts of float32 tensors, checking dtype and shape as the raw decoder does."""
    out = []
    for i, s in enumerate(specs):
        if s.dtype != "float32":
            raise WireError(
                f"tensor {i} ({s.name!r}) has dtype {s.dtype}; a compressed frame holds float32", 422, "bad_dtype"
            )
        out.append(_numel(i, s))
    if sum(out) > MAX_ELEMENTS:
        raise WireError(f"frame tensors hold {sum(out)} elements, more than {MAX_ELEMENTS}", 422, "bad_shape")
    return out


def compressed_decoder(codec, check_specs: Callable[[list[TensorSpec]], None] | None = None) -> Decoder:
    """Decoder for frames whose payload is `codec`'s encoding of the flat float32 vector.
    `check_specs` runs on the header's tensors before any payload byte is decoded (the payload's
    own element count must then match them), so a small payload can never make the reader
    allocate a vector larger than the model. Payload problems (truncation, trailing bytes, a
    payload from another codec or with other parameters, bad scales or indices) are 422
    `bad_payload`, naming the problem."""
    from asyncfl.compression import decode as decode_payload

    def dec(payload: memoryview, specs: list[TensorSpec]) -> list[np.ndarray]:
        if check_specs is not None:
            check_specs(specs)
        numels = _numels(specs)
        try:
            flat = decode_payload(payload, sum(numels), expect=codec)
        except ValueError as err:
            raise WireError(
                f"{codec.spec} payload of {len(payload)} bytes cannot be decoded: {err}", 422, "bad_payload"
            ) from None
        out, pos, arr = [], 0, flat.numpy()
        for s, n in zip(specs, numels):
            out.append(arr[pos : pos + n].reshape(s.shape))
            pos += n
        return out

    return dec


def payload_length(body: bytes) -> int:
    """Bytes of a well-formed frame's payload (what follows the JSON header)."""
    (hlen,) = struct.unpack("<I", body[4:8])
    return len(body) - 8 - hlen


def largest_update_frame(tensors: list[tuple[str, tuple[int, ...]]], payload_bytes: int) -> int:
    """Bytes of the longest valid update frame carrying `tensors` (name, shape) and a payload of
    `payload_bytes`, as `encode_update` writes it: every header field at its bound."""
    longest_float = -2.2250738585072014e-308  # the longest repr a finite float has
    longest_int = 10**strict_json.MAX_INT_DIGITS - 1
    header = {
        "kind": "update",
        "lease_id": "L" * 128,
        "base_version": longest_int,
        "idempotency_key": "k" * 128,
        "n_examples": 10**9,
        "steps": 10**9,
        "planned_steps": 10**9,
        "loss": longest_float,
        "start_loss": longest_float,
        "codec": "c" * 64,
        "tensors": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in tensors],
    }
    return 8 + len(json.dumps(header, separators=(",", ":")).encode()) + payload_bytes


def compressed_frame(header: dict, specs: list[tuple[str, tuple[int, ...]]], payload: bytes, codec: str) -> bytes:
    """Frame an already encoded payload (`asyncfl.compression`) under `header`; `specs` are the
    decoded float32 tensors' (name, shape) and `codec` the spec the receiver expects."""
    head = dict(header, codec=codec, tensors=[{"name": n, "shape": list(s), "dtype": "float32"} for n, s in specs])
    raw = json.dumps(head, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + payload


def split_flat(w: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Per-tensor views of a flat float32 vector, in the model's parameter order."""
    flat = w.detach().to(torch.float32).contiguous().numpy()
    out, pos = [], 0
    for s in shapes:
        n = int(np.prod(s, dtype=np.int64))
        out.append(flat[pos : pos + n].reshape(s))
        pos += n
    return out


def join_flat(arrays: list[np.ndarray]) -> torch.Tensor:
    """The flat float32 vector of a frame's tensors (one copy, native byte order)."""
    if not arrays:
        return torch.zeros(0)
    flat = np.concatenate([a.reshape(-1).astype(np.float32) for a in arrays])
    return torch.from_numpy(flat)


def field_names(field: str, names: list[str]) -> list[str]:
    """The tensor names of a set that travels besides the model's: `FIELD:NAME` per model tensor
    (a colon never occurs in a torch parameter name)."""
    return [f"{field}:{n}" for n in names]


def _with_fields(
    names: list[str], shapes: list[tuple[int, ...]], w: torch.Tensor, fields: dict[str, torch.Tensor]
) -> tuple[list[str], list[np.ndarray]]:
    """Names and arrays of the flat `w` (the model or the delta) followed by the `fields`."""
    all_names, arrays = list(names), split_flat(w, names, shapes)
    for field, t in fields.items():
        all_names += field_names(field, names)
        arrays += split_flat(t, names, shapes)
    return all_names, arrays


def fields_of(specs: list[TensorSpec], names: list[str]) -> tuple[str, ...]:
    """The tensor sets a frame carries after the model's tensors, in order; WireError (422)
    unless they are whole sets named `FIELD:NAME` for the model's names."""
    n, got = len(names), [s.name for s in specs]
    if got[:n] != list(names) or len(got) % n:
        raise WireError(
            f"frame tensors {got[:4]}... are not the model's {list(names)[:4]}... followed by whole tensor sets",
            422,
            "bad_tensor_name",
        )
    fields = tuple(got[i].partition(":")[0] for i in range(n, len(got), n))
    for i, f in enumerate(fields):
        if got[n * (i + 1) : n * (i + 2)] != field_names(f, names):
            raise WireError(
                f"frame tensor set {f!r} is not named {f}:NAME after the model's tensors", 422, "bad_tensor_name"
            )
    return fields


def split_fields(
    arrays: list[np.ndarray], names: list[str], fields: tuple[str, ...]
) -> tuple[list[np.ndarray], dict[str, torch.Tensor]]:
    """A frame's model arrays and its field sets as flat tensors (the names were checked)."""
    n = len(names)
    return arrays[:n], {f: join_flat(arrays[n * (i + 1) : n * (i + 2)]) for i, f in enumerate(fields)}


def encode_model(
    version: int,
    w: torch.Tensor,
    names: list[str],
    shapes: list[tuple[int, ...]],
    codec=None,
    generator=None,
    extras: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """A model frame: raw float32, or with `codec` (an `asyncfl.compression.Codec`, lossy
    downloads) its payload for the flat weights, header codec = `codec.spec`. `extras`: tensor
    sets the clients download with the model (raw frames only)."""
    if codec is None:
        all_names, arrays = _with_fields(names, shapes, w, extras or {})
        return encode({"kind": "model", "version": version, "names": all_names}, arrays)
    if extras:
        raise ValueError("tensors besides the model travel in raw frames only")
    return compressed_frame(
        {"kind": "model", "version": version},
        list(zip(names, shapes)),
        codec.encode(w.detach().to(torch.float32).reshape(-1), generator),
        codec.spec,
    )


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def encode_update(
    *,
    lease_id: str,
    base_version: int,
    idempotency_key: str,
    n_examples: int,
    steps: int,
    loss: float | None,
    delta: torch.Tensor,
    names: list[str],
    shapes: list[tuple[int, ...]],
    start_loss: float | None = None,
    planned_steps: int | None = None,
    payload: bytes | None = None,
    codec: str = "none",
    extras: dict[str, torch.Tensor] | None = None,
) -> bytes:
    """An update frame. With `codec` other than none, `payload` is the delta already encoded by
    that codec (the client's error feedback needs the payload, so it encodes itself). `extras`:
    the algorithm's upload fields (raw frames only)."""
    header = {
        "kind": "update",
        "lease_id": lease_id,
        "base_version": base_version,
        "idempotency_key": idempotency_key,
        "n_examples": n_examples,
        "steps": steps,
        "planned_steps": planned_steps,
        "loss": _finite_or_none(loss),
        "start_loss": _finite_or_none(start_loss),
    }
    if codec == "none":
        all_names, arrays = _with_fields(names, shapes, delta, extras or {})
        return encode(header | {"names": all_names}, arrays)
    if extras:
        raise ValueError("tensors besides the delta travel in raw frames only")
    if payload is None:
        raise ValueError(f"codec {codec!r}: pass the encoded payload")
    return compressed_frame(header, list(zip(names, shapes)), payload, codec)
