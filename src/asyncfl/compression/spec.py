"""Codec specs: the strings runs and the wire name codecs by, and `parse_codec` to build them.

Grammar: ``none`` | ``fp16`` | ``int8`` | ``int4`` | ``int2`` (optionally ``:chunk=N``, N
elements per scale, 0 = one scale for the whole tensor; default 1024) | ``topk:F`` (fraction F
in (0, 1]; also ``topk:frac=F`` or ``topk:k=N``), optionally followed by ``+VALUES`` where VALUES
is one of the non-top-k codecs used for the kept values, e.g. ``topk:0.1+int8`` or
``topk:0.01+int4:chunk=256``. Every codec's `spec` is the canonical form of its own spec.
"""

from __future__ import annotations

import math

from asyncfl.compression.codec import Codec
from asyncfl.compression.fp16 import Float16
from asyncfl.compression.quantize import DEFAULT_CHUNK, StochasticQuantizer
from asyncfl.compression.raw import Raw
from asyncfl.compression.topk import TopK


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
    raise ValueError(f"codec spec {full!r}: unknown codec {name!r} (known: none, fp16, int8, int4, int2, topk)")


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
