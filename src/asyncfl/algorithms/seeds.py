"""Every per-trip and per-version seed of a run, derived from the experiment seed in one place,
so that the simulator and the network server/client draw the same numbers: the n-th trip of a
served run trains (and rounds its upload) exactly as the n-th trip of a simulated one."""

from __future__ import annotations

import numpy as np
import torch

from asyncfl.algorithms.shuffle import mix

_TORCH_SEED_MASK = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def trip_seed(experiment_seed: int, trip_number) -> np.ndarray:
    """Training seeds (uint64) of trips numbered from 0 in start order; `trip_number` may be an
    int (a one-element array comes back) or an array of them."""
    return mix(experiment_seed, trip_number)


def upload_rounding_generator(trip_seed: int) -> torch.Generator:
    """The stochastic-rounding generator an upload codec encodes a trip's update with."""
    return torch.Generator().manual_seed((int(trip_seed) ^ 0xC0DEC) & _TORCH_SEED_MASK)


def download_rounding_generator(experiment_seed: int, version: int) -> torch.Generator:
    """The stochastic-rounding generator a lossy download codec encodes model `version` with
    (once per version: every device downloading it gets the same bytes)."""
    return torch.Generator().manual_seed(int(mix(experiment_seed, version, 0xD0)[0]) & _TORCH_SEED_MASK)
