"""Secure aggregation for a run: the server only sees sums of several updates (asyncfl.secagg).

Which runs it fits is checked by `check_run`: the protocol must match the schedule and the
algorithm must only need a weighted sum of updates; anything that reads individual updates on
the server (robust rules, top-k, a Byzantine filter, norm checks) is refused with the reason.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from asyncfl.config.base import Strict

SYNC_PROTOCOLS = ("secagg_plus", "secagg")
DEFAULT_THRESHOLD = 0.5
HIDES = "needs individual updates, which secure aggregation hides"


class SecureAggregationConfig(Strict):
    """secagg_plus / secagg: synchronous rounds (advertise keys, share keys, masked input,
    unmask) over a k-regular neighbour graph or all pairs; tsa: FedBuff's buffer unmasked by a
    trusted secure aggregator. Clipping happens on the client: each coordinate is clipped to
    [-clip_range, clip_range] before the fixed-point encoding into `bits`-bit integers."""

    protocol: Literal["secagg_plus", "secagg", "tsa"] = "secagg_plus"
    bits: int = Field(default=32, ge=8, le=64, multiple_of=8, description="ring Z_(2^bits): bytes per coordinate")
    clip_range: float = Field(gt=0, description="each coordinate of an update is clipped to [-r, r] on the client")
    threshold: float = Field(
        default=DEFAULT_THRESHOLD,
        gt=0,
        le=1,
        description="sync: t as a fraction of the cohort; a round needs t survivors to unmask",
    )
    neighbours: int | None = Field(
        default=None,
        ge=2,
        description="secagg_plus: even k neighbours per client (null: 2 ceil(log2 n)); secagg: all pairs",
    )
    rounding: bool = Field(
        default=True, description="simulation: apply the fixed-point encoding's stochastic rounding to each update"
    )

    @model_validator(mode="after")
    def _fits_protocol(self):
        # compared with the default rather than "was it set": a dumped config must load again
        if self.protocol == "tsa" and (self.neighbours is not None or self.threshold != DEFAULT_THRESHOLD):
            raise ValueError("threshold and neighbours apply to the synchronous protocols (secagg, secagg_plus)")
        if self.protocol == "secagg" and self.neighbours is not None:
            raise ValueError("secagg masks all pairs: neighbours applies to secagg_plus only")
        if self.neighbours is not None and self.neighbours % 2:
            raise ValueError(f"neighbours must be even (a k-regular ring graph), got {self.neighbours}")
        return self


def neighbours(s: SecureAggregationConfig, clients: int) -> int:
    """k: all other clients for secagg; secagg_plus's configured (even) k, by default
    2 ceil(log2 n) (all pairs when that is not below n - 1)."""
    if s.protocol == "secagg":
        return clients - 1
    k = s.neighbours if s.neighbours is not None else 2 * math.ceil(math.log2(clients))
    return k if k < clients - 1 else clients - 1


def sync_threshold(s: SecureAggregationConfig, clients: int) -> int:
    """t: the threshold fraction of a neighbourhood (k + 1 clients; all n for secagg)."""
    return max(1, math.ceil(s.threshold * (neighbours(s, clients) + 1) - 1e-9))


def check_run(spec) -> None:
    """Raise ValueError naming why secure aggregation does not fit the run `spec` (a RunSpec)."""
    from asyncfl.algorithms.defs.registry import definition, definitions
    from asyncfl.compression import TopK, parse_codec

    s, a = spec.secure_aggregation, spec.algorithm
    mode = spec.scheduler.mode
    if s.protocol == "tsa":
        if a.name != "fedbuff" or mode != "async":
            raise ValueError(
                f"secure_aggregation.protocol 'tsa' is for async fedbuff (a buffer of updates unmasked "
                f"by the trusted aggregator), not {mode} {a.name}; use secagg_plus for sync rounds"
            )
    else:
        if mode != "sync":
            raise ValueError(
                f"secure_aggregation.protocol {s.protocol!r} runs in sync rounds, not {mode} mode; "
                "use protocol 'tsa' with async fedbuff"
            )
        if not definition(a.name).secure_aggregation:
            fit = [n for n, d in definitions().items() if d.secure_aggregation]
            raise ValueError(
                f"secure aggregation is not supported for algorithm {a.name!r} (its server needs more "
                f"than a weighted sum of updates); use one of {', '.join(fit)}"
            )
    aggregation = getattr(a, "aggregation", "mean")
    if aggregation != "mean":
        raise ValueError(f"algorithm.aggregation {aggregation!r} {HIDES}: use 'mean' with secure_aggregation")
    if getattr(a, "filter", None) is not None:
        raise ValueError(f"algorithm.filter (Kardam) {HIDES}: remove it with secure_aggregation")
    if getattr(a, "clip_norm", None) is not None:
        raise ValueError(
            "algorithm.clip_norm: the server cannot see an update's norm under secure aggregation; "
            "clipping happens on the client (secure_aggregation.clip_range bounds each coordinate)"
        )
    if spec.norm_guard is not None:
        raise ValueError(
            "norm_guard: the server cannot see an update's norm under secure aggregation; clipping "
            "happens on the client (secure_aggregation.clip_range bounds each coordinate)"
        )
    if spec.compression is not None and isinstance(parse_codec(spec.compression.upload), TopK):
        raise ValueError(f"compression.upload top-k {HIDES} (which coordinates to keep differs per client)")
    if mode == "sync" and s.neighbours is not None and s.neighbours >= spec.scheduler.concurrency:
        raise ValueError(
            f"secure_aggregation.neighbours {s.neighbours} must be below the cohort {spec.scheduler.concurrency}"
        )
