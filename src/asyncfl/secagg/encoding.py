"""Fixed-point encoding of float updates into Z_(2^b), chosen so that a weighted sum cannot wrap.

Masks only cancel in modular arithmetic, so updates must become ring elements before masking. A
coordinate is clipped to [-r, r] and mapped to an integer in [-M, M] with
M = floor((2^(b-1) - 1) / W_max), W_max the largest total integer weight one sum may carry
(K_max updates times the largest weight). Any sum of encoded updates with total weight <= W_max
then stays within [-(2^(b-1) - 1), 2^(b-1) - 1] and the two's-complement decode is exact: no
wrap-around is possible by construction, and a sum whose weight exceeds W_max is refused rather
than decoded (it could have wrapped). The scale is s = M / r (the floor keeps stochastic rounding
of a value in [-M, M] inside [-M, M]).

Rounding is stochastic (floor(x s + u), u uniform), so the encoded value is unbiased and each
update's per-coordinate error is below 1 / s. `error_bound` states the resulting bound on a
decoded weighted sum; decoding divides by s and returns float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from asyncfl.secagg.ring import Ring


class RingOverflowError(OverflowError):
    """A sum's total integer weight exceeds what the encoding was sized for: it may have wrapped."""


@dataclass(frozen=True)
class FixedPointCodec:
    """Encoding of coordinates in [-clip_range, clip_range] for sums of total weight <= max_total_weight."""

    clip_range: float
    max_total_weight: int
    ring: Ring = field(default_factory=Ring)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip range must be a positive finite number, got {self.clip_range}")
        if int(self.max_total_weight) != self.max_total_weight or self.max_total_weight < 1:
            raise ValueError(f"max total weight must be a positive integer, got {self.max_total_weight}")
        if self.max_level < 1:
            raise ValueError(
                f"{self.ring.bits}-bit ring cannot hold sums of total weight {self.max_total_weight}: "
                "use more bits or a smaller max total weight"
            )

    @property
    def max_level(self) -> int:
        """M: the largest encoded magnitude of one coordinate of one update."""
        return ((1 << (self.ring.bits - 1)) - 1) // int(self.max_total_weight)

    @property
    def scale(self) -> float:
        """s: ring units per unit of the update."""
        return self.max_level / self.clip_range

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip, scale and stochastically round a float vector (numpy or CPU tensor) into the ring."""
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("cannot encode an update with non-finite coordinates")
        scaled = np.clip(values, -self.clip_range, self.clip_range) * self.scale
        levels = np.floor(scaled + rng.random(scaled.shape))
        np.clip(levels, -self.max_level, self.max_level, out=levels)  # float rounding at the edge only
        return self.ring.from_signed(levels.astype(np.int64))

    def check_weight(self, total_weight: int) -> None:
        """Raise if a sum of this total integer weight could have wrapped."""
        if total_weight > self.max_total_weight:
            raise RingOverflowError(
                f"total weight {total_weight} exceeds the encoding's max total weight {self.max_total_weight}: "
                "the sum may have wrapped around the ring"
            )

    def decode(self, total: np.ndarray, total_weight: int) -> np.ndarray:
        """Ring sum of encoded updates (already weighted) -> float64 weighted sum of the clipped updates."""
        self.check_weight(total_weight)
        return self.ring.to_signed(total).astype(np.float64) / self.scale

    def error_bound(self, total_weight: int) -> float:
        """Largest |decoded - sum_i w_i clip(x_i)| per coordinate for a sum of total weight W.

        Each update's rounding error is in (-1, 1) ring units, so the weighted sum's is below W in
        ring units, i.e. W / s after decoding; float64 scaling and conversion add at most a relative
        2^-50 of the largest possible sum, W r. The error is unbiased with std at most
        sqrt(sum_i w_i^2) / (2 s).
        """
        self.check_weight(total_weight)
        return total_weight / self.scale + total_weight * self.clip_range * 2.0**-50

    def noise_std_in_ring(self, noise_std: float) -> float:
        """Ring units of a Gaussian noise std given in units of the decoded weighted sum."""
        return float(noise_std) * self.scale
