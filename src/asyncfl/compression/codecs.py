"""Codecs for flat float32 update vectors: tensor -> compact self-describing bytes -> tensor.

Every payload starts with the same 8-byte header, little-endian::

    magic  b"AF"   2 bytes
    format 1       1 byte   (layout version)
    codec  id      1 byte   (0 raw float32, 1 fp16, 2 stochastic quantization, 3 top-k)
    numel          uint32   (elements of the vector this payload decodes to)

followed by the codec's parameters and data (see each class). `decode(payload, expected_numel)`
needs nothing but the payload: it reads the header, validates every field and length and raises
`ValueError` naming the problem; it never returns a tensor of the wrong size.

Byte counts are exact and computable without encoding: `codec.bytes_for(numel) ==
len(codec.encode(x))` for every `x` with `numel` elements (the simulator may charge transfer
time from the formula).

Specs (`parse_codec`): ``none`` | ``fp16`` | ``int8`` | ``int4`` | ``int2`` (optionally
``:chunk=N``, N elements per scale, 0 = one scale for the whole tensor; default 1024) |
``topk:F`` (fraction F in (0, 1]; also ``topk:frac=F`` or ``topk:k=N``), optionally followed by
``+VALUES`` where VALUES is one of the non-top-k codecs used for the kept values, e.g.
``topk:0.1+int8`` or ``topk:0.01+int4:chunk=256``.

Stochastic codecs take ``generator``: a ``torch.Generator``, an int seed, or None (torch's
global generator, deterministic under ``torch.manual_seed``).
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod

import numpy as np
import torch

MAGIC = b"AF"
FORMAT = 1
_HEADER = struct.Struct("<2sBBI")
HEADER_BYTES = _HEADER.size  # 8
MAX_NUMEL = 2**32 - 1

RAW, FP16, QUANT, TOPK = 0, 1, 2, 3
_CODEC_NAMES = {RAW: "none", FP16: "fp16", QUANT: "int", TOPK: "topk"}

_QUANT_PARAMS = struct.Struct("<BI")  # bits, chunk (0 = whole tensor)
_TOPK_PARAMS = struct.Struct("<IB")  # k, index mode
_IDX_U16, _IDX_U32, _IDX_BITMAP = 0, 1, 2

FP16_MAX = 65504.0
DEFAULT_CHUNK = 1024

Generator = torch.Generator | int | None


# --------------------------------------------------------------------------- helpers


def _as_vector(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"expected a flat (1-D) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
    if x.numel() > MAX_NUMEL:
        raise ValueError(f"vector too long for the payload header: {x.numel()} > {MAX_NUMEL}")
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _generator(generator: Generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _header(codec_id: int, numel: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT, codec_id, numel)


def _f32_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().astype("<f4", copy=False).tobytes()


class _Reader:
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


def _read_header(r: _Reader) -> tuple[int, int]:
    if len(r.buf) < HEADER_BYTES:
        raise ValueError(f"payload too short for a header: {len(r.buf)} bytes, need {HEADER_BYTES}")
    magic, fmt, codec_id, numel = r.unpack(_HEADER, "header")
    if magic != MAGIC:
        raise ValueError(f"bad magic {bytes(magic)!r}: not an asyncfl payload (expected {MAGIC!r})")
    if fmt != FORMAT:
        raise ValueError(f"unsupported payload format version {fmt} (this build reads {FORMAT})")
    if codec_id not in _CODEC_NAMES:
        raise ValueError(f"unknown codec id {codec_id} in payload header")
    return codec_id, numel


# --------------------------------------------------------------------------- codecs


class Codec(ABC):
    """A float32 vector <-> bytes codec. Subclasses document layout, bytes and error bound."""

    codec_id: int

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
        x = _as_vector(x)
        return _header(self.codec_id, x.numel()) + self._encode_body(x, _generator(generator))

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

    @abstractmethod
    def _signature(self, numel: int) -> tuple:
        """What a payload of `numel` elements from this codec must carry in its parameters."""

    def compression_ratio(self, numel: int) -> float:
        """Raw float32 bytes (4 * numel) over this codec's payload bytes."""
        return 4.0 * numel / self.bytes_for(numel)

    def __eq__(self, other):
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)

    def __repr__(self):
        return f"parse_codec({self.spec!r})"


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
        return torch.zeros_like(_as_vector(x))

    def _encode_body(self, x, gen):
        return _f32_bytes(x)

    def _signature(self, numel):
        return (RAW,)


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
        x = _as_vector(x)
        return torch.maximum(x.abs() * 2.0**-11, torch.tensor(2.0**-25))

    def _encode_body(self, x, gen):
        h = x.half()
        if x.numel() and not torch.isfinite(h).all():
            bad = torch.isfinite(x) & ~torch.isfinite(h)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(f"fp16 overflow: element {i} = {x[i].item():g} exceeds +-{FP16_MAX:g}")
        return h.numpy().astype("<f2", copy=False).tobytes()

    def _signature(self, numel):
        return (FP16,)


def _pack(q: torch.Tensor, bits: int) -> bytes:
    """Pack uint8 codes < 2^bits tightly, little-endian within each byte (element 0 in the low bits)."""
    if bits == 8:
        return q.numpy().tobytes()
    per = 8 // bits
    pad = (-q.numel()) % per
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    q = q.view(-1, per)
    out = q[:, 0].clone()
    for j in range(1, per):  # at most 3 iterations: over bit slots, not elements
        out |= q[:, j] << (j * bits)
    return out.numpy().tobytes()


def _unpack(raw: np.ndarray, bits: int, n: int, what: str) -> torch.Tensor:
    b = torch.from_numpy(raw.copy())
    if bits == 8:
        return b
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    q = ((b.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if q.numel() > n and q[n:].any():
        raise ValueError(f"{what}: non-zero padding bits after the last code")
    return q[:n]


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
        x = _as_vector(x)
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
        return params + _f32_bytes(scales) + _pack(q, self.bits)

    def _signature(self, numel):
        return (QUANT, self.bits, self.chunk)


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
        x = _as_vector(x)
        k = self.k_for(x.numel())
        if k == x.numel():
            return torch.arange(k)
        return torch.topk(x.abs(), k, sorted=False).indices.sort().values

    def error_bound(self, x):
        x = _as_vector(x)
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

    def _signature(self, numel):
        return (TOPK, self.k_for(numel), self.values._signature(self.k_for(numel)))


# --------------------------------------------------------------------------- decoding


def _decode_body(r: _Reader, codec_id: int, numel: int) -> tuple[torch.Tensor, tuple]:
    """Decode what follows a header; returns the vector and the payload's signature."""
    what = _CODEC_NAMES[codec_id]
    r.what = what
    if codec_id == RAW:
        arr = r.array("<f4", numel, "float32 data")
        return torch.from_numpy(arr.astype(np.float32)), (RAW,)
    if codec_id == FP16:
        arr = r.array("<f2", numel, "float16 data")
        return torch.from_numpy(arr.astype(np.float32)), (FP16,)
    if codec_id == QUANT:
        bits, chunk = r.unpack(_QUANT_PARAMS, "quantization parameters")
        if bits not in StochasticQuantizer.BITS:
            raise ValueError(f"{what}: invalid bit width {bits} (must be one of {StochasticQuantizer.BITS})")
        r.what = what = f"int{bits}"
        qz = StochasticQuantizer(bits, chunk)
        size, n_chunks = qz._chunking(numel)
        scales = torch.from_numpy(r.array("<f4", 2 * n_chunks, "chunk scales").astype(np.float32))
        codes = r.array("u1", -(-numel * bits // 8), "codes")
        if numel == 0:
            return torch.zeros(0), (QUANT, bits, chunk)
        lo, step = scales.view(n_chunks, 2).unbind(1)
        top = lo + qz.levels * step
        if not (torch.isfinite(lo).all() and torch.isfinite(step).all() and torch.isfinite(top).all()):
            raise ValueError(f"{what}: non-finite chunk scale in payload")
        if (step < 0).any():
            raise ValueError(f"{what}: negative chunk step in payload")
        q = _unpack(codes, bits, numel, what).to(torch.float32)
        pad = size * n_chunks - numel
        if pad:
            q = torch.cat([q, q.new_zeros(pad)])
        out = torch.addcmul(lo.unsqueeze(1), q.view(n_chunks, size), step.unsqueeze(1))
        return out.reshape(-1)[:numel].contiguous(), (QUANT, bits, chunk)
    # top-k
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
    inner = _Reader(r.rest(), what)
    inner_id, inner_numel = _read_header(inner)
    if inner_id == TOPK:
        raise ValueError(f"{what}: nested top-k values are not supported")
    if inner_numel != k:
        raise ValueError(f"{what}: values payload has {inner_numel} elements, expected k = {k}")
    values, inner_sig = _decode_body(inner, inner_id, k)
    inner.finish()
    out = torch.zeros(numel, dtype=torch.float32)
    out[torch.from_numpy(idx)] = values
    return out, (TOPK, k, inner_sig)


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
    r = _Reader(memoryview(payload).cast("B"), "payload")
    codec_id, numel = _read_header(r)
    if expected_numel is not None and numel != expected_numel:
        raise ValueError(f"numel mismatch: payload has {numel} elements, expected {expected_numel}")
    out, signature = _decode_body(r, codec_id, numel)
    r.finish()
    if expect is not None and signature != expect._signature(numel):
        raise ValueError(f"payload codec {_describe(signature)} does not match the expected {expect.spec}")
    return out


def _describe(sig: tuple) -> str:
    if sig[0] == QUANT:
        return f"int{sig[1]}:chunk={sig[2]}"
    if sig[0] == TOPK:
        return f"topk(k={sig[1]})+{_describe(sig[2])}"
    return _CODEC_NAMES[sig[0]]


# --------------------------------------------------------------------------- spec parsing


def _parse_part(part: str, full: str) -> tuple[str, list[str], dict[str, str]]:
    name, _, rest = part.partition(":")
    name = name.strip().lower()
    positional, named = [], {}
    if rest.strip():
        for item in rest.split(","):
            item = item.strip()
            if not item:
                raise ValueError(f"codec spec {full!r}: empty parameter in {part!r}")
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip().lower()
                if key in named:
                    raise ValueError(f"codec spec {full!r}: parameter {key!r} given twice")
                named[key] = value.strip()
            else:
                positional.append(item)
    elif ":" in part:
        raise ValueError(f"codec spec {full!r}: missing parameters after ':' in {part!r}")
    return name, positional, named


def _int_param(value: str, key: str, full: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"codec spec {full!r}: {key} must be an integer, got {value!r}") from None


def _value_codec(part: str, full: str) -> Codec:
    name, positional, named = _parse_part(part, full)
    if name in ("none", "fp32", "raw", "fp16"):
        if positional or named:
            raise ValueError(f"codec spec {full!r}: {name} takes no parameters")
        return Float16() if name == "fp16" else Raw()
    if name in ("int8", "int4", "int2"):
        if positional:
            raise ValueError(f"codec spec {full!r}: {name} takes only chunk=N, got {positional[0]!r}")
        unknown = set(named) - {"chunk"}
        if unknown:
            raise ValueError(f"codec spec {full!r}: unknown parameter(s) {sorted(unknown)} for {name} (known: chunk)")
        chunk = _int_param(named["chunk"], "chunk", full) if "chunk" in named else DEFAULT_CHUNK
        try:
            return StochasticQuantizer(int(name[3:]), chunk)
        except ValueError as e:
            raise ValueError(f"codec spec {full!r}: {e}") from None
    if name == "topk":
        raise ValueError(f"codec spec {full!r}: top-k must come first, e.g. 'topk:0.1+int8'")
    raise ValueError(
        f"codec spec {full!r}: unknown codec {name!r} (known: none, fp16, int8, int4, int2, topk)"
    )


def parse_codec(spec: str) -> Codec:
    """Build a codec from a spec such as 'fp16', 'int4:chunk=1024', 'topk:0.1+int8'."""
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"codec spec must be a non-empty string, got {spec!r}")
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts):
        raise ValueError(f"codec spec {spec!r}: empty part around '+'")
    if len(parts) > 2:
        raise ValueError(f"codec spec {spec!r}: at most two parts (topk:F+VALUES)")
    name, positional, named = _parse_part(parts[0], spec)
    if name != "topk":
        if len(parts) == 2:
            raise ValueError(f"codec spec {spec!r}: only top-k composes with a value codec ('topk:F+{parts[1]}')")
        return _value_codec(parts[0], spec)
    unknown = set(named) - {"frac", "k"}
    if unknown:
        raise ValueError(f"codec spec {spec!r}: unknown parameter(s) {sorted(unknown)} for topk (known: frac, k)")
    given = positional + [named[key] for key in ("frac",) if key in named]
    if len(positional) > 1 or len(given) + ("k" in named) != 1:
        raise ValueError(f"codec spec {spec!r}: top-k needs exactly one of a fraction ('topk:0.1') or k=N")
    values = _value_codec(parts[1], spec) if len(parts) == 2 else None
    try:
        if "k" in named:
            return TopK(k=_int_param(named["k"], "k", spec), values=values)
        try:
            fraction = float(given[0])
        except ValueError:
            raise ValueError(f"top-k fraction must be a number, got {given[0]!r}") from None
        if not math.isfinite(fraction):
            raise ValueError(f"top-k fraction must be in (0, 1], got {given[0]!r}")
        return TopK(fraction, values=values)
    except ValueError as e:
        if str(e).startswith("codec spec"):
            raise
        raise ValueError(f"codec spec {spec!r}: {e}") from None
