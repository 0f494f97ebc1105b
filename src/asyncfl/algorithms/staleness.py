"""Staleness functions s(d), d = server version - client's base version.

They scale how much a late update counts: FedAsync multiplies its mixing rate by s(d),
FedBuff multiplies each buffered delta by s(d).
"""

from __future__ import annotations

import math
from collections.abc import Callable

StalenessFn = Callable[[int], float]


def constant() -> StalenessFn:
    return lambda d: 1.0


def polynomial(a: float) -> StalenessFn:
    """(d + 1)^(-a): smooth decay, the FedAsync paper's 'poly'."""
    if a <= 0:
        raise ValueError(f"polynomial staleness needs a > 0, got {a}")
    return lambda d: (d + 1.0) ** (-a)


def hinge(a: float, b: float) -> StalenessFn:
    """Full weight up to b versions late, then 1 / (a (d - b) + 1)."""
    if a <= 0 or b < 0:
        raise ValueError(f"hinge staleness needs a > 0 and b >= 0, got a={a}, b={b}")
    return lambda d: 1.0 if d <= b else 1.0 / (a * (d - b) + 1.0)


def inverse_sqrt() -> StalenessFn:
    """1 / sqrt(1 + d): FedBuff's default."""
    return lambda d: 1.0 / math.sqrt(1.0 + d)


def make(kind: str, a: float = 0.5, b: float = 4.0) -> StalenessFn:
    if kind == "constant":
        return constant()
    if kind == "polynomial":
        return polynomial(a)
    if kind == "hinge":
        return hinge(a, b)
    if kind == "inverse_sqrt":
        return inverse_sqrt()
    raise ValueError(f"unknown staleness function {kind!r}")
