"""Central user-level differential privacy: clipping, Gaussian noise, RDP accounting."""

from asyncfl.privacy.accountant import Accountant, epsilon, noise_multiplier_for
from asyncfl.privacy.dp import AdaptiveClipping, add_gaussian_noise, clip, noise_std, update_noise_multiplier

__all__ = [
    "Accountant",
    "AdaptiveClipping",
    "add_gaussian_noise",
    "clip",
    "epsilon",
    "noise_multiplier_for",
    "noise_std",
    "update_noise_multiplier",
]
