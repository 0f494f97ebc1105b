"""What a client sends back after a trip: the only thing aggregators consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClientUpdate:
    client_id: int
    base_version: int
    delta: torch.Tensor  # w_base - w_local: points like a gradient
    n_examples: int
    steps: int  # local steps actually taken (fewer than asked for partial work)
    loss: float  # mean training loss over the local steps
