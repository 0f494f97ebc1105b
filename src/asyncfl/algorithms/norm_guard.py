"""A norm guard: refuses updates whose L2 norm is far above what the task's honest clients send.

One client must not be able to move the model further than many honest clients together, yet
no fixed bound fits every task (update norms depend on the model, the data, the learning rate
and the local work). The guard adapts: an update is refused when its norm exceeds `multiple`
times the median of the last `window` accepted norms. The median, unlike a mean or a maximum,
is not moved by a minority of large updates, and refused updates never enter the window, so
an attacker cannot raise the bar it is measured against.

Before `warmup` updates have been accepted there is no median to trust, and the absolute
`initial_bound` applies alone. It comes from the task: `multiple` times the initial model's
norm (at least 1), see `initial_bound`. An honest update is a few SGD steps from that model,
which move it by a fraction of its own size; one that moves it further than `multiple` times
its whole size can only blow it up. The absolute bound stays in force after the warm-up.

Pure: no clock, no I/O. Its state is plain JSON (`state_dict`), so a restarted server goes on
with the same window.
"""

from __future__ import annotations

import collections
import math
import statistics

import torch


def initial_bound(w0: torch.Tensor, multiple: float) -> float:
    """The warm-up bound for a task whose model starts at w0: `multiple` x max(||w0||, 1) (the
    floor keeps a model initialised at or near zero trainable)."""
    return multiple * max(float(torch.linalg.vector_norm(w0.double())), 1.0)


class NormGuard:
    def __init__(self, multiple: float, window: int, warmup: int, bound0: float):
        if multiple <= 1 or window < 1 or not 1 <= warmup <= window or not bound0 > 0:
            raise ValueError(
                f"norm guard needs multiple > 1, 1 <= warmup <= window and a positive initial bound, got "
                f"multiple={multiple}, window={window}, warmup={warmup}, initial bound={bound0}"
            )
        self.multiple, self.warmup, self.bound0 = multiple, warmup, bound0
        self.norms: collections.deque[float] = collections.deque(maxlen=window)
        self.accepted = 0
        self.rejected = 0

    def bound(self) -> float:
        """The largest norm accepted now."""
        if self.accepted < self.warmup:
            return self.bound0
        median = statistics.median(self.norms)
        return min(self.bound0, self.multiple * median) if median > 0 else self.bound0

    def check(self, norm: float) -> str | None:
        """Why an update of this norm is refused (None: it is not); counts the refusal."""
        bound = self.bound()
        if math.isfinite(norm) and norm <= bound:
            return None
        self.rejected += 1
        if self.accepted < self.warmup:
            why = f"the warm-up bound {bound:.4g} ({self.multiple:g} x the initial model's norm)"
        else:
            why = f"{bound:.4g} ({self.multiple:g} x the median of the last {len(self.norms)} accepted norms)"
        return f"L2 norm {norm:.4g} exceeds {why}"

    def accept(self, norm: float) -> None:
        """Record the norm of an update the aggregator took in."""
        self.norms.append(norm)
        self.accepted += 1

    def status(self) -> dict:
        return {
            "bound": self.bound(),
            "warming_up": self.accepted < self.warmup,
            "accepted": self.accepted,
            "rejected": self.rejected,
        }

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "accepted": self.accepted, "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        self.accepted, self.rejected = state["accepted"], state["rejected"]
