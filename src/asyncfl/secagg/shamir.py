"""t-of-n Shamir secret sharing of short byte strings over the prime field GF(2^521 - 1).

SecAgg hides each client's self-mask seed and masking key behind a threshold: any t holders can
rebuild them for the server when the owner drops out or survives, fewer learn nothing. A secret
of up to 64 bytes is one field element (2^512 < p), so one share is one evaluation of a random
polynomial of degree t - 1 whose constant term is the secret, at x = the holder's index. The
coefficients come from `secrets` (a CSPRNG), as the scheme's secrecy rests on them.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PRIME = (1 << 521) - 1
MAX_SECRET_BYTES = 64
_FIELD_BYTES = 66


class NotEnoughShares(ValueError):
    """Fewer shares than the threshold: the secret is information-theoretically hidden."""


class InconsistentShares(ValueError):
    """Shares that do not lie on one polynomial of degree t - 1 (corrupted, mixed or forged)."""


@dataclass(frozen=True)
class Share:
    """One holder's share: its evaluation point x (>= 1), the value, and the secret's length."""

    x: int
    y: int
    secret_bytes: int

    def to_bytes(self) -> bytes:
        """x (2 bytes), the secret length (1 byte), y (66 bytes), big endian."""
        return self.x.to_bytes(2, "big") + bytes([self.secret_bytes]) + self.y.to_bytes(_FIELD_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 3 + _FIELD_BYTES:
            raise InconsistentShares(f"a share is {3 + _FIELD_BYTES} bytes, got {len(data)}")
        share = cls(int.from_bytes(data[:2], "big"), int.from_bytes(data[3:], "big"), data[2])
        if not (share.x >= 1 and share.y < PRIME and 1 <= share.secret_bytes <= MAX_SECRET_BYTES):
            raise InconsistentShares("share out of range")
        return share


def split(secret: bytes, threshold: int, points: Sequence[int]) -> dict[int, Share]:
    """Shares of `secret` at the evaluation points `points` (distinct, >= 1); any `threshold` rebuild it."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret is 1 to {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(points)) != len(points) or any(not 1 <= x < 1 << 16 for x in points):
        raise ValueError("evaluation points must be distinct integers in [1, 65535]")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be in [1, {len(points)}], got {threshold}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: Share(x, _evaluate(coefficients, x), len(secret)) for x in points}


def combine(shares: Iterable[Share], threshold: int) -> bytes:
    """Rebuild the secret from at least `threshold` shares; shares beyond t are checked against it."""
    shares = list(shares)
    if len({share.x for share in shares}) != len(shares):
        raise InconsistentShares("two shares have the same evaluation point")
    if len(shares) < threshold:
        raise NotEnoughShares(f"{len(shares)} shares, the threshold is {threshold}")
    if len({share.secret_bytes for share in shares}) != 1:
        raise InconsistentShares("shares disagree on the secret's length")
    basis, extra = shares[:threshold], shares[threshold:]
    if any(_interpolate(basis, share.x) != share.y for share in extra):
        raise InconsistentShares("the shares do not lie on one polynomial of degree threshold - 1")
    value = _interpolate(basis, 0)
    length = shares[0].secret_bytes
    if value >= 1 << (8 * length):
        raise InconsistentShares("the rebuilt value does not fit the secret's length")
    return value.to_bytes(length, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _interpolate(shares: Sequence[Share], at: int) -> int:
    """Lagrange interpolation through `shares`, evaluated at `at`, in GF(PRIME): O(t) given the weights."""
    xs = tuple(share.x for share in shares)
    factors = [(at - x) % PRIME for x in xs]
    prefix = [1]
    for factor in factors[:-1]:
        prefix.append(prefix[-1] * factor % PRIME)
    weights, total, suffix = _barycentric_weights(xs), 0, 1
    for i in reversed(range(len(xs))):
        total = (total + shares[i].y * weights[i] % PRIME * prefix[i] % PRIME * suffix) % PRIME
        suffix = suffix * factors[i] % PRIME
    return total


@functools.lru_cache(maxsize=64)
def _barycentric_weights(xs: tuple[int, ...]) -> tuple[int, ...]:
    """1 / prod_(j != i) (x_i - x_j): shared by every secret rebuilt from the same holders."""
    weights = []
    for i, xi in enumerate(xs):
        denominator = 1
        for j, xj in enumerate(xs):
            if i != j:
                denominator = denominator * (xi - xj) % PRIME
        weights.append(pow(denominator, -1, PRIME))
    return tuple(weights)
