"""Binary wire format for models and updates: compact, self-describing, codec-ready.

A frame is `AFL1` | u32 little-endian header length | UTF-8 JSON header | payload. The header
lists the tensors (name, shape, dtype) and names the codec that produced the payload; with
codec `none` the payload is the tensors' raw little-endian bytes, back to back. Floats never
travel as JSON. A compression codec plugs in by registering an encoder/decoder pair in
`CODECS`; the header already carries its name, so old and new peers can tell each other apart.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAGIC = b"AFL1"
MAX_HEADER_BYTES = 64 * 1024
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8"),
          "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "int32": np.dtype("<i4")}


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
    codec: str = Field(default="none", max_length=32)
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


def _decode_raw(payload: memoryview, specs: list[TensorSpec]) -> list[np.ndarray]:
    sizes = []
    for i, s in enumerate(specs):
        if s.dtype not in DTYPES:
            raise WireError(f"tensor {i} ({s.name!r}): unknown dtype {s.dtype!r}", 422, "bad_dtype")
        if any(d < 0 for d in s.shape):
            raise WireError(f"tensor {i} ({s.name!r}): negative dimension in shape {s.shape}", 422, "bad_shape")
        sizes.append(int(np.prod(s.shape, dtype=np.int64)) * DTYPES[s.dtype].itemsize)
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
    head = dict(header, codec=codec,
                tensors=[{"name": n, "shape": list(a.shape), "dtype": dtype_name(a)}
                         for n, a in zip(header.pop("names"), arrays)])
    raw = json.dumps(head, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + CODECS[codec][0](arrays)


def decode(body: bytes, header_model: type[_Header]) -> Frame:
    """Parse and check a frame's structure; raises WireError naming what is wrong."""
    view = memoryview(body)
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        raise WireError("body is not an asyncfl frame (expected magic b'AFL1' and a header length)")
    (hlen,) = struct.unpack("<I", view[4:8])
    if hlen > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    if 8 + hlen > len(view):
        raise WireError(f"frame header length {hlen} runs past the end of the body ({len(view)} bytes)")
    try:
        tree = json.loads(bytes(view[8 : 8 + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"frame header is not valid UTF-8 JSON: {err}") from None
    if not isinstance(tree, dict):
        raise WireError("frame header must be a JSON object")
    try:
        header = header_model.model_validate(tree)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"]) or "(header)"
        raise WireError(f"frame header field {loc}: {e['msg']}") from None
    if header.codec not in CODECS:
        raise WireError(f"unsupported codec {header.codec!r}; this server accepts {sorted(CODECS)}", 422,
                        "unsupported_codec")
    arrays = CODECS[header.codec][1](view[8 + hlen :], header.tensors)
    return Frame(header, arrays)


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


def encode_model(version: int, w: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> bytes:
    return encode({"kind": "model", "version": version, "names": list(names)}, split_flat(w, names, shapes))


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def encode_update(*, lease_id: str, base_version: int, idempotency_key: str, n_examples: int, steps: int,
                  loss: float | None, delta: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]],
                  start_loss: float | None = None, planned_steps: int | None = None) -> bytes:
    return encode({"kind": "update", "lease_id": lease_id, "base_version": base_version,
                   "idempotency_key": idempotency_key, "n_examples": n_examples, "steps": steps,
                   "planned_steps": planned_steps, "loss": _finite_or_none(loss),
                   "start_loss": _finite_or_none(start_loss), "names": list(names)}, split_flat(delta, names, shapes))

