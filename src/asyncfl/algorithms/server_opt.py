"""Server optimizers: they turn an aggregated pseudo-gradient into a model step.

The pseudo-gradient g points like a gradient (g = w_old - w_client on average), so every
optimizer moves w against it. With SGD(lr=1, momentum=0) a step is plain model averaging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ServerOptimizer(ABC):
    """Stateful optimizer over the flat model vector; state is exposed for checkpoints."""

    def __init__(self, lr: float):
        self.lr = lr

    @abstractmethod
    def step(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return the new model; never modifies w in place (old versions stay valid)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            setattr(self, name, value.clone())


class SGD(ServerOptimizer):
    """SGD with optional heavy-ball momentum (FedAvgM when momentum > 0)."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.0):
        super().__init__(lr)
        self.momentum = momentum
        self.m: torch.Tensor | None = None

    def step(self, w, g):
        if self.momentum:
            self.m = g.clone() if self.m is None else self.momentum * self.m + g
            g = self.m
        return w - self.lr * g

    def state_dict(self):
        return {} if self.m is None else {"m": self.m}

    def load_state_dict(self, state):
        self.m = None  # a state saved before the first step holds no momentum: none is kept
        super().load_state_dict(state)


class Adaptive(ServerOptimizer):
    """FedAdam / FedYogi / FedAdagrad (Reddi et al.), which differ only in the v update."""

    def __init__(self, rule: str, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(lr)
        if rule not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"unknown adaptive rule {rule!r}")
        self.rule, self.beta1, self.beta2, self.tau = rule, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, w, g):
        if self.m is None:
            self.m = torch.zeros_like(g)
            self.v = torch.zeros_like(g)
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        g2 = g * g
        if self.rule == "adam":
            self.v = self.beta2 * self.v + (1 - self.beta2) * g2
        elif self.rule == "yogi":
            self.v = self.v - (1 - self.beta2) * g2 * torch.sign(self.v - g2)
        else:
            self.v = self.v + g2
        return w - self.lr * self.m / (torch.sqrt(self.v) + self.tau)

    def state_dict(self):
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.m = self.v = None  # a state saved before the first step holds no moments: none are kept
        super().load_state_dict(state)
