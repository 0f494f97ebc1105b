"""Central user-level differential privacy for a run."""

from __future__ import annotations

from pydantic import Field

from asyncfl.config.base import Strict


class AdaptiveClipConfig(Strict):
    """Quantile-based clip norm (Andrew et al. 2021): C follows the target quantile of the
    update norms; starts at privacy.clip_norm."""

    target_quantile: float = Field(default=0.5, ge=0, le=1)
    learning_rate: float = Field(default=0.2, gt=0)
    count_noise_std: float | None = Field(default=None, ge=0, description="sigma_b; default expected count / 20")


class PrivacyConfig(Strict):
    """Central user-level DP: clip each update to clip_norm, add N(0, (noise_multiplier *
    clip_norm)^2) to each aggregate's sum, account epsilon at delta (RDP, subsampled Gaussian)."""

    clip_norm: float = Field(gt=0, description="C: L2 bound per update (initial value when adaptive)")
    noise_multiplier: float = Field(ge=0, description="sigma: noise std / C on the sum; 0 = clip only, no epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    sample_rate: float | None = Field(
        default=None, gt=0, le=1, description="q per server step; default expected updates per step / users"
    )
    adaptive: AdaptiveClipConfig | None = None
    noise_seed: int | None = Field(default=None, ge=0, description="default: derived from the experiment seed")
