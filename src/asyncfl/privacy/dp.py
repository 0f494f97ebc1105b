"""Central user-level differential privacy: clip each update, add Gaussian noise to the sum.

The mechanism (DP-FedAvg, McMahan et al. 2018): every client update is clipped to L2
norm C; the server adds N(0, (sigma * C)^2) per coordinate to the *sum* of the clipped updates
of one aggregate (a FedBuff buffer, a FedAvg round) and only then normalises. The accountant
(`asyncfl.privacy.accountant`) turns (sigma, sample rate, number of aggregates) into epsilon.

Weighted aggregates. If the sum is weighted, S = sum_i w_i clip(delta_i), adding or removing one
user changes S by at most w_max * C in L2 norm, so the noise std must be sigma * C * w_max where
w_max is an a-priori bound on any single weight, fixed before seeing the data (not the realised
max of the buffer, which would make the noise scale data dependent). We choose to scale the
noise by that bound (`max_weight`, default 1) and require w_i <= max_weight; with staleness
weights s(d) <= 1 and uniform example weights, w_max = 1 and the rule is plain sigma * C. The
normaliser must also be data independent: divide the noisy sum by a fixed number (FedBuff's
`normalize=count` with buffer size K, or the expected cohort size), never by the realised weight
sum or by example counts n_k (unbounded weights, and the weight sum itself reveals a user).
The noisy average then carries noise std sigma * C * w_max / K per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _check_clip_norm(clip_norm: float) -> float:
    clip_norm = float(clip_norm)
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip norm must be a positive finite number, got {clip_norm}")
    return clip_norm


def _check_sigma(noise_multiplier: float) -> float:
    noise_multiplier = float(noise_multiplier)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier}")
    return noise_multiplier


def clip(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale `delta` to L2 norm at most `clip_norm`; returns (clipped, original norm).

    An update already within the bound is returned as is (the same tensor object, not a
    copy); a longer one is scaled by clip_norm / norm (a new tensor). Non-finite norms raise.
    """
    clip_norm = _check_clip_norm(clip_norm)
    norm = float(torch.linalg.vector_norm(delta.detach(), dtype=torch.float64))
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update with non-finite norm ({norm})")
    if norm <= clip_norm:
        return delta, norm
    return delta * (clip_norm / norm), norm


def noise_std(noise_multiplier: float, clip_norm: float, max_weight: float = 1.0) -> float:
    """Per-coordinate std of the noise on a weighted sum: sigma * C * max_weight."""
    max_weight = float(max_weight)
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be a positive finite number, got {max_weight}")
    return _check_sigma(noise_multiplier) * _check_clip_norm(clip_norm) * max_weight


def add_gaussian_noise(
    total: torch.Tensor,
    noise_multiplier: float,
    clip_norm: float,
    *,
    max_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gaussian mechanism on a (weighted) sum of clipped updates: total + N(0, std^2 I).

    std = noise_multiplier * clip_norm * max_weight (see the module docstring for the weighting
    rule). Returns a new tensor of total's dtype; noise_multiplier = 0 returns a copy (clipping
    only, no privacy). Deterministic given `generator`.
    """
    std = noise_std(noise_multiplier, clip_norm, max_weight)
    if std == 0:
        return total.clone()
    noise = torch.randn(total.shape, generator=generator, dtype=torch.float32)
    return total + noise.to(total.dtype).mul_(std)


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Andrew et al. eq. for sharing the budget with the noisy clipped-count query.

    Releasing the update sum with multiplier z_delta and the count (sensitivity 1/2 after
    centring) with std sigma_b is, for privacy, one Gaussian mechanism with multiplier
    z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2). Given the target z this returns
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2); requires 2 sigma_b > z. Account with z.
    """
    z = _check_sigma(noise_multiplier)
    sb = float(count_noise_std)
    if z == 0:
        return 0.0
    if not (math.isfinite(sb) and 2 * sb > z):
        raise ValueError(f"count noise std sigma_b = {sb} too small for noise multiplier {z}: need 2 * sigma_b > z")
    return (z**-2 - (2 * sb) ** -2) ** -0.5


class AdaptiveClipping:
    """Quantile-based adaptive clip norm (Andrew et al., "Differentially Private Learning with
    Adaptive Clipping", NeurIPS 2021).

    After each aggregate of n updates, with b = number of them whose norm was <= C (not
    clipped), the noisy fraction b_hat = (b - n/2 + N(0, sigma_b^2)) / m + 1/2 is released
    (centred, so one user moves the noised sum by at most 1/2), m being the expected number
    of updates per aggregate (fixed, data independent: the buffer size K), clamped to [0, 1]
    (post-processing: no privacy cost), and

        C <- C * exp(-learning_rate * (b_hat - target_quantile))

    so C grows while fewer than the target fraction fit and shrinks otherwise; it converges
    towards the target quantile of the update-norm distribution. The paper suggests
    target_quantile 0.5, learning_rate 0.2, sigma_b = m / 20. With DP, noise the update sum with
    `update_noise_multiplier(z, sigma_b)` and account with z. sigma_b = 0 means no count
    noise (not private: only for experiments without DP).
    """

    def __init__(
        self,
        initial_clip: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        expected_count: float = 1.0,
        count_noise_std: float = 0.0,
        min_clip: float = 1e-6,
        max_clip: float = 1e6,
    ):
        self.clip_norm = _check_clip_norm(initial_clip)
        if not 0.0 <= target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        if not (math.isfinite(expected_count) and expected_count > 0):
            raise ValueError(f"expected_count must be positive, got {expected_count}")
        if not (math.isfinite(count_noise_std) and count_noise_std >= 0):
            raise ValueError(f"count_noise_std must be >= 0, got {count_noise_std}")
        if not 0 < min_clip <= max_clip:
            raise ValueError(f"need 0 < min_clip <= max_clip, got {min_clip}, {max_clip}")
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.expected_count = float(expected_count)
        self.count_noise_std = float(count_noise_std)
        self.min_clip, self.max_clip = float(min_clip), float(max_clip)

    def noisy_fraction(self, norms: Sequence[float] | torch.Tensor, generator: torch.Generator | None = None) -> float:
        norms = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
        centred = float((norms <= self.clip_norm).sum()) - 0.5 * norms.numel()  # sensitivity 1/2
        if self.count_noise_std > 0:
            centred += self.count_noise_std * float(torch.randn((), generator=generator, dtype=torch.float64))
        # an estimated fraction, so clamped to [0, 1] (as tensorflow/privacy does): noise or more
        # updates than expected must not move C further than all (or none) under it would
        return min(1.0, max(0.0, centred / self.expected_count + 0.5))

    def update(self, norms: Sequence[float] | torch.Tensor, generator: torch.Generator | None = None) -> float:
        """Fold one aggregate's pre-clipping norms in; returns the new clip norm."""
        b_hat = self.noisy_fraction(norms, generator)
        c = self.clip_norm * math.exp(-self.learning_rate * (b_hat - self.target_quantile))
        self.clip_norm = min(self.max_clip, max(self.min_clip, c))
        return self.clip_norm

    def state_dict(self) -> dict:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict) -> None:
        self.clip_norm = _check_clip_norm(state["clip_norm"])
