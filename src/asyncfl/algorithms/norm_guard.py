"""A norm guard: refuses updates whose L2 norm is far above what the task's honest clients send.

One client must not be able to move the model further than many honest clients together, yet
no fixed bound fits every task (update norms depend on the model, the data, the learning rate
and the local work). The guard adapts: an update is refused when its norm exceeds `multiple`
times the median of the last `window` accepted norms. The median, unlike a mean or a maximum,
is not moved by a minority of large updates, and refused updates never enter the window, so
an attacker cannot raise the bar it is measured against.

Before `warmup` updates have been accepted the window is too small to trust, and the guard
judges an update against the median of every finite norm it has seen so far, refused ones
included: at the start of a run the first arrivals may hold several attackers, and a median of
what was accepted would let the first one in unchecked and then measure the next against it.
The median of all arrivals stays honest while attackers are fewer than half of them. Above
both stands an absolute bound from the task: `multiple` times the initial model's norm (at
least 1), see `initial_bound`, which alone judges the very first update. An honest update is a
few SGD steps from that model, which move it by a fraction of its own size; one that moves it
further than `multiple` times its whole size can only blow it up.

The default multiple, 5, is a Byzantine defence and not only a guard against blow-ups: honest
norms of one task rarely spread by more than 2-3x around their median, while a scaled or
sign-flipped update that is to outweigh several honest ones must be several times larger.

Pure: no clock, no I/O. Its state is plain JSON (`state_dict`), so a restarted server goes on
with the same window.
"""

from __future__ import annotations

import collections
import math
import statistics

import torch


def initial_bound(w0: torch.Tensor, multiple: float) -> float:
    """The absolute bound for a task whose model starts at w0: `multiple` x max(||w0||, 1) (the
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
        self.seen: collections.deque[float] = collections.deque(maxlen=window)  # warm-up: every finite norm
        self.accepted = 0
        self.rejected = 0

    def bound(self) -> float:
        """The largest norm accepted now."""
        reference = self.norms if self.accepted >= self.warmup else self.seen
        median = statistics.median(reference) if reference else 0.0
        return min(self.bound0, self.multiple * median) if median > 0 else self.bound0

    def check(self, norm: float) -> str | None:
        """Why an update of this norm is refused (None: it is not); counts the refusal."""
        bound = self.bound()
        warming_up = self.accepted < self.warmup
        seen = len(self.seen)
        if warming_up and math.isfinite(norm):
            self.seen.append(norm)
        if math.isfinite(norm) and norm <= bound:
            return None
        self.rejected += 1
        if bound == self.bound0:
            why = f"the absolute bound {bound:.4g} ({self.multiple:g} x the initial model's norm)"
        elif warming_up:
            why = f"{bound:.4g} ({self.multiple:g} x the median of the {seen} norms seen while warming up)"
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
        return {
            "norms": list(self.norms),
            "seen": list(self.seen),
            "accepted": self.accepted,
            "rejected": self.rejected,
        }

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        self.seen.clear()
        self.seen.extend(state.get("seen", ()))  # absent in state written before the warm-up median
        self.accepted, self.rejected = state["accepted"], state["rejected"]
