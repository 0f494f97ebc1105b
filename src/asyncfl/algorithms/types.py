"""The small types every part shares: the server's model state, what a client sends back after
a trip (the only thing aggregators consume), and what an aggregator did with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch


@dataclass
class ServerState:
    w: torch.Tensor
    version: int = 0


class Verdict(StrEnum):
    BUFFERED = "buffered"
    STEPPED = "stepped"
    DISCARDED = "discarded"


@dataclass(slots=True)
class ClientUpdate:
    client_id: int
    base_version: int
    delta: torch.Tensor  # w_base - w_local: points like a gradient
    n_examples: int
    steps: int  # local steps actually taken (fewer than planned for partial work)
    loss: float  # mean training loss over the local steps
    # loss at the downloaded model (q-FedAvg's F_k): over the client's whole data or its first
    # minibatch, as LocalTrainer's start_loss says; NaN when not computed
    start_loss: float = math.nan
    planned_steps: int | None = None  # steps the client was asked for; None: as many as taken
    # tensors uploaded besides the delta, keyed by the algorithm's `upload_fields` (SCAFFOLD's
    # change of the client's control variate); None for algorithms that upload the delta alone
    extras: dict[str, torch.Tensor] | None = None
    masked: Any = None  # under secure aggregation with a TSA: the masked upload (secagg MaskedUpload), no delta

    @property
    def work_fraction(self) -> float:
        """Share of the planned local work done: below 1 for a straggler's partial update."""
        return 1.0 if not self.planned_steps else min(1.0, self.steps / self.planned_steps)


def clone_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """A checkpoint's own copy of an optional tensor (aggregators' `state_dict` / `load_state_dict`)."""
    return None if t is None else t.clone()
