"""SCAFFOLD (Karimireddy et al., ICML 2020), option II: control variates correct client drift.

The server holds the model x and a control variate c; client i holds its own c_i. A trip
downloads x and c, takes K local steps whose gradients all get the constant c - c_i added,
and, with delta = x - y_i (our sign: it points like a gradient) and local rate eta,
    c_i+ = c_i - c + delta / (K eta),   uploads (delta, dc_i = c_i+ - c_i),  keeps c_i+.
At the round barrier the server steps x with the uniform mean of the round's deltas through
its optimizer (lr = eta_g) and sets c <- c + (1/N) sum_round dc_i, N the number of users.

`ScaffoldAggregator` is the server's side, `ControlVariates` the client's; both runtimes use
them through the algorithm definition (`client_state`, `upload_fields`), never by name.
"""

from __future__ import annotations

import torch

from asyncfl.algorithms.aggregators import Aggregator
from asyncfl.algorithms.server_opt import ServerOptimizer
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict, clone_or_none

CONTROL = "control"  # the server's c (sent with the model); on a client, its own c_i
CONTROL_DELTA = "control_delta"  # a client's c_i+ - c_i, uploaded with its delta


class ScaffoldAggregator(Aggregator):
    """Buffers a round's deltas and control deltas; `flush` steps x and c together.

    The round's deltas are averaged uniformly (the paper's 1/|S|), not by example count: c's
    update is a uniform sum too, and the two stay one estimator of the mean client gradient."""

    def __init__(self, server_opt: ServerOptimizer, num_clients: int):
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"SCAFFOLD needs the number of users N >= 1, got {num_clients}")
        self.server_opt, self.num_clients = server_opt, num_clients
        self.control: torch.Tensor | None = None  # c; None stands for zeros until the model's size is known
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.delta_sum: torch.Tensor | None = None
        self.control_delta_sum: torch.Tensor | None = None

    @property
    def pending(self) -> int:
        return self.count

    def discard(self) -> None:
        """Drop the round's sums without stepping (a secure round whose sum could not be unmasked)."""
        self._reset()

    def downloads(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.control is None:
            self.control = torch.zeros_like(w)
        return {CONTROL: self.control}

    def submit(self, state: ServerState, update: ClientUpdate, base_w: torch.Tensor) -> Verdict:
        dc = (update.extras or {}).get(CONTROL_DELTA)
        if dc is None or dc.shape != update.delta.shape:
            raise ValueError(f"a SCAFFOLD update carries {CONTROL_DELTA!r} shaped like its delta")
        if self.delta_sum is None:
            self.delta_sum, self.control_delta_sum = update.delta.clone(), dc.clone()
        else:
            self.delta_sum.add_(update.delta)
            self.control_delta_sum.add_(dc)
        self.count += 1
        return Verdict.BUFFERED

    def flush(self, state: ServerState) -> bool:
        if self.count == 0:
            return False
        state.w = self.server_opt.step(state.w, self.delta_sum / self.count)
        c = self.control if self.control is not None else torch.zeros_like(state.w)
        self.control = c + self.control_delta_sum / self.num_clients  # a new tensor: trips hold the old one
        state.version += 1
        self._reset()
        return True

    def status(self) -> dict:
        return super().status() | {"control_norm": None if self.control is None else float(self.control.norm())}

    def state_dict(self) -> dict:
        return {
            "control": clone_or_none(self.control),
            "count": self.count,
            "delta_sum": clone_or_none(self.delta_sum),
            "control_delta_sum": clone_or_none(self.control_delta_sum),
            "server_opt": self.server_opt.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.control, self.count = clone_or_none(state["control"]), state["count"]
        self.delta_sum, self.control_delta_sum = (
            clone_or_none(state["delta_sum"]),
            clone_or_none(state["control_delta_sum"]),
        )
        self.server_opt.load_state_dict(state["server_opt"])


class ControlVariates:
    """The client's side: its gradient correction for a trip and what it uploads after it.

    `downloaded` is what came with the model ({CONTROL: c}); `own` the client's c_i (None
    before its first accepted update: zeros). Nothing here mutates its inputs."""

    def __init__(self, lr: float):
        self.lr = lr

    def correction(self, downloaded: dict[str, torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
        c = downloaded[CONTROL]
        return c if own is None else c - own

    def uploads(
        self, downloaded: dict[str, torch.Tensor], own: torch.Tensor | None, update: ClientUpdate
    ) -> dict[str, torch.Tensor]:
        """dc_i = c_i+ - c_i = delta / (K eta) - c, K the steps actually taken (a trip with no
        step leaves c_i as it is)."""
        if update.steps == 0:
            return {CONTROL_DELTA: torch.zeros_like(update.delta)}
        return {CONTROL_DELTA: update.delta / (update.steps * self.lr) - downloaded[CONTROL]}

    def advanced(self, own: torch.Tensor | None, uploaded: dict[str, torch.Tensor]) -> torch.Tensor:
        """c_i+ once the server accepted the update."""
        dc = uploaded[CONTROL_DELTA]
        return dc.clone() if own is None else own + dc
