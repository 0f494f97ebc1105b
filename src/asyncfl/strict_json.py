"""JSON from an untrusted peer (frame headers, request bodies), read with bounds the standard
parser lacks: Python's `json.loads` raises RecursionError on deeply nested input, ValueError
(not a decode error) on integers of thousands of digits, and silently keeps the last of two
equal keys, so two readers of the same bytes can disagree. `loads` turns each of these into
`JsonError` before any of it reaches a handler."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # a frame header needs 4 levels, a check-in body 1
MAX_INT_DIGITS = 18  # every integer the protocol carries fits in int64
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonError(ValueError):
    """Input that is not JSON, or JSON beyond the bounds; the message names which."""


def _depth(text: str) -> int:
    """Deepest nesting of arrays and objects, counted outside strings (a cheap pre-scan, so the
    recursive parser never sees input deeper than `MAX_DEPTH`)."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonError(f"integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def _object(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JsonError(f"duplicate key {dup!r}")
    return out


def loads(raw: bytes) -> Any:
    """The value of UTF-8 JSON `raw`; JsonError for invalid UTF-8 or JSON, nesting deeper than
    `MAX_DEPTH`, integers longer than `MAX_INT_DIGITS` digits, or an object with a key twice."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonError(f"not UTF-8: {err}") from None
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise JsonError(f"nested {depth} levels deep (at most {MAX_DEPTH})")
    try:
        return json.loads(text, parse_int=_int, object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        raise JsonError(str(err)) from None
